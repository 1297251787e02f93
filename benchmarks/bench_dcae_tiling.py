"""Tiled vs untiled DC-AE decode: peak memory and time, full-size DC-AE-1.5 f64c128 decoder (random weights).

Each (size, untiled/tiled) case runs in a fresh subprocess that builds the
decoder (the real DC-AE-1.5 f64c128 widths and depths from
dcgen_core.shared.dcae.VARIANTS, 408 M parameters), then measures one decode of a
random latent under torch.inference_mode():

- CPU: peak resident memory, VmHWM from /proc/self/status, reset to the
  current RSS after the model and the latent are built (clear_refs 5), so
  "peak - baseline" is what the decode itself added; the absolute VmHWM is
  printed too.
- CUDA (``--device cuda --dtype bf16``, for a GPU machine): torch.cuda.max_memory_allocated,
  minus memory_allocated after the build (the caching allocator's reserve is
  not counted).

Cases whose estimated need (dcgen_core.shared.dcae.estimate_decode_bytes + weights)
exceeds ``--mem-fraction`` of the memory available (MemAvailable on CPU, free
device memory on CUDA) are skipped with the reason printed.

A tiled decode's peak is one tile's activations plus the full-size output
and weight buffers, reached at the first tile; ``--max-tiles N`` stops a tiled
case after N tiles and extrapolates its time (first tile + the rest at the
mean of tiles 2..N), which keeps the default run short on a 2-core CPU.
``--max-tiles 0`` runs every tile. A case whose time, predicted from the
previous case of its mode (untiled: 4x per doubling of the side), exceeds
``--max-case-seconds`` is skipped too, with the prediction printed.

    python benchmarks/bench_dcae_tiling.py                       # CPU fp32, 1024/2048/4096
    python benchmarks/bench_dcae_tiling.py --sizes 2048 --modes untiled --max-case-seconds 0
    python benchmarks/bench_dcae_tiling.py --device cuda --dtype bf16 --sizes 2048,4096,8192 \\
        --tile 2048 --overlap 512 --max-tiles 0
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcgen_core.shared.dcae import VARIANTS, estimate_decode_bytes  # noqa: E402
from dcgen_core.shared.dcae.tiling import available_ram, decode_tiled, tile_count  # noqa: E402

from common import random_dcae_decoder  # noqa: E402  (this script's folder is on sys.path)

VARIANT = "dc-ae-1.5-f64c128"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1e9


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class _Stop(Exception):
    pass


def worker(a) -> dict:
    """One case in this (fresh) process; returns the measurements."""
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    f = VARIANTS[VARIANT].spatial_compression
    n = a.size // f
    t0 = time.perf_counter()
    dcae = random_dcae_decoder(VARIANTS[VARIANT], device, dtype)
    z = torch.randn(1, VARIANTS[VARIANT].latent_channels, n, n, generator=torch.Generator().manual_seed(1)).to(
        device, dtype)
    build_s = time.perf_counter() - t0
    gc.collect()
    cuda = device.type == "cuda"
    hwm_reset = False
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            hwm_reset = True
        except OSError:
            pass
        baseline = _status_kb("VmRSS") if hwm_reset else _status_kb("VmHWM")

    stamps = []
    total = tile_count((n, n), a.tile // f, a.overlap // f) if a.mode == "tiled" else 1

    def progress(done, _total):
        if cuda:
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        if a.max_tiles and done >= a.max_tiles and done < _total:
            raise _Stop

    with torch.inference_mode():
        start = time.perf_counter()
        try:
            if a.mode == "tiled":
                out = decode_tiled(dcae, z, a.tile // f, a.overlap // f, progress=progress)
            else:
                out = dcae.decoder(z)
            if cuda:
                torch.cuda.synchronize(device)
            ran = total
        except _Stop:
            ran = len(stamps)
        seconds = time.perf_counter() - start
        out = None  # noqa: F841

    if cuda:
        peak_abs = torch.cuda.max_memory_allocated(device)
    else:
        peak_abs = _status_kb("VmHWM")
    if ran < total:
        times = [stamps[0] - start] + [b - a_ for a_, b in itertools.pairwise(stamps)]
        rest = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
        extrapolated = times[0] + (total - 1) * rest
    else:
        extrapolated = seconds
    return {"size": a.size, "mode": a.mode, "tiles_run": ran, "tiles_total": total, "seconds": seconds,
            "extrapolated": extrapolated, "build_s": build_s, "baseline": baseline, "peak_abs": peak_abs,
            "peak": peak_abs - baseline, "hwm_reset": hwm_reset}


def _available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    ram = available_ram()
    if ram is None:
        raise SystemExit("bench_dcae_tiling: cannot read the available RAM (no psutil, no /proc/meminfo)")
    return ram


def _decoder_parameters() -> int:
    from dcgen_core.shared.dcae.model import Decoder

    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(VARIANTS[VARIANT]).parameters())


def _activation_estimate(a, size: int, mode: str, dtype: torch.dtype) -> int:
    """Estimated bytes a case adds beyond its baseline: estimate_decode_bytes (+ the tiled output buffers)."""
    cfg = VARIANTS[VARIANT]
    f = cfg.spatial_compression
    if mode == "untiled":
        return estimate_decode_bytes(cfg, (1, cfg.latent_channels, size // f, size // f), dtype)
    t = min(a.tile, size) // f
    buffers = (cfg.in_channels + 1) * size * size * 4  # float32 output + weight sum
    return estimate_decode_bytes(cfg, (1, cfg.latent_channels, t, t), dtype) + buffers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048,4096", help="image sizes (square), multiples of 64")
    ap.add_argument("--modes", default="untiled,tiled")
    ap.add_argument("--tile", type=int, default=512, help="tile edge in image pixels (multiple of 64)")
    ap.add_argument("--overlap", type=int, default=128, help="tile overlap in image pixels (multiple of 64)")
    ap.add_argument("--max-tiles", type=int, default=2, help="stop a tiled case after this many tiles (0: all)")
    ap.add_argument("--max-case-seconds", type=float, default=300,
                    help="skip a case whose time, predicted from the previous case of its mode, exceeds this (0: no limit)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--mem-fraction", type=float, default=0.7,
                    help="skip a case whose estimate exceeds this fraction of the available memory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return

    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    cfg = VARIANTS[VARIANT]
    f = cfg.spatial_compression
    sizes = [int(s) for s in a.sizes.split(",")]
    modes = a.modes.split(",")
    for v, name in [(a.tile, "--tile"), (a.overlap, "--overlap"), *[(s, "--sizes") for s in sizes]]:
        if v % f:
            sys.exit(f"{name}: expected multiples of {f}, found {v}")
    print(f"DC-AE decode benchmark: {VARIANT} decoder, full size (widths {cfg.decoder_block_out_channels}, "
          f"depths {cfg.decoder_layers_per_block}), random weights, {a.device} {a.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "tiled" in modes:
        print(f"tiled: tile {a.tile} px ({a.tile // f} latent), overlap {a.overlap} px ({a.overlap // f} latent), "
              + (f"stopped after {a.max_tiles} tiles, time extrapolated" if a.max_tiles else "all tiles"))
    metric = "max_memory_allocated" if device.type == "cuda" else "VmHWM"
    weights = _decoder_parameters() * torch.empty((), dtype=dtype).element_size()
    rows = []
    untiled_rate = None  # seconds per latent pixel of the last untiled case
    tile_seconds = None  # seconds per tile of the last tiled case

    def skip(size, mode, est, reason):
        print(f"{size}x{size} {mode}: skipped, {reason}", flush=True)
        rows.append({"size": size, "mode": mode, "skipped": reason, "est": est})

    for size in sizes:
        n = size // f
        for mode in modes:
            est = _activation_estimate(a, size, mode, dtype)
            avail = _available(device)
            label = f"{size}x{size} {mode}"
            if weights + est > a.mem_fraction * avail:
                skip(size, mode, est, f"needs ~{(weights + est) / GB:.1f} GB (weights {weights / GB:.1f} + "
                                      f"activations {est / GB:.1f}, estimated) > {a.mem_fraction:.0%} of "
                                      f"{avail / GB:.1f} GB available")
                continue
            if mode == "untiled":
                predicted = untiled_rate * n * n if untiled_rate else None
            else:
                total = tile_count((n, n), a.tile // f, a.overlap // f)
                run = total if not a.max_tiles else min(total, a.max_tiles)
                predicted = tile_seconds * run if tile_seconds else None
            if a.max_case_seconds and predicted and predicted > a.max_case_seconds:
                skip(size, mode, est, f"predicted ~{predicted:.0f} s from the previous {mode} case > "
                                      f"--max-case-seconds {a.max_case_seconds:.0f}")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", str(size), "--mode", mode,
                   "--tile", str(a.tile), "--overlap", str(a.overlap), "--max-tiles", str(a.max_tiles),
                   "--device", a.device, "--dtype", a.dtype]
            t = time.perf_counter()
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                skip(size, mode, est, f"failed (exit {proc.returncode}): {' | '.join(tail)}")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            r.update(wall=wall, est=est)
            rows.append(r)
            if mode == "untiled":
                untiled_rate = r["seconds"] / (n * n)
            else:
                tile_seconds = r["extrapolated"] / r["tiles_total"]
            part = (f", {r['tiles_run']}/{r['tiles_total']} tiles run, all tiles ~{r['extrapolated']:.0f} s"
                    if r["tiles_run"] < r["tiles_total"] else "")
            print(f"{label}: decode {r['seconds']:.1f} s{part}; peak +{r['peak'] / GB:.2f} GB over baseline "
                  f"{r['baseline'] / GB:.2f} GB ({metric} {r['peak_abs'] / GB:.2f} GB); process wall {wall:.0f} s "
                  f"(build {r['build_s']:.0f} s)", flush=True)

    print()
    print(f"| size | mode | tiles | decode time (s) | peak over baseline (GB) | {metric} absolute (GB) | "
          f"estimated activations (GB) | case wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['size']} | {r['mode']} | | skipped: {r['skipped']} | | | {r['est'] / GB:.2f} | |")
            continue
        tiles = "1" if r["mode"] == "untiled" else f"{r['tiles_run']}/{r['tiles_total']}"
        secs = (f"{r['seconds']:.1f}" if r["tiles_run"] == r["tiles_total"]
                else f"~{r['extrapolated']:.0f} (extrapolated; {r['seconds']:.1f} for {r['tiles_run']} tiles)")
        print(f"| {r['size']} | {r['mode']} | {tiles} | {secs} | {r['peak'] / GB:.2f} | {r['peak_abs'] / GB:.2f} | "
              f"{r['est'] / GB:.2f} | {r['wall']:.0f} |")
    note = "" if all(r.get("hwm_reset", True) for r in rows) else " (VmHWM could not be reset: baseline = VmHWM)"
    print(f"\nbaseline = the worker process after the decoder ({weights / GB:.2f} GB of weights) and the latent are "
          f"built{note}; estimated activations = estimate_decode_bytes of the whole latent (untiled) or of one "
          f"tile plus the float32 output and weight buffers (tiled).")


if __name__ == "__main__":
    main()
