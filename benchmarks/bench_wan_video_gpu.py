"""Full-size DC-Gen-Wan2.1 video benchmarks for a GPU machine (one command, sized for one device check).

    python benchmarks/bench_wan_video_gpu.py            # CUDA, bf16: DC-AE-V f32t4c32 decode at 704x1280 for
                                                        # 40 / 80 / 160 frames, chunked and one pass; Wan2.1-14B
                                                        # width, 2 blocks, 720x1280 x 81 frames, base vs DC-Gen
    python benchmarks/bench_wan_video_gpu.py --dry-run  # the same script on CPU at reduced size (what CI runs)

It prints the tables of bench_wan_video.py: decode peak memory (chunked should stay flat in frames, one pass
grows with them; a one-pass case that does not fit is reported as failed, which is the point) and the DiT step
time ratio beside the token and FLOP ratios (target: time ratio >= 90% of the FLOP ratio).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_wan_video  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        return bench_wan_video.main(["--dry-run", "--frames", "40,80", "--size", "64x96", "--dit-size", "128x224",
                                     "--dit-frames", "9", "--dit-width", "narrow", "--repeats", "1"])
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_wan_video_gpu.py: expected a CUDA device, found none (use --dry-run on CPU).")
    return bench_wan_video.main(["--device", "cuda", "--dtype", "bf16", "--full", "--frames", "40,80,160",
                                 "--modes", "chunked,one-pass", "--size", "704x1280", "--dit-size", "720x1280",
                                 "--dit-frames", "81", "--depth", "2", "--repeats", "3", *argv])


if __name__ == "__main__":
    main()
