"""Write a safetensors copy of the authors' DC-AE-V ``.pt`` (read with ``torch.load(weights_only=True)`` only).

    python -m dcgen_core.convert dc-ae-v-f32t4c32-1.0-bf16.pt [OUT.safetensors] [--overwrite]

OUT defaults to the same name with ``.safetensors``: put it beside the ``.pt`` in ComfyUI/models/vae and Load
DC-AE-V VAE prefers it (memory-mapped, no unpickling). The tensors are written unchanged (dtype, names), the
variant and scaling factor go into the header.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..shared.dcae_v.loader import PICKLE_EXTENSIONS, infer_config, read_pt_state_dict
from ..shared.errors import DCGenError


def convert_dcae_v(src: str, dst: str) -> dict:
    from safetensors.torch import save_file

    sd = read_pt_state_dict(src)
    cfg = infer_config(sd, src)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    meta = {"dcgen_variant": cfg.variant, "format": "dc-ae-v", "source": os.path.basename(src),
            "config": json.dumps({"latent_channels": cfg.latent_channels, "widths": list(cfg.widths),
                                  "depths": list(cfg.depths), "chunk_frames": cfg.chunk_frames,
                                  "scaling_factor": cfg.scaling_factor})}
    tmp = dst + ".partial"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, dst)
    return {"variant": cfg.variant, "tensors": len(tensors), "bytes": os.path.getsize(dst)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgen_core.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="the authors' DC-AE-V checkpoint (.pt)")
    parser.add_argument("output", nargs="?", help="output .safetensors (default: beside the input, same name)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not args.input.endswith(PICKLE_EXTENSIONS):
        print(f"error: {args.input}: expected the authors' .pt checkpoint, found "
              f"'{os.path.splitext(args.input)[1] or 'no extension'}'", file=sys.stderr)
        return 2
    out = args.output or os.path.splitext(args.input)[0] + ".safetensors"
    if os.path.exists(out) and not args.overwrite:
        print(f"error: {out} exists (pass --overwrite)", file=sys.stderr)
        return 2
    try:
        report = convert_dcae_v(args.input, out)
    except DCGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {report['variant']}, {report['tensors']} tensors, {report['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
