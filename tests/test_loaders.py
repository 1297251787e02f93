"""Load DC-Gen Diffusion Model: file layouts, weight dtype, memory-mapped loading, schedule wiring."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import tiny


def _load(comfyui, name, dtype="default"):
    return comfyui.runtime.node_classes["DCGenModelLoader"]().load(name, dtype)[0]


def _weights(model):
    return {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="module")
def layouts(comfyui, tiny_dcgen):
    """The same DC-Gen transformer as a single diffusers-key file, a BFL-key file and a pipeline folder."""
    from dcgen_core.flux_keys import diffusers_to_bfl

    d = comfyui.dirs["diffusion_models"]
    sd = {k: v.contiguous() for k, v in tiny_dcgen.dcgen.state_dict().items()}
    meta = {"config": json.dumps(dict(tiny.FLUX_CONFIG))}
    save_file(sd, os.path.join(d, "dcgen-diffusers-keys.safetensors"), metadata=meta)
    save_file(diffusers_to_bfl(sd), os.path.join(d, "dcgen-bfl-keys.safetensors"), metadata=meta)
    pipeline = os.path.join(d, "DC-Gen-pipeline")
    tiny_dcgen.save_dcgen_diffusers_folder(os.path.join(pipeline, "transformer"))
    with open(os.path.join(pipeline, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DCGenFluxPipeline"}, f)
    return ["dcgen-diffusers-keys.safetensors", "dcgen-bfl-keys.safetensors", "DC-Gen-pipeline/transformer"]


def test_every_layout_loads_the_same_model(comfyui, comfy_models, layouts):
    listed = comfyui.runtime.node_classes["DCGenModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    for name in [comfy_models.dcgen, *layouts]:
        assert name in listed, name
    assert not any("-0000" in n for n in listed)  # shards are not offered one by one
    reference = _weights(_load(comfyui, comfy_models.dcgen))
    for name in layouts:
        model = _load(comfyui, name)
        assert model.model_options["dcgen"]["latent_channels"] == tiny.LATENT_CHANNELS
        weights = _weights(model)
        assert weights.keys() == reference.keys()
        for k in reference:
            assert torch.equal(weights[k], reference[k]), (name, k)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp32", torch.float32)])
def test_weight_dtype(comfyui, comfy_models, dtype, expected):
    model = _load(comfyui, comfy_models.dcgen, dtype)
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == expected
    assert model.model.get_dtype() == expected


def test_schedule_is_the_official_one(comfyui, comfy_models):
    import comfy.samplers

    from dcgen_core.schedules import official_shift, official_sigmas

    model = _load(comfyui, comfy_models.dcgen)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 20)
    assert torch.allclose(sigmas.float(), official_sigmas(20, official_shift(32, 32, 32)), atol=1e-5)
    fixed = comfyui.runtime.node_classes["DCGenTimeShift"]().patch(model, "model default", 2048, 1024)[0]
    sigmas = comfy.samplers.calculate_sigmas(fixed.get_model_object("model_sampling"), "simple", 20)
    assert torch.allclose(sigmas.float(), official_sigmas(20, official_shift(32, 64, 32)), atol=1e-5)
    assert fixed.model_options["dcgen"]["fixed_resolution"] == (2048, 1024)
    assert model.model_options["dcgen"]["fixed_resolution"] is None  # the input model is unchanged


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from dcgen_core.headless import boot
    boot(cpu=True, model_dirs={{"diffusion_models": [{folder!r}]}})

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS")
    import nodes
    model = nodes.NODE_CLASS_MAPPINGS["DCGenModelLoader"]().load({name!r}, "default")[0]
    loaded = status("VmHWM")
    for t in model.model.diffusion_model.state_dict().values():  # touch every weight, as sampling does
        t.sum()
    print(json.dumps({{"before": before, "loaded": loaded, "peak": status("VmHWM")}}))
""")


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_loading_is_memory_mapped(comfyui, tmp_path, layout):
    """Peak resident memory while loading a ~300 MB checkpoint and touching every weight stays near the
    weights' size (the loader itself maps the file; pages come in as the weights are used).

    BFL/ComfyUI keys: tensors are assigned straight from the mapped file (peak <= 1.25x the file).
    diffusers keys: q/k/v and the single-block linear1 are concatenated into new tensors, which adds
    their size on top of the mapped file (peak <= 1.6x the file)."""
    from diffusers import FluxTransformer2DModel

    from dcgen_core.flux_keys import diffusers_to_bfl

    torch.manual_seed(0)
    cfg = dict(patch_size=1, in_channels=32, out_channels=32, num_layers=2, num_single_layers=4,
               attention_head_dim=128, num_attention_heads=6, joint_attention_dim=256, pooled_projection_dim=64,
               guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    sd = {k: v.contiguous() for k, v in FluxTransformer2DModel(**cfg).state_dict().items()}
    if layout == "bfl":
        sd = diffusers_to_bfl(sd)
    name = f"big-{layout}.safetensors"
    path = tmp_path / name
    save_file(sd, str(path), metadata={"config": json.dumps(cfg)})
    del sd
    size = os.path.getsize(path)
    script = _RSS_SCRIPT.format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                folder=str(tmp_path), name=name)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["before"]) / size
    print(f"{layout}: file {size / 2**20:.0f} MiB; after loading +{(m['loaded'] - m['before']) / 2**20:.0f} MiB; "
          f"peak with every weight touched +{(m['peak'] - m['before']) / 2**20:.0f} MiB ({ratio:.2f}x the file)")
    assert ratio <= (1.25 if layout == "bfl" else 1.6)
