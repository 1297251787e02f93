"""DC-Gen-Wan2.1 video: DC-AE-V decode memory vs clip length, and DiT step time vs base Wan2.1, side by side.

Part 1, ``decode``: peak memory of one DC-AE-V decode, chunked (the pack: 10 latent frames per chunk, feature
cache) and as one pass over the whole clip (what the memory would be without chunking), for growing clip
lengths. Each case runs in a fresh subprocess (random weights): CPU peak = VmHWM after a reset to the current RSS
(clear_refs 5) minus that RSS; CUDA peak = max_memory_allocated minus memory_allocated after the build. Chunked
should be flat in frames; one-pass grows linearly.

Part 2, ``dit``: one denoising step (one forward) of core's WanModel at Wan2.1-14B width (dim 5120, 40 heads, ffn
13824, 512 text tokens) and reduced depth, on base Wan2.1's tokens (Wan VAE 1/8 x 1/4, 16 channels, patch 1x2x2)
and on DC-Gen-Wan's (DC-AE-V 1/32 x 1/4 with the authors' floor of frames to a multiple of 4, 32 channels, patch
from ``--dcgen-patch``; the release's config.json says it, 1x1x1 assumed here). Both models are built in one
process and timed alternately (best of the rounds, wall and CPU clocks), beside the token and FLOP ratios (the FLOP
count includes the fixed text parts: cross-attention k/v and the text embedding). The CPU default, 720x64 x 81
frames, keeps 720p 81 frames' exact token ratio (21x45x4 = 3780 vs 20x22x2 = 880 tokens: both width axes cut by
20) so that compute dominates and a step stays within ~30 s.

    python benchmarks/bench_wan_video.py --parts decode     # CPU: narrow DC-AE-V, a few seconds a case
    python benchmarks/bench_wan_video.py --parts dit        # CPU: 14B width, 1 block, 720p's token ratio
    python benchmarks/bench_wan_video.py --device cuda --dtype bf16 --full \\
        --frames 40,80,160 --size 720x1280 --dit-size 720x1280 --dit-frames 81 --depth 2   # a GPU machine
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcgen_core.shared.dcae_v import VARIANTS, DCAEV, DCAEVConfig, decode_video  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WAN14B = dict(dim=5120, num_heads=40, ffn_dim=13824, text_dim=4096, freq_dim=256)
TEXT_TOKENS = 512


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _vae_config(full: bool) -> DCAEVConfig:
    if full:
        return VARIANTS["dc-ae-v-f32t4c32"]
    return DCAEVConfig("dc-ae-v-f32t4c32-narrow", 32, (8, 16, 32, 32, 64, 64, 64), (0, 5, 10, 4, 4, 4, 4))


def decode_worker(a) -> dict:
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    h, w = (int(v) for v in a.size.split("x"))
    model = DCAEV(_vae_config(a.full)).to(device, dtype).eval()
    z = torch.randn(1, 32, a.frames // 4, h // 32, w // 32).to(device, dtype)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        baseline = _status_kb("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        out = decode_video(model, z) if a.mode == "chunked" else model.decoder(z)
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    out_bytes = out.numel() * out.element_size()
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _status_kb("VmHWM")) - baseline
    return {"frames": a.frames, "mode": a.mode, "peak": peak, "output": out_bytes, "seconds": seconds}


def _dit_grid(which: str, frames: int, h: int, w: int, patch) -> tuple[tuple[int, int, int], int, int]:
    """(latent grid, channels, tokens) of one clip: base Wan2.1 on Wan-VAE latents (16 ch, 1 + (F-1)/4 frames, 1/8),
    DC-Gen-Wan on DC-AE-V latents (32 ch, F//4 frames as the authors floor, 1/32)."""
    if which == "base":
        channels, grid = 16, ((frames - 1) // 4 + 1, h // 8, w // 8)
    else:
        channels, grid = 32, (frames // 4, h // 32, w // 32)
    tokens = grid[0] // patch[0] * (grid[1] // patch[1]) * (grid[2] // patch[2])
    return grid, channels, tokens


def dit_flops(tokens: int, channels: int, patch, depth: int, dims: dict) -> float:
    """FLOPs of one WanModel forward: per block self-attention (qkvo) + FFN + cross-attention (q, o on the tokens,
    k, v on the text) + the attention products; the text and time embeddings, patch embedding and head once."""
    d, m, n, ptch = dims["dim"], dims["ffn_dim"], TEXT_TOKENS, patch[0] * patch[1] * patch[2]
    block = tokens * (4 * d * d + 2 * d * m + 2 * d * d) + n * 2 * d * d + 2 * tokens * tokens * d + 2 * tokens * n * d
    once = n * (dims["text_dim"] * d + d * d) + 2 * tokens * channels * ptch * d + d * 6 * d
    return 2.0 * (depth * block + once)


def dit_worker(a) -> dict:
    """Base Wan2.1 and DC-Gen-Wan, one forward each, timed alternately in one process (best of the rounds)."""
    from dcgen_core.tools.headless import boot

    boot(cpu=a.device == "cpu")
    import comfy.ldm.wan.model as wm
    import comfy.ops

    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    h, w = (int(v) for v in a.dit_size.split("x"))
    dims = WAN14B if a.dit_width == "14b" else dict(dim=1024, num_heads=8, ffn_dim=2816, text_dim=4096, freq_dim=256)
    patches = {"base": (1, 2, 2), "dcgen": tuple(int(p) for p in a.dcgen_patch.split(","))}
    ctx = torch.randn(1, TEXT_TOKENS, dims["text_dim"], device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    cases = {}
    for which, patch in patches.items():
        grid, channels, tokens = _dit_grid(which, a.dit_frames, h, w, patch)
        torch.manual_seed(0)
        model = wm.WanModel(model_type="t2v", patch_size=patch, in_dim=channels, out_dim=channels,
                            num_layers=a.depth, operations=comfy.ops.disable_weight_init, **dims)
        with torch.no_grad():
            for p_ in model.parameters():
                p_.normal_(0.0, 0.02)
        model = model.to(device, dtype).eval()
        x = torch.randn(1, channels, *grid, device=device, dtype=dtype)
        cases[which] = dict(model=model, x=x, grid=list(grid), tokens=tokens,
                            flops=dit_flops(tokens, channels, patch, a.depth, dims), wall=[], cpu=[])

    def step(c):
        with torch.inference_mode():
            c["model"](c["x"], t, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for c in cases.values():
        step(c)  # warm-up
    start = time.perf_counter()
    for r in range(a.repeats):  # alternate, so neither pays for running first or for a busier moment
        for c in (cases.values() if r % 2 == 0 else reversed(list(cases.values()))):
            w0, c0 = time.perf_counter(), time.process_time()
            step(c)
            c["wall"].append(time.perf_counter() - w0)
            c["cpu"].append(time.process_time() - c0)
        if a.budget_s and time.perf_counter() - start > a.budget_s:
            break
    return {k: {"tokens": c["tokens"], "grid": c["grid"], "flops": c["flops"], "seconds": min(c["wall"]),
                "cpu_seconds": min(c["cpu"]), "rounds": len(c["wall"])} for k, c in cases.items()}


def _run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not line:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"case {' '.join(args)} failed: {last[:300]}")
        return None
    return json.loads(line[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--full", action="store_true", help="full widths (DC-AE-V f32t4c32, Wan2.1-14B); GPU")
    p.add_argument("--dry-run", action="store_true", help="CPU sizes that run in seconds (the default sizes)")
    p.add_argument("--parts", default="decode,dit")
    p.add_argument("--frames", default="40,80,160", help="clip lengths of the decode part")
    p.add_argument("--size", default="128x192", help="HxW of the decode part")
    p.add_argument("--modes", default="chunked,one-pass")
    p.add_argument("--dit-size", default="720x64", help="HxW of the DiT part (720x64: 720p's token ratio at 1/20 of "
                   "its width: both models' width axes divide by 20, heights and frames as 720p 81 frames)")
    p.add_argument("--dit-frames", type=int, default=81)
    p.add_argument("--dit-width", default="14b", choices=["14b", "narrow"],
                   help="14b: Wan2.1-14B width (dim 5120, 40 heads, ffn 13824); narrow: dim 1024")
    p.add_argument("--dcgen-patch", default="1,1,1")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=0.0, help="DiT part: no new round after this many seconds")
    p.add_argument("--worker", choices=["decode", "dit"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--which", help=argparse.SUPPRESS)
    p.add_argument("--one-frames", type=int, dest="frames_one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "decode":
        a.frames = a.frames_one
        print(json.dumps(decode_worker(a)))
        return
    if a.worker == "dit":
        print(json.dumps(dit_worker(a)))
        return
    common = ["--device", a.device, "--dtype", a.dtype] + (["--full"] if a.full else [])
    parts = a.parts.split(",")
    if "decode" in parts:
        print(f"DC-AE-V decode, {a.size}, {'full' if a.full else 'narrow (widths / 16)'} widths, "
              f"{a.device} {a.dtype}: peak memory above the model and latent")
        print(f"{'frames':>7} | {'chunked MiB':>12} | {'one-pass MiB':>12} | {'one-pass / chunked':>18} | "
              f"{'output MiB':>10}")
        for frames in (int(f) for f in a.frames.split(",")):
            row = {}
            for mode in a.modes.split(","):
                row[mode] = _run(["--worker", "decode", "--mode", mode, "--one-frames", str(frames), "--size",
                                  a.size, *common])
            c, o = row.get("chunked"), row.get("one-pass")
            out = (c or o or {}).get("output", float("nan"))
            print(f"{frames:>7} | {c['peak'] / 2**20 if c else float('nan'):>12.1f} | "
                  f"{o['peak'] / 2**20 if o else float('nan'):>12.1f} | "
                  f"{(o['peak'] / c['peak']) if c and o else float('nan'):>17.2f}x | {out / 2**20:>10.1f}")
    if "dit" in parts:
        res = _run(["--worker", "dit", "--dit-size", a.dit_size, "--dit-frames", str(a.dit_frames), "--dcgen-patch",
                    a.dcgen_patch, "--depth", str(a.depth), "--repeats", str(a.repeats), "--dit-width", a.dit_width,
                    "--budget-s", str(a.budget_s), "--device", a.device, "--dtype", a.dtype])
        if res is None:
            return
        b, d = res["base"], res["dcgen"]
        width = "Wan2.1-14B (dim 5120, 40 heads, ffn 13824)" if a.dit_width == "14b" else "dim 1024"
        print(f"\nDiT step (one forward), {a.dit_size} x {a.dit_frames} frames, {width}, {a.depth} block(s), "
              f"{TEXT_TOKENS} text tokens, {a.device} {a.dtype}; DC-Gen-Wan patch {a.dcgen_patch}; "
              f"best of {b['rounds']} alternating rounds")
        print(f"{'model':>12} | {'latent grid':>13} | {'tokens':>7} | {'GFLOP':>8} | {'step s':>8} | {'CPU s':>8}")
        for name, r in (("Wan2.1", b), ("DC-Gen-Wan", d)):
            grid = "x".join(str(g) for g in r["grid"])
            print(f"{name:>12} | {grid:>13} | {r['tokens']:>7} | {r['flops'] / 1e9:>8.1f} | {r['seconds']:>8.3f} | "
                  f"{r['cpu_seconds']:>8.3f}")
        tok, flop = b["tokens"] / d["tokens"], b["flops"] / d["flops"]
        wall, cpu = b["seconds"] / d["seconds"], b["cpu_seconds"] / d["cpu_seconds"]
        print(f"ratios base / DC-Gen: tokens {tok:.2f}x, FLOPs {flop:.2f}x; step time {wall:.2f}x wall "
              f"({100 * wall / flop:.0f}% of the FLOP ratio, {100 * wall / tok:.0f}% of the token ratio), "
              f"{cpu:.2f}x CPU time ({100 * cpu / flop:.0f}% of the FLOP ratio); target >= 90%")
        full = {w: _dit_grid(w, 81, 720, 1280, (1, 2, 2) if w == "base" else
                             tuple(int(p) for p in a.dcgen_patch.split(","))) for w in ("base", "dcgen")}
        fb, fd = (dit_flops(full[w][2], full[w][1], (1, 2, 2) if w == "base" else
                            tuple(int(p) for p in a.dcgen_patch.split(",")), 40, WAN14B) for w in ("base", "dcgen"))
        print(f"full size (720x1280 x 81 frames, 40 blocks): tokens {full['base'][2]} vs {full['dcgen'][2]} "
              f"({full['base'][2] / full['dcgen'][2]:.2f}x), FLOPs {fb / 1e12:.0f} vs {fd / 1e12:.0f} TFLOP "
              f"({fb / fd:.2f}x) per step")

if __name__ == "__main__":
    main()
