"""The NVFP4 quantizer: a state dict's block linears to ComfyUI's NVFP4 entries (e2m1 codes, fp8 block scales, the
per-tensor scale and ``comfy_quant``), one layer at a time, through comfy-kitchen (CUDA when present, eager on CPU).
Which layers are quantized is :func:`nvfp4.should_quantize`; a family's quantizer reads its checkpoint and writes
the file (FLUX: flux/quantize.py)."""

from __future__ import annotations

import torch

from ..checkpoints import owned
from . import nvfp4


FORMATS = ("nvfp4",)


def quantize_state_dict(sd: dict, quantize_modulation: bool = False, device: str = "cpu", progress=None):
    """(file state dict, {layer: conf}, (worst per-layer relative error, layer)) of a BFL FLUX state dict whose
    values are tensors, mapped views or lazy fused tensors; ``sd`` is emptied as it goes (one layer at a time)."""
    out, layers, worst = {}, {}, (0.0, None)
    for key in sorted(sd):
        value = sd.pop(key)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is not None and nvfp4.should_quantize(module, value.shape, quantize_modulation):
            w = owned(value, torch.float32).to(device)
            codes, block, tensor_scale = nvfp4.quantize(w)
            err = ((nvfp4.dequantize(codes, block, tensor_scale) - w).norm() / w.norm().clamp_min(1e-30)).item()
            worst = max(worst, (err, module), key=lambda e: e[0])
            out[key] = codes
            out[f"{module}.weight_scale"] = block
            out[f"{module}.weight_scale_2"] = tensor_scale
            out[f"{module}{nvfp4.QUANT_CONF_SUFFIX}"] = nvfp4.conf_tensor({"format": nvfp4.FORMAT}).to(codes.device)
            layers[module] = {"format": nvfp4.FORMAT}
            del w
        else:
            out[key] = owned(value, torch.bfloat16)
        if progress is not None:
            progress.update(1)
    return out, layers, worst
