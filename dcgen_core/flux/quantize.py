"""Quantize a DC-Gen (or base FLUX) transformer to one NVFP4 safetensors file (``python -m dcgen_core.quantize``).

IN is any layout the pack loads; OUT is ComfyUI's NVFP4 checkpoint format under BFL keys, so core ComfyUI versions
that read NVFP4 load it too; the DC-Gen facts (latent channels, spatial compression, scaling, time shift rule) go
into the header under ``dcgen`` (read back by four_bit.py)."""

from __future__ import annotations

import json
import os
import sys

import torch

from ..shared.errors import DCGenError
from ..shared.latent_space import DEFAULT_SCALING, SPATIAL_COMPRESSION
from ..shared.quant.quantize import FORMATS, quantize_state_dict
from ..shared.schedules import rule_for_channels
from .comfy_model import dcgen_channels, read_flux_checkpoint
from .four_bit import METADATA_KEY


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm ships with ComfyUI's requirements
        class _Plain:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Plain()


def quantize_flux(src: str, dst: str, fmt: str = "nvfp4", quantize_modulation: bool = False,
                  scaling_factor: float | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Write ``src`` quantized to ``dst``; returns a report (layers, bytes, worst per-layer relative error)."""
    if fmt not in FORMATS:
        raise DCGenError(f"--format: expected one of {list(FORMATS)}, found '{fmt}'.")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise DCGenError(f"{dst}: expected an output path other than the input.")
    sd, cfg, ckpt = read_flux_checkpoint(src)  # refuses 4-bit files
    if any(getattr(v, "dtype", None) in (
            torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2) for v in sd.values()):
        raise DCGenError(f"{src}: expected a bf16/fp16/fp32 transformer to quantize, found an already quantized "
                         "file (uint8 / fp8 tensors).")
    channels = dcgen_channels(cfg, src)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bar = _progress(len(sd), f"NVFP4 {os.path.basename(src.rstrip('/'))}") if progress else None
    out, layers, worst = quantize_state_dict(sd, quantize_modulation, device, bar)
    out = {k: v.cpu() for k, v in out.items()}
    if bar is not None:
        bar.close()
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
                "format": "pt"}
    if ckpt.config:
        metadata["config"] = json.dumps(ckpt.config)
    if channels is not None:
        metadata[METADATA_KEY] = json.dumps({
            "latent_channels": channels, "spatial_compression": SPATIAL_COMPRESSION[channels],
            "scaling_factor": float(scaling_factor or DEFAULT_SCALING[channels]),
            "time_shift_rule": rule_for_channels(channels), "source": os.path.basename(src.rstrip("/")),
        })
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".partial"
    save_file(out, tmp, metadata=metadata)
    os.replace(tmp, dst)  # never leave a truncated file under the final name
    return {"layers": len(layers), "tensors": len(out), "bytes": os.path.getsize(dst), "dcgen_channels": channels,
            "worst_layer_relative_error": worst[0], "worst_layer": worst[1]}
