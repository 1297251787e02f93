"""Quantize a DC-Gen (or base FLUX) transformer to one NVFP4 safetensors file.

    python -m dcgen_core.quantize IN OUT --format nvfp4 [--quantize-modulation] [--scaling-factor S]

IN is any layout the pack loads (single safetensors with diffusers or BFL keys, a diffusers folder, sharded).
OUT is ComfyUI's NVFP4 checkpoint format (see :mod:`dcgen_core.shared.quant.nvfp4`) under BFL keys, so core ComfyUI
versions that read NVFP4 load it too; the DC-Gen facts (latent channels, spatial compression, scaling, time
shift rule) go into the header under ``dcgen``. Block linears are quantized one at a time with comfy-kitchen
(CUDA when present, eager on CPU); embedder, head, text/time/guidance inputs, norms and (by default) the
modulation linears are written in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..flux.quantize import quantize_flux
from ..shared.errors import DCGenError
from ..shared.quant.quantize import FORMATS


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
