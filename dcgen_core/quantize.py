"""Quantize a DC-Gen (or base FLUX) transformer to one NVFP4 safetensors file.

    python -m dcgen_core.quantize IN OUT --format nvfp4 [--quantize-modulation] [--scaling-factor S]

IN is any layout the pack loads (single safetensors with diffusers or BFL keys, a diffusers folder, sharded).
OUT is ComfyUI's NVFP4 checkpoint format (see :mod:`dcgen_core.nvfp4`) under BFL keys, so core ComfyUI
versions that read NVFP4 load it too; the DC-Gen facts (latent channels, spatial compression, scaling, time
shift rule) go into the header under ``dcgen``. Block linears are quantized one at a time with comfy-kitchen
(CUDA when present, eager on CPU); embedder, head, text/time/guidance inputs, norms and (by default) the
modulation linears are written in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import nvfp4
from .checkpoints import owned
from .errors import DCGenError
from .flux import dcgen_channels, read_flux_checkpoint
from .flux_4bit import METADATA_KEY
from .latent_space import DEFAULT_SCALING, SPATIAL_COMPRESSION
from .schedules import rule_for_channels

FORMATS = ("nvfp4",)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgen_core.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="transformer: .safetensors (diffusers/BFL keys) or diffusers folder")
    parser.add_argument("output", help="output .safetensors (put it in ComfyUI/models/diffusion_models)")
    parser.add_argument("--format", default="nvfp4", choices=FORMATS)
    parser.add_argument("--quantize-modulation", action="store_true",
                        help="also quantize the modulation linears (a quarter of FLUX's weights): file about 0.3x "
                             "bf16 instead of about 0.5x, at some cost in accuracy")
    parser.add_argument("--scaling-factor", type=float, default=None,
                        help="DC-AE latent scaling factor written to the header (default: the DC-Gen default for "
                             "the model's channel count)")
    parser.add_argument("--device", default=None, help="where to quantize (default: cuda if present, else cpu)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists (pass --overwrite)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        report = quantize_flux(args.input, args.output, args.format, args.quantize_modulation,
                               args.scaling_factor, args.device)
    except DCGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {report['layers']} NVFP4 layers, {report['bytes'] / 2**20:.1f} MiB, "
          f"worst layer relative error {report['worst_layer_relative_error']:.3f} ({report['worst_layer']}), "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
