"""DC-Gen LoRA loader: key layouts, fused offsets, strength, stacking, weight patching (not rewriting)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import tiny


def _patched_weights(model) -> dict:
    """What ComfyUI's weight patching would produce, computed without touching the model."""
    import comfy.lora

    sd = model.model_state_dict()
    return {k: comfy.lora.calculate_weight(model.patches[k], sd[k].detach().clone().float(), k)
            for k in model.patches}


@pytest.fixture(scope="module")
def expected(tiny_dcgen):
    """Merged DC-Gen weights in ComfyUI names (embedder/head excluded: the base keeps its own)."""
    from dcgen_core.flux.keys import diffusers_to_bfl

    merged = diffusers_to_bfl(dict(tiny_dcgen.dcgen.state_dict()))
    base = diffusers_to_bfl(dict(tiny_dcgen.base.state_dict()))
    return {f"diffusion_model.{k}": v for k, v in merged.items()
            if not k.startswith(("img_in", "final_layer.linear")) and not torch.equal(v, base[k])}


def _kohya(lora):
    out = {}
    for k, v in lora.items():
        module = k[len("transformer."):].rsplit(".lora_", 1)[0]
        name = "lora_transformer_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if ".lora_A." in k else f"{name}.lora_up.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(tiny.LORA_ALPHA)
    return out


def _peft(lora):
    return {"base_model.model." + k[len("transformer."):].replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default."): v for k, v in lora.items()}


def _bfl_fused(lora, cfg):
    """kohya names on ComfyUI modules; q/k/v (and single-block mlp) fused into one LoRA of rank 3r / 4r."""
    from dcgen_core.flux.keys import diffusers_flux_module_to_bfl

    groups = {}
    for k in lora:
        if ".lora_A." not in k:
            continue
        module = k[len("transformer."):].rsplit(".lora_A.", 1)[0]
        bfl, offset = diffusers_flux_module_to_bfl(module, config=cfg)
        groups.setdefault(bfl[: -len(".weight")], []).append((offset[1] if offset else 0, module))
    out = {}
    for target, parts in groups.items():
        parts.sort()
        downs = [lora[f"transformer.{m}.lora_A.weight"] for _, m in parts]
        ups = [lora[f"transformer.{m}.lora_B.weight"] for _, m in parts]
        name = "lora_unet_" + target.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.cat(downs, 0)
        out[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"{name}.alpha"] = torch.tensor(tiny.LORA_ALPHA * len(parts))  # keeps alpha / rank
    return out


def _write(comfyui, name, sd, metadata=None, adapter_config=None):
    folder = os.path.join(comfyui.dirs["loras"], os.path.dirname(name))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(comfyui.dirs["loras"], name), metadata=metadata)
    if adapter_config:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f)
    return name


@pytest.fixture(scope="module")
def base_model(comfyui, comfy_models):
    return comfyui.runtime.node_classes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]


LAYOUTS = ["diffusers", "peft", "kohya", "bfl-fused"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_patch_the_merged_weights(comfyui, base_model, tiny_dcgen, expected, layout):
    from dcgen_core.flux.keys import diffusers_to_bfl, flux_config_from_state_dict

    lora = tiny_dcgen.lora
    alpha_meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": tiny.LORA_ALPHA})}
    if layout == "diffusers":
        name = _write(comfyui, "layouts/diffusers.safetensors", lora, metadata=alpha_meta)
    elif layout == "peft":
        name = _write(comfyui, "layouts/peft/adapter_model.safetensors", _peft(lora),
                      adapter_config={"r": tiny.LORA_RANK, "lora_alpha": tiny.LORA_ALPHA})
    elif layout == "kohya":
        name = _write(comfyui, "layouts/kohya.safetensors", _kohya(lora))
    else:
        cfg = flux_config_from_state_dict(diffusers_to_bfl(dict(tiny_dcgen.base.state_dict())),
                                          {"axes_dims_rope": tiny.FLUX_CONFIG["axes_dims_rope"]})
        name = _write(comfyui, "layouts/bfl-fused.safetensors", _bfl_fused(lora, cfg))
    model = comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(base_model, name, 1.0)[0]
    got = _patched_weights(model)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert not base_model.patches  # the incoming model is untouched


def test_strength_and_stacking_with_core_lora_loader(comfyui, base_model, tiny_dcgen, expected, comfy_models):
    base_sd = base_model.model_state_dict()
    half = comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(base_model, comfy_models.lora, 0.5)[0]
    got = _patched_weights(half)
    for k, v in expected.items():
        assert torch.allclose(got[k], base_sd[k] + 0.5 * (v - base_sd[k]), atol=1e-5), k
    # a second LoRA through the core loader stacks on top of ours
    g = torch.Generator().manual_seed(9)
    extra = {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 32, generator=g),
             "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(32, 2, generator=g)}
    save_file(extra, os.path.join(comfyui.dirs["loras"], "extra.safetensors"))
    stacked = comfyui.runtime.node_classes["LoraLoaderModelOnly"]().load_lora_model_only(half, "extra.safetensors", 1.0)[0]
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    got = _patched_weights(stacked)[key]
    delta_extra = extra["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"] @ \
        extra["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"]
    assert torch.allclose(got, base_sd[key] + 0.5 * (expected[key] - base_sd[key]) + delta_extra, atol=1e-5)


def test_applied_through_weight_patching(comfyui, base_model, comfy_models):
    """Patches are registered, not written: the weights change only inside ComfyUI's patch/unpatch cycle."""
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    original = base_model.model_state_dict()[key].clone()
    model = comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(base_model, comfy_models.lora, 1.0)[0]
    assert key in model.patches and model.model is base_model.model
    assert torch.equal(model.model_state_dict()[key], original)
    model.patch_model()
    try:
        assert not torch.equal(model.model_state_dict()[key], original)
    finally:
        model.unpatch_model()
    assert torch.equal(base_model.model_state_dict()[key], original)


def test_adapter_config_belongs_to_its_adapter_only(comfyui, base_model, tiny_dcgen, expected):
    """A PEFT folder's adapter_config.json gives alpha to its adapter_model.safetensors, never to another
    metadata-less LoRA that happens to sit in the same folder."""
    lora = tiny_dcgen.lora
    peft = _write(comfyui, "shared/adapter_model.safetensors", _peft(lora),
                  adapter_config={"r": tiny.LORA_RANK, "lora_alpha": tiny.LORA_ALPHA})
    other = _write(comfyui, "shared/other.safetensors", lora)  # no alpha anywhere: scale 1 per ComfyUI's rule
    node = comfyui.runtime.node_classes["DCGenLoraLoader"]()
    base_sd = base_model.model_state_dict()
    got_peft = _patched_weights(node.apply(base_model, peft, 1.0)[0])
    got_other = _patched_weights(node.apply(base_model, other, 1.0)[0])
    scale = tiny.LORA_ALPHA / tiny.LORA_RANK
    assert scale != 1.0
    for k, v in expected.items():
        assert torch.allclose(got_peft[k], v, atol=1e-5), k
        assert torch.allclose(got_other[k], base_sd[k] + (v - base_sd[k]) / scale, atol=1e-4), k


@pytest.mark.parametrize("case", ["metadata-not-json", "metadata-list", "alpha-text", "rank-mismatch", "unpaired"])
def test_malformed_lora_files_name_the_file_and_key(comfyui, base_model, tiny_dcgen, case):
    lora = dict(tiny_dcgen.lora)
    meta = None
    first = next(k for k in lora if k.endswith(".lora_A.weight"))
    if case == "metadata-not-json":
        meta, expect = {"lora_adapter_metadata": "{lora_alpha: 16"}, "lora_adapter_metadata"
    elif case == "metadata-list":
        meta, expect = {"lora_adapter_metadata": "[16]"}, "expected a JSON object"
    elif case == "alpha-text":
        meta, expect = {"lora_adapter_metadata": json.dumps({"lora_alpha": "sixteen"})}, "lora_alpha"
    elif case == "rank-mismatch":
        lora[first] = lora[first][:-1]
        expect = first
    else:
        del lora[first.replace(".lora_A.", ".lora_B.")]
        expect = first
    name = _write(comfyui, f"malformed/{case}.safetensors", lora, metadata=meta)
    before = dict(base_model.patches)
    with pytest.raises(comfyui.core.shared.errors.DCGenError) as err:
        comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(base_model, name, 1.0)
    assert name.split("/")[-1] in str(err.value) and expect in str(err.value)
    assert base_model.patches == before


def test_written_loras_read_the_same_in_core_and_pack_loaders(comfyui, base_model, tiny_dcgen, expected, tmp_path):
    """save_lora's files (alpha per module + header) give the same patched weights through core's
    LoraLoaderModelOnly as through ours."""
    lora = {k[len("transformer."):-len(".lora_A.weight")]: (v, tiny_dcgen.lora[k.replace(".lora_A.", ".lora_B.")])
            for k, v in tiny_dcgen.lora.items() if k.endswith(".lora_A.weight")}
    path = os.path.join(comfyui.dirs["loras"], "written-by-pack.safetensors")
    comfyui.core.shared.lora.save_lora(path, lora, alpha=tiny.LORA_ALPHA)
    ours = _patched_weights(comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(
        base_model, "written-by-pack.safetensors", 1.0)[0])
    core = _patched_weights(comfyui.runtime.node_classes["LoraLoaderModelOnly"]().load_lora_model_only(
        base_model, "written-by-pack.safetensors", 1.0)[0])
    assert set(core) == set(ours) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(ours[k], v, atol=1e-5) and torch.allclose(core[k], v, atol=1e-5), k
