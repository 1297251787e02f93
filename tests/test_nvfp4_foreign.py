"""NVFP4 files the pack did not write: ComfyUI's documented forms, written here the way core and other tools write
them (comfy-kitchen's NVFP4 quantizer, ``QuantizedTensor.state_dict`` names, QUANTIZATION.md's header), loaded by
the 4-bit loader node on both ComfyUI versions.

- (a) quantized layers listed only in the ``_quantization_metadata`` header (no per-layer ``.comfy_quant``
  tensors): KSampler latents equal those of the dequantized-weight model (1e-6 relative, fp32 on CPU);
- (b) layers with ``pre_quant_scale`` s: equal to the model of weights dequant(W) diag(s) (1e-6); a quantization
  field the pack does not implement is refused, naming the file, the layer and the field;
- (c) a LoRA on bf16 layers of a 4-bit model (modulation, norm_out) equals dequant/bf16 W + dW merged in fp32
  (1e-5 relative, model output), as a LoRA on the 4-bit layers does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from test_nvfp4 import BLOCK_LINEARS, _bf16_node, _forward, _inputs, _loaded, _nvfp4_node, _rel, _run_latents

from dcgen_core.shared.quant import nvfp4
from dcgen_core.shared.checkpoints import owned
from dcgen_core.shared.errors import DCGenError

CORE_PREFIX = "model.diffusion_model."


def _kitchen_quantize(w: torch.Tensor, name: str) -> dict:
    """One layer as core quantizes it (comfy-kitchen's NVFP4 layout) under the names core's state dict uses."""
    from comfy_kitchen.tensor import QuantizedTensor

    qt = QuantizedTensor.from_float(w, nvfp4.LAYOUT)
    return {k: v.contiguous() for k, v in qt.state_dict(f"{name}.weight").items()}


@pytest.fixture(scope="module")
def foreign(comfyui, comfy_models):
    """write(name, form, ...) -> (widget name, fp32 reference state dict); ``form``: "metadata" (layers listed
    only in the header) or "per-layer" (``.comfy_quant`` tensors). The reference is written too (ref_name)."""
    from dcgen_core.flux.comfy_model import read_flux_checkpoint

    src, _, ckpt = read_flux_checkpoint(os.path.join(comfyui.dirs["diffusion_models"], comfy_models.dcgen))
    # a bf16 model, as quantizers receive it
    bf16 = {k: owned(v, torch.float32).to(torch.bfloat16) for k, v in src.items()}
    config = json.dumps(ckpt.config)
    d = comfyui.dirs["diffusion_models"]

    def write(name, form, pre_quant=False, prefix="", conf_extra=None, tensor_extra=None, input_scale=False):
        sd, ref, layers = {}, {}, {}
        g = torch.Generator().manual_seed(5)
        for key, w in sorted(bf16.items()):
            layer = key[: -len(".weight")]
            if layer not in BLOCK_LINEARS or not key.endswith(".weight"):
                sd[prefix + key], ref[key] = w, w.float()
                continue
            w = w.float()
            if pre_quant:  # AWQ-style smoothing: W = W' diag(s), W' stored, x scaled by s before the matmul
                s = (0.5 + 1.5 * torch.rand(w.shape[1], generator=g)).to(torch.bfloat16)
                w = w / s.float()
                sd[f"{prefix}{layer}.pre_quant_scale"] = s
            q = _kitchen_quantize(w, prefix + layer)
            sd.update(q)
            if input_scale:  # the native matmul's activation scale (weight-only compute does not read it)
                sd[f"{prefix}{layer}.input_scale"] = torch.tensor(0.02)
            deq = nvfp4.dequantize(q[f"{prefix}{layer}.weight"], q[f"{prefix}{layer}.weight_scale"],
                                   q[f"{prefix}{layer}.weight_scale_2"])
            ref[key] = deq * sd[f"{prefix}{layer}.pre_quant_scale"].float() if pre_quant else deq
            conf = {"format": "nvfp4", **(conf_extra or {})}
            layers[prefix + layer] = conf
            if form == "per-layer":
                sd[f"{prefix}{layer}.comfy_quant"] = nvfp4.conf_tensor(conf)
        sd.update(tensor_extra or {})
        meta = {"config": config}
        if form == "metadata":
            meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
        save_file(sd, os.path.join(d, name), metadata=meta)
        ref_name = name.replace(".safetensors", "-reference.safetensors")
        save_file(ref, os.path.join(d, ref_name), metadata={"config": config})
        return name, ref_name

    write.path = lambda n: os.path.join(d, n)
    return write


def test_metadata_only_file_samples_like_its_dequantized_weights(comfyui, comfy_models, foreign):
    """(a) A file in QUANTIZATION.md's form (layers in the header only) through the node and KSampler."""
    name, ref_name = foreign("core-meta-nvfp4.safetensors", "metadata")
    ours, _, _ = _run_latents(comfyui, comfy_models, *_nvfp4_node(name), "meta")
    ref, _, _ = _run_latents(comfyui, comfy_models, *_bf16_node(ref_name), "meta-ref")
    err = _rel(ours, ref)
    print(f"metadata-only NVFP4 vs dequantized weights, KSampler latents: relative error {err:.2e}")
    assert err <= 1e-6
    # the same file with core's checkpoint prefix, in its tensors and in the header's layer names
    from dcgen_core.flux.four_bit import load_4bit_flux

    prefixed, _ = foreign("core-meta-prefixed-nvfp4.safetensors", "metadata", prefix=CORE_PREFIX)
    a, b = load_4bit_flux(foreign.path(prefixed)), load_4bit_flux(foreign.path(name))
    assert sum(nvfp4.is_quantized(p) for p in a.model.diffusion_model.parameters()) == len(BLOCK_LINEARS)
    x, cond, pooled = _inputs()
    assert _rel(_forward(a, x, cond, pooled), _forward(b, x, cond, pooled)) <= 1e-7


def test_pre_quant_scale_is_applied(comfyui, comfy_models, foreign):
    """(b) Every block linear with pre_quant_scale s: the model of dequant(W) diag(s), through the node and
    KSampler, in the per-layer form and in the header-only form (there with the other fields the pack implements:
    input_scale, full_precision_matrix_mult)."""
    for form in ("per-layer", "metadata"):
        name, ref_name = foreign(f"core-pqs-{form}-nvfp4.safetensors", form, pre_quant=True,
                                 input_scale=form == "metadata",
                                 conf_extra={"full_precision_matrix_mult": True} if form == "metadata" else None)
        ours, _, _ = _run_latents(comfyui, comfy_models, *_nvfp4_node(name), f"pqs-{form}")
        ref, _, _ = _run_latents(comfyui, comfy_models, *_bf16_node(ref_name), f"pqs-{form}-ref")
        err = _rel(ours, ref)
        print(f"pre_quant_scale ({form}) vs dequant(W) diag(s), KSampler latents: relative error {err:.2e}")
        assert err <= 1e-6, form


def test_unimplemented_quantization_fields_are_refused(comfyui, foreign):
    """(b) Fields the pack does not implement are refused by name, not loaded and silently ignored."""
    from dcgen_core.flux.four_bit import load_4bit_flux

    layer = "double_blocks.0.img_mlp.0"
    cases = [
        (foreign("core-conf-extra-nvfp4.safetensors", "per-layer", conf_extra={"convrot": True})[0], "convrot"),
        (foreign("core-meta-conf-extra-nvfp4.safetensors", "metadata", conf_extra={"group_size": 32})[0],
         "group_size"),
        (foreign("core-tensor-extra-nvfp4.safetensors", "per-layer",
                 tensor_extra={f"{layer}.weight_zero_point": torch.zeros(128)})[0], "weight_zero_point"),
    ]
    for name, field in cases:
        path = foreign.path(name)
        with pytest.raises(DCGenError) as e:
            load_4bit_flux(path)
        msg = str(e.value)
        assert path in msg and "expected" in msg and "found" in msg, msg
        assert f"'{field}'" in msg and "does not implement" in msg, msg
    # a documented field of the wrong shape
    bad, _ = foreign("core-pqs-shape-nvfp4.safetensors", "per-layer",
                     tensor_extra={f"{layer}.pre_quant_scale": torch.ones(3)})
    with pytest.raises(DCGenError, match=rf"'{layer}.pre_quant_scale'.*\[32\]"):
        load_4bit_flux(foreign.path(bad))


MODULATION_LORA = ("double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin",
                   "single_blocks.1.modulation.lin")


def test_lora_on_bf16_layers_of_a_4bit_model_is_exact(comfyui, comfy_models, foreign):
    """(c) A LoRA on the bf16 modulation linears (and norm_out, whose halves BFL swaps) of a 4-bit model: equal to
    the fp32 merge dequant/bf16 W + dW, as on the 4-bit layers (no rounding of W + dW to bf16)."""
    name, ref_name = foreign("core-lora-nvfp4.safetensors", "per-layer")
    g = torch.Generator().manual_seed(9)
    lora = {}
    for module, (out_f, in_f) in {**{m: (6 * 32 if "double" in m else 3 * 32, 32) for m in MODULATION_LORA},
                                  "transformer.norm_out.linear": (64, 32)}.items():
        lora[f"{module}.lora_A.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        lora[f"{module}.lora_B.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        lora[f"{module}.alpha"] = torch.tensor(8.0)
    lora_name = "modulation-lora.safetensors"
    save_file(lora, os.path.join(comfyui.dirs["loras"], lora_name))

    def with_lora(node, key, apply=True):
        nodes, ref = node
        if apply:
            nodes = {**nodes, "lora": {"class_type": "DCGenLoraLoader", "inputs": {
                "model": ref, "lora_name": lora_name, "strength_model": 1.0}}}
            ref = ["lora", 0]
        return _loaded(comfyui, nodes, ref, key)

    quant = with_lora(_nvfp4_node(name), "mod-q")
    merged = with_lora(_bf16_node(ref_name), "mod-ref")
    without = with_lora(_nvfp4_node(name), "mod-none", apply=False)
    terms = quant.model_options["transformer_options"]["dcgen_low_rank"]
    assert set(terms) == {*MODULATION_LORA, "final_layer.adaLN_modulation.1"} and not quant.patches
    x, cond, pooled = _inputs()
    out = _forward(quant, x, cond, pooled)
    err = _rel(out, _forward(merged, x, cond, pooled))
    print(f"LoRA on bf16 layers of a 4-bit model vs fp32 merge: relative error {err:.2e}")
    assert _rel(out, _forward(without, x, cond, pooled)) > 1e-2
    assert err <= 1e-5
