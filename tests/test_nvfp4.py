"""NVFP4: the quantizer's file, the 4-bit loader node on both ComfyUI versions, LoRAs on 4-bit weights, bad input.

Tolerances (fp32 on CPU):
- (a) the NVFP4 model vs the same model with each quantized weight replaced by its dequantized value, sampled
  through ComfyUI's executor: final latents within 1e-6 relative (the same dequantize-then-matmul math);
- (b) images vs the authors' diffusers pipeline on the dequantized weights: 1e-3 max abs (as the bf16 parity);
- (c) the pack's LoRA on an NVFP4 model (a runtime low-rank term) vs dequant(W) + dW merged in fp32: model output
  within 1e-5 relative.
The error against the unquantized model is printed (a report, not an assertion).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
from test_parity_e2e import _ksampler_prompt

from dcgen_core.shared.quant import nvfp4
from dcgen_core.shared.errors import DCGenError
from dcgen_core.flux.keys import diffusers_flux_module_to_bfl, flux_config_from_state_dict
from dcgen_core.tools.quantize import main as quantize_main
from dcgen_core.flux.quantize import quantize_flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, STEPS, GUIDANCE = 42, 4, 3.5
BLOCK_LINEARS = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
                 "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                 "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                 "single_blocks.0.linear2", "single_blocks.1.linear1", "single_blocks.1.linear2"}
MODULATION = {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin",
              "single_blocks.1.modulation.lin"}


def _read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def dequantized_state_dict(path) -> dict:
    """The NVFP4 file's BFL state dict with every quantized weight replaced by its dequantized fp32 value."""
    sd, _ = _read(path)
    out = {}
    for k, v in sd.items():
        if k.endswith((".comfy_quant", ".weight_scale", ".weight_scale_2")):
            continue
        layer = k[: -len(".weight")]
        if f"{layer}.comfy_quant" in sd and k.endswith(".weight"):
            out[k] = nvfp4.dequantize(v, sd[f"{layer}.weight_scale"], sd[f"{layer}.weight_scale_2"])
        else:
            out[k] = v.float()
    return out


def dequantized_diffusers(model, nvfp4_path):
    """A copy of a diffusers FluxTransformer2DModel holding the NVFP4 file's weights: the 4-bit layers
    dequantized, the rest as stored (bf16), all in fp32."""
    import copy

    from dcgen_core.flux.keys import SCALE_SHIFT_SWAPPED_MODULES, swap_scale_shift

    deq = dequantized_state_dict(nvfp4_path)
    cfg = flux_config_from_state_dict(deq, json.loads(_read(nvfp4_path)[1]["config"]))
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    used = set()
    for name in sd:
        key, offset = diffusers_flux_module_to_bfl(name, config=cfg)
        w = deq[key]
        if name.rsplit(".", 1)[0] in SCALE_SHIFT_SWAPPED_MODULES:
            w = swap_scale_shift(w)
        sd[name] = w if offset is None else w[offset[1]:offset[1] + offset[2]]
        used.add(key)
    assert used == set(deq)
    ref.load_state_dict(sd)
    return ref


# --- the file (torch only) --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory, tiny_dcgen):
    d = tmp_path_factory.mktemp("nvfp4")
    folder = tiny_dcgen.save_dcgen_diffusers_folder(str(d / "dcgen"))
    out = str(d / "dcgen-nvfp4.safetensors")
    report = quantize_flux(folder, out, progress=False)
    return folder, out, report


def test_quantized_file_layout(quantized_tiny):
    """Block linears in ComfyUI's NVFP4 format under BFL keys; embedder, head, inputs, modulation, norms in bf16;
    the DC-Gen facts and the per-layer list in the header; dequantized weights close to the originals."""
    folder, path, report = quantized_tiny
    sd, meta = _read(path)
    quantized = {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}
    assert quantized == BLOCK_LINEARS and report["layers"] == len(BLOCK_LINEARS)
    for layer in quantized:
        assert json.loads(bytes(sd[f"{layer}.comfy_quant"].tolist())) == {"format": "nvfp4"}
        codes, block, scale = sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"], sd[f"{layer}.weight_scale_2"]
        assert codes.dtype == torch.uint8 and block.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert tuple(block.shape) == nvfp4.blocked_scale_shape(codes.shape[0], codes.shape[1] * 2)
    plain = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in quantized and not k.endswith(
        (".comfy_quant", ".weight_scale", ".weight_scale_2"))}
    assert all(v.dtype == torch.bfloat16 for v in plain.values())
    for key in ("img_in.weight", "final_layer.linear.weight", "txt_in.weight", "time_in.in_layer.weight",
                "vector_in.in_layer.weight", "guidance_in.in_layer.weight", "double_blocks.0.img_mod.lin.weight",
                "single_blocks.0.modulation.lin.weight", "double_blocks.0.img_attn.norm.query_norm.scale"):
        assert key in plain, key
    assert json.loads(meta["dcgen"]) == {"latent_channels": 32, "spatial_compression": 32, "scaling_factor": 0.41407,
                                         "time_shift_rule": "dcgen-1k", "source": "dcgen"}
    assert set(json.loads(meta["_quantization_metadata"])["layers"]) == quantized
    # the original weights, for the report and a sanity bound (NVFP4 of Gaussian weights: ~0.1 relative)
    from dcgen_core.flux.comfy_model import read_flux_checkpoint

    original, _, _ = read_flux_checkpoint(folder)
    deq = dequantized_state_dict(path)
    errors = {}
    for layer in quantized:
        w = original[f"{layer}.weight"]
        w = (w.into(torch.float32) if hasattr(w, "into") else w.float())
        errors[layer] = ((deq[f"{layer}.weight"] - w).norm() / w.norm()).item()
    print("NVFP4 per-layer relative weight error: mean %.4f, worst %.4f" % (
        sum(errors.values()) / len(errors), max(errors.values())))
    assert 0.0 < max(errors.values()) < 0.2
    assert abs(max(errors.values()) - report["worst_layer_relative_error"]) < 1e-6


def test_quantize_modulation_option(tmp_path, quantized_tiny):
    folder, default_path, _ = quantized_tiny
    out = str(tmp_path / "all.safetensors")
    quantize_flux(folder, out, quantize_modulation=True, progress=False)
    sd, _ = _read(out)
    assert {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")} == BLOCK_LINEARS | MODULATION
    assert os.path.getsize(out) < os.path.getsize(default_path)


def test_quantize_cli(tmp_path, quantized_tiny, capsys):
    folder, quantized, _ = quantized_tiny
    out = str(tmp_path / "cli.safetensors")
    proc = subprocess.run([sys.executable, "-m", "dcgen_core.quantize", folder, out, "--format", "nvfp4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "12 NVFP4 layers" in proc.stdout and os.path.isfile(out) and not os.path.exists(out + ".partial")
    assert quantize_main([folder, out]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert quantize_main([quantized, str(tmp_path / "again.safetensors")]) == 1
    err = capsys.readouterr().err
    assert quantized in err and "4-bit NVFP4" in err
    with pytest.raises(SystemExit):
        quantize_main([folder, out, "--format", "int4"])


# --- through ComfyUI ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nvfp4_models(comfyui, comfy_models, tiny_dcgen):
    """NVFP4 files of the tiny DC-Gen and base FLUX in the model folders, and fp32 files of their dequantized
    weights (the same model without the 4-bit storage)."""
    d = comfyui.dirs["diffusion_models"]
    names = {}
    for src, name in ((comfy_models.dcgen, "DC-Gen-FLUX-tiny-Res1K-nvfp4.safetensors"),
                      (comfy_models.base, "flux-base-tiny-nvfp4.safetensors")):
        path = os.path.join(d, name)
        quantize_flux(os.path.join(d, src), path, progress=False)
        deq_name = name.replace("-nvfp4", "-dequantized")
        _, meta = _read(path)
        save_file(dequantized_state_dict(path), os.path.join(d, deq_name), metadata={"config": meta["config"]})
        names[src] = (name, deq_name)
    # the embedding as bf16 values: a new embedder/head takes the dtype of the layer it replaces, bf16 in a 4-bit
    # file read by the pack's ops (v0.3.64), fp32 in the dequantized fp32 reference; bf16 values are the same in both
    embedding = {k: v.to(torch.bfloat16).float() for k, v in tiny_dcgen.embedding.items()}
    save_file(embedding, os.path.join(comfyui.dirs["dcgen_embeddings"], "dcgen-flux-tiny-embedding-bf16.safetensors"))
    from types import SimpleNamespace

    return SimpleNamespace(dcgen=names[comfy_models.dcgen][0], dcgen_deq=names[comfy_models.dcgen][1],
                           base=names[comfy_models.base][0], base_deq=names[comfy_models.base][1],
                           embedding="dcgen-flux-tiny-embedding-bf16.safetensors", embedding_sd=embedding,
                           path=lambda n: os.path.join(d, n))


def _run_latents(comfyui, comfy_models, model_nodes, model_ref, key, size=(256, 192)):
    cond, pooled = tiny.prompt_embeddings(seed=7)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(_ksampler_prompt(model_nodes, model_ref, key, *size, comfy_models))
    out = comfyui.test_nodes.CAPTURED[key]
    return out["latent"]["samples"], out["image"], (cond, pooled)


def _nvfp4_node(name):
    return {"model": {"class_type": "DCGenNVFP4ModelLoader", "inputs": {
        "unet_name": name, "svdquant_backend": "auto", "vae": ["vae", 0]}}}, ["model", 0]


def _bf16_node(name, dtype="fp32"):
    return {"model": {"class_type": "DCGenModelLoader", "inputs": {
        "unet_name": name, "weight_dtype": dtype, "vae": ["vae", 0]}}}, ["model", 0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_nvfp4_node_equals_dequantized_model(comfyui, comfy_models, nvfp4_models, tiny_dcgen, tiny_vae):
    """(a) and (b): the node's model samples what the dequantized weights sample, and matches diffusers on them."""
    ours, image, (cond, pooled) = _run_latents(comfyui, comfy_models, *_nvfp4_node(nvfp4_models.dcgen), "nvfp4-a")
    deq, _, _ = _run_latents(comfyui, comfy_models, *_bf16_node(nvfp4_models.dcgen_deq), "nvfp4-a-deq")
    full, full_image, _ = _run_latents(comfyui, comfy_models, *_bf16_node(comfy_models.dcgen), "nvfp4-a-full")
    assert ours.shape == (1, 32, 6, 8)
    assert _rel(ours, deq) <= 1e-6
    print(f"NVFP4 vs unquantized tiny DC-Gen, 4 steps: latent relative error {_rel(ours, full):.4f}, "
          f"image max abs {(image - full_image).abs().max().item():.4f}")
    assert _rel(ours, full) > 1e-4  # the weights really are 4-bit
    width, height = 256, 192
    ref, _ = tiny.reference_images(dequantized_diffusers(tiny_dcgen.dcgen, nvfp4_models.path(nvfp4_models.dcgen)),
                                   tiny_vae, width, height, SEED, STEPS, GUIDANCE, cond, pooled)
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    assert (image - ref).abs().max().item() <= 1e-3


def test_nvfp4_model_holds_4bit_weights(comfyui, nvfp4_models):
    from dcgen_core.flux.four_bit import load_nvfp4_flux

    m = load_nvfp4_flux(nvfp4_models.path(nvfp4_models.dcgen))
    dm = m.model.diffusion_model
    quantized = {n[: -len(".weight")] for n, p in dm.named_parameters() if nvfp4.is_quantized(p)}
    assert quantized == BLOCK_LINEARS
    assert m.model_options["dcgen"]["latent_channels"] == 32
    assert m.model_options["dcgen_quantization"]["layers"] == len(BLOCK_LINEARS)
    # ComfyUI sizes the model from its state dict: the packed bytes, not the logical fp32 size
    import comfy.model_management as mm

    packed = mm.module_size(dm.double_blocks[0].img_mlp[0])
    assert packed < 128 * 32 * 4 / 4


def _forward(m, x, cond, pooled):
    """One diffusion-model call of the patcher ``m`` as samplers make it: weight and object patches applied
    (models sharing a base are swapped in and out by ComfyUI), wrappers and transformer options passed."""
    import comfy.model_management as mm

    mm.load_models_gpu([m])
    opts = {**m.model_options.get("transformer_options", {}), "wrappers": m.wrappers}
    with torch.no_grad():
        return m.model.apply_model(x, torch.tensor([0.6]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]),
                                   transformer_options=opts)


def _inputs(seed=11, channels=32):
    g = torch.Generator().manual_seed(seed)
    cond, pooled = tiny.prompt_embeddings(seed=seed)
    return torch.randn(1, channels, 6, 8, generator=g), cond, pooled


def test_pack_ops_equal_core_ops(comfyui, nvfp4_models):
    """v0.33 loads NVFP4 with core's mixed-precision ops, v0.3.64 with the pack's: the same model either way."""
    from dcgen_core.flux.four_bit import load_nvfp4_flux
    from dcgen_core.shared.quant.ops import core_reads_nvfp4

    path = nvfp4_models.path(nvfp4_models.dcgen)
    pack = load_nvfp4_flux(path, ops="pack")
    assert type(pack.model.diffusion_model.single_blocks[0].linear1).__qualname__.endswith("NVFP4Ops.Linear")
    if not core_reads_nvfp4():
        with pytest.raises(DCGenError, match="core loads NVFP4"):
            load_nvfp4_flux(path, ops="core")
        pytest.skip(f"ComfyUI {comfyui.pack.dcgen_core.shared.comfy_compat.comfyui_version()} has no core NVFP4 ops; the "
                    "pack's ops were checked by the executor tests")
    core = load_nvfp4_flux(path, ops="core")
    assert "MixedPrecisionOps" in type(core.model.diffusion_model.single_blocks[0].linear1).__qualname__
    x, cond, pooled = _inputs()
    assert _rel(_forward(pack, x, cond, pooled), _forward(core, x, cond, pooled)) <= 1e-6


def test_core_unet_loader_reads_our_file(comfyui, flux_full_width_file, tmp_path):
    """A full-width FLUX quantized by the pack loads in core Load Diffusion Model, on ComfyUI versions whose core
    reads NVFP4, with the same 4-bit weights as in the pack's loader. (Core detects FLUX by its real widths.)"""
    from dcgen_core.flux.four_bit import load_nvfp4_flux
    from dcgen_core.shared.quant.ops import core_reads_nvfp4

    if not core_reads_nvfp4():
        pytest.skip("this ComfyUI's core has no NVFP4 (v0.3.64); the pack's loader is its only reader")
    name = "flux1-full-width-nvfp4.safetensors"
    path = os.path.join(comfyui.dirs["diffusion_models"], name)
    if not os.path.exists(path):
        quantize_flux(flux_full_width_file, path, progress=False)
    core = comfyui.runtime.node_classes["UNETLoader"]().load_unet(name, "default")[0]
    ours = load_nvfp4_flux(path)
    a = dict(core.model.diffusion_model.named_parameters())
    b = dict(ours.model.diffusion_model.named_parameters())
    assert set(a) == set(b)
    full_width = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
                  "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                  "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                  "single_blocks.0.linear2"}
    assert {k for k, v in a.items() if nvfp4.is_quantized(v)} == {f"{m}.weight" for m in full_width}
    for k in a:
        x, y = (t.dequantize() if nvfp4.is_quantized(t) else t for t in (a[k], b[k]))
        assert torch.equal(x.float(), y.float()), k


def _dcgen_from_base(model_nodes, model_ref, models, nvfp4_models, lora=True):
    nodes = dict(model_nodes)
    nodes["embed"] = {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
        "model": model_ref, "embedding_name": nvfp4_models.embedding, "vae": ["vae", 0]}}
    ref = ["embed", 0]
    if lora:
        nodes["lora"] = {"class_type": "DCGenLoraLoader", "inputs": {
            "model": ref, "lora_name": models.lora, "strength_model": 1.0}}
        ref = ["lora", 0]
    return nodes, ref


def _loaded(comfyui, nodes, ref, key):
    p = {"vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": "dc-ae-f32c32-sana-1.1-tiny",
                                                             "variant": "auto"}},
         **nodes, "capture": {"class_type": "TestCapture", "inputs": {"key": key, "model": ref}}}
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(p)
    return comfyui.test_nodes.CAPTURED[key]["model"]


def test_pack_lora_on_nvfp4_is_a_runtime_term(comfyui, comfy_models, nvfp4_models, tiny_dcgen, tiny_vae):
    """(c) base NVFP4 + aligned embedding + DC-Gen LoRA: y = Wq x + s B A x, equal to dequant(W) + dW merged."""
    def route(node, lora=True):
        return _dcgen_from_base(*node, comfy_models, nvfp4_models, lora=lora)

    quant = _loaded(comfyui, *route(_nvfp4_node(nvfp4_models.base)), "lora-q")
    merged = _loaded(comfyui, *route(_bf16_node(nvfp4_models.base_deq)), "lora-deq")
    without = _loaded(comfyui, *route(_nvfp4_node(nvfp4_models.base), lora=False), "no-lora")
    terms = quant.model_options["transformer_options"]["dcgen_low_rank"]
    assert set(terms) == BLOCK_LINEARS
    assert not [k for k in quant.patches if (k if isinstance(k, str) else k[0])[len("diffusion_model."):-7]
                in BLOCK_LINEARS]  # no weight patch (no re-quantization) on 4-bit layers
    assert "dcgen_low_rank" not in without.model_options.get("transformer_options", {})
    x, cond, pooled = _inputs()
    out = _forward(quant, x, cond, pooled)
    assert _rel(out, _forward(merged, x, cond, pooled)) <= 1e-5
    assert _rel(out, _forward(without, x, cond, pooled)) > 1e-2
    # the whole route through the executor against diffusers on dequant(W) + dW: the image
    nodes, ref = _dcgen_from_base(*_nvfp4_node(nvfp4_models.base), comfy_models, nvfp4_models)
    _, image, (cond, pooled) = _run_latents(comfyui, comfy_models, nodes, ref, "lora-route")
    base_deq = dequantized_diffusers(tiny_dcgen.base, nvfp4_models.path(nvfp4_models.base))
    reference = tiny_dcgen.merge(base_deq, embedding=nvfp4_models.embedding_sd)
    expected, _ = tiny.reference_images(reference, tiny_vae, 256, 192, SEED, STEPS, GUIDANCE, cond, pooled)
    assert (image - expected).abs().max().item() <= 1e-3


def test_core_lora_loader_on_nvfp4(comfyui, comfy_models, nvfp4_models):
    """Core LoraLoaderModelOnly patches 4-bit layers the core way (dequantize, add, re-quantize): close to the
    merged fp32 model (within NVFP4 re-quantization error), far from the model without the LoRA."""
    nodes, ref = _dcgen_from_base(*_nvfp4_node(nvfp4_models.base), comfy_models, nvfp4_models, lora=False)
    nodes["core_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ref, "lora_name": comfy_models.lora, "strength_model": 1.0}}
    core_lora = _loaded(comfyui, nodes, ["core_lora", 0], "core-lora")
    merged = _loaded(comfyui, *_dcgen_from_base(*_bf16_node(nvfp4_models.base_deq), comfy_models, nvfp4_models),
                     "lora-deq2")
    without = _loaded(comfyui, *_dcgen_from_base(*_nvfp4_node(nvfp4_models.base), comfy_models, nvfp4_models,
                                                 lora=False), "nl2")
    patched = [k for k in core_lora.patches if (k if isinstance(k, str) else k[0])[len("diffusion_model."):-7]
               in BLOCK_LINEARS]
    assert len(patched) >= len(BLOCK_LINEARS)
    import comfy.model_management as mm

    x, cond, pooled = _inputs()
    out = _forward(core_lora, x, cond, pooled)
    err_merged, err_without = _rel(out, _forward(merged, x, cond, pooled)), _rel(out, _forward(without, x, cond, pooled))
    print(f"core LoRA loader on NVFP4: relative error vs merged fp32 {err_merged:.4f}, vs no LoRA {err_without:.4f}")
    assert err_merged < 0.5 * err_without
    mm.load_models_gpu([core_lora])  # patched: dequantized, LoRA added, re-quantized
    assert all(nvfp4.is_quantized(p) for n, p in core_lora.model.diffusion_model.named_parameters()
               if n[: -len(".weight")] in BLOCK_LINEARS)
    mm.unload_all_models()


# --- bad input -----------------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit, metadata_edit=None):
    sd, meta = _read(src)
    edit(sd)
    if metadata_edit:
        metadata_edit(meta)
    save_file(sd, dst, metadata=meta)
    return dst


def _expect_error(path, *fragments):
    from dcgen_core.flux.four_bit import load_4bit_flux

    with pytest.raises(DCGenError) as e:
        load_4bit_flux(path)
    msg = str(e.value)
    assert path in msg and "expected" in msg and "found" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_bad_nvfp4_files(comfyui, nvfp4_models, tmp_path):
    src = nvfp4_models.path(nvfp4_models.dcgen)
    layer = "double_blocks.0.img_mlp.0"

    def drop(*keys):
        return lambda sd: [sd.pop(k) for k in keys]

    _expect_error(_rewrite(src, str(tmp_path / "no-scale2.safetensors"), drop(f"{layer}.weight_scale_2")),
                  f"'{layer}.weight_scale_2'")
    _expect_error(_rewrite(src, str(tmp_path / "no-block.safetensors"), drop(f"{layer}.weight_scale")),
                  f"'{layer}.weight_scale'")

    def fp8(sd):
        sd[f"{layer}.comfy_quant"] = nvfp4.conf_tensor({"format": "float8_e4m3fn"})

    def fp8_meta(meta):
        layers = json.loads(meta["_quantization_metadata"])
        layers["layers"][layer] = {"format": "float8_e4m3fn"}
        meta["_quantization_metadata"] = json.dumps(layers)

    _expect_error(_rewrite(src, str(tmp_path / "fp8.safetensors"), fp8, fp8_meta), "float8_e4m3fn")

    def bad_shape(sd):
        sd[f"{layer}.weight_scale"] = sd[f"{layer}.weight_scale"][:64]

    _expect_error(_rewrite(src, str(tmp_path / "shape.safetensors"), bad_shape), "blocked scales")
    truncated = str(tmp_path / "truncated.safetensors")
    with open(src, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[: os.path.getsize(src) - 1000])
    _expect_error(truncated, "truncated")
    # not FLUX: a quantized LLM-style layer
    other = str(tmp_path / "llm-nvfp4.safetensors")
    codes, block, scale = nvfp4.quantize(torch.randn(64, 64))
    save_file({"model.layers.0.mlp.up_proj.weight": codes, "model.layers.0.mlp.up_proj.weight_scale": block,
               "model.layers.0.mlp.up_proj.weight_scale_2": scale,
               "model.layers.0.mlp.up_proj.comfy_quant": nvfp4.conf_tensor({"format": "nvfp4"})}, other)
    _expect_error(other, "FLUX transformer")
    # a plain file in the 4-bit loader, a 4-bit file in the bf16 loader
    _expect_error(nvfp4_models.path(nvfp4_models.dcgen_deq), "plain checkpoint", "dcgen_core.quantize")
    from dcgen_core.flux.comfy_model import load_flux_transformer

    with pytest.raises(DCGenError, match="4-bit NVFP4 file"):
        load_flux_transformer(src)

    def wrong_channels(meta):
        info = json.loads(meta["dcgen"])
        meta["dcgen"] = json.dumps({**info, "latent_channels": 128})

    _expect_error(_rewrite(src, str(tmp_path / "header.safetensors"), lambda sd: None, wrong_channels),
                  "latent_channels=128")


def test_missing_comfy_kitchen_is_a_clear_error(monkeypatch):
    from dcgen_core.shared.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)
    with pytest.raises(MissingDependencyError, match="pip install comfy-kitchen"):
        nvfp4.quantize(torch.randn(16, 16))
    assert not nvfp4.native_matmul_supported("cpu")


def test_native_path_choice():
    """Native NVFP4 matmul only on CUDA with SM >= 10 and comfy-kitchen's CUDA backend; here: weight-only."""
    assert not nvfp4.native_matmul_supported("cpu")
    assert nvfp4.compute_path("cpu").startswith("weight-only")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 10:
        assert not nvfp4.native_matmul_supported("cuda")


def test_lora_leaves_incoming_nvfp4_model_unchanged(comfyui, comfy_models, nvfp4_models):
    from dcgen_core.flux.dcgen import apply_aligned_embedding
    from dcgen_core.shared.embedding import load_aligned_embedding
    from dcgen_core.flux.four_bit import load_nvfp4_flux
    from dcgen_core.architectures import apply_lora

    base = load_nvfp4_flux(nvfp4_models.path(nvfp4_models.base))
    before = {k: (v.dequantize() if nvfp4.is_quantized(v) else v).clone()
              for k, v in base.model.diffusion_model.named_parameters()}
    options = json.dumps(base.model_options, default=str)
    emb = load_aligned_embedding(os.path.join(comfyui.dirs["dcgen_embeddings"], comfy_models.embedding))
    dcgen = apply_aligned_embedding(base, emb)
    apply_lora(dcgen, os.path.join(comfyui.dirs["loras"], comfy_models.lora))
    assert json.dumps(base.model_options, default=str) == options and not base.patches
    for k, v in base.model.diffusion_model.named_parameters():
        now = v.dequantize() if nvfp4.is_quantized(v) else v
        assert torch.equal(now, before[k]), k
