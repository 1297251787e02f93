"""DC-Gen-FLUX vs base FLUX at full FLUX size on a CUDA GPU: per-step latency, peak VRAM, decode, text.

The GPU twin of bench_4k.py. Full-size FLUX.1 dimensions (hidden 3072, 24 heads, 19 double + 38 single
blocks, ~12B parameters) with random weights, created directly on the GPU (no download, no CPU copy) and
built through ComfyUI by the pack's build_comfy_flux; DC-Gen-f64 is the same transformer with a 128-channel
embedder/head in the DC-AE latent space, built as the pack's loader builds the official Res4K model
(bench_4k.build_flux_pair). Both sampled by ComfyUI's sampler at --sizes (default 1024, 2048, 4096):

- per-step latency: marginal, (1+steps)-step call minus 1-step call, CUDA events, after a warm-up call;
- peak VRAM: torch.cuda.max_memory_allocated over the timed calls (weights included, and less weights);
- an out-of-memory error is caught and reported (base FLUX at 4096x4096 may not fit 24 GB cards);
- text encoders: ComfyUI's T5-XXL (24 layers) and CLIP-L, random weights, as ComfyUI runs them;
- DC-AE-1.5 f64c128 decoder (full size, random weights): latency and peak VRAM, untiled and tiled
  (32-latent-pixel tiles, a quarter overlap, as dcgen_core.shared.dcae.decode_tiled);
- end-to-end: text + 20 steps + decode, with shares.

    python benchmarks/bench_4k_gpu.py [--sizes 1024 2048 4096] [--steps 3] [--repeats 2] [--dtype bf16]
    python benchmarks/bench_4k_gpu.py --tiny      # dry run of the same code at tiny dims (CPU without CUDA)

Without CUDA (and without --tiny) it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import replace
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_4k as b4
from common import (
    CONTEXT,
    FULL_DOUBLE,
    FULL_SINGLE,
    HEADS,
    HIDDEN,
    OFFICIAL_STEPS,
    POOLED,
    flux_config,
    flux_step_flops,
    loadavg,
    marginal,
    random_dcae_decoder,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Dims:
    """Model dimensions: full FLUX.1 / T5-XXL / CLIP-L / DC-AE-1.5, or tiny ones for a dry run."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        if not tiny:
            self.hidden, self.heads, self.context, self.pooled = HIDDEN, HEADS, CONTEXT, POOLED
            self.double, self.single = FULL_DOUBLE, FULL_SINGLE
            self.t5 = b4.t5_xxl_config()
            self.clip = b4.clip_l_config()
            self.tile = b4.TILE_LATENT
        else:
            self.hidden, self.heads, self.context, self.pooled = 256, 2, 64, 32
            self.double, self.single = 1, 1
            self.t5 = {**b4.t5_xxl_config(2), "d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16}
            self.clip = {**b4.clip_l_config(), "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                         "num_hidden_layers": 2, "projection_dim": 64}
            self.tile = 4
        from dcgen_core.shared.dcae import VARIANTS

        self.dcae = VARIANTS[b4.DCAE_VARIANT]
        if tiny:
            widths = (8, 16, 32, 32, 64, 64, 64)
            self.dcae = replace(self.dcae, encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                                encoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1),
                                decoder_layers_per_block=(0, 1, 1, 1, 1, 1, 1))

    def flops(self, kind: str, size: int, text: int) -> float:
        tokens, ch = ((b4.base_tokens(size), 4 * b4.BASE_CHANNELS) if kind == "base"
                      else (b4.dc_tokens(size), b4.DC_CHANNELS))
        return flux_step_flops(tokens, text, self.double, self.single, ch, hidden=self.hidden, context=self.context)


class Clock:
    """Times one call (CUDA events on CUDA, wall clock elsewhere) and keeps the peak memory of the calls."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak = cuda, 0

    def __call__(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        return start.elapsed_time(end) / 1000


def allocated(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def gib(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.1f} GiB"


def oom_errors():
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else (RuntimeError,)


def free(cuda: bool):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def boot_comfy(cuda: bool):
    """ComfyUI booted on the GPU with --highvram (models stay there) or on the CPU."""
    from dcgen_core.tools.headless import boot, comfyui_path

    if cuda:
        path = comfyui_path()
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.highvram = True
    return boot(cpu=not cuda)


def loaded_fraction(model) -> float | None:
    try:
        return model.loaded_size() / max(1, model.model_size())
    except Exception:  # noqa: BLE001 (older/newer ModelPatcher API)
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default 1024 2048 4096 (tiny: 256 512)")
    ap.add_argument("--text", type=int, default=None, help="text tokens (default 512; tiny: 16)")
    ap.add_argument("--steps", type=int, default=3, help="extra steps timed beyond a 1-step call")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timing rounds, best of")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="FLUX weights/compute (CUDA)")
    ap.add_argument("--vae-dtype", choices=sorted(DTYPES), default="bf16", help="DC-AE decoder (CUDA)")
    ap.add_argument("--te-dtype", choices=sorted(DTYPES), default="bf16", help="text encoder weights (CUDA)")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny dimensions: a dry run of this script's logic (on the CPU when there is no CUDA)")
    ap.add_argument("--cpu", action="store_true", help="with --tiny: run on the CPU even if CUDA is available")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu
    if not cuda and not a.tiny:
        print("bench_4k_gpu.py: no CUDA device (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). This benchmark needs an NVIDIA GPU; "
              "for a dry run of its logic at tiny dimensions use --tiny.", file=sys.stderr)
        sys.exit(2)
    sizes = a.sizes or ([256, 512] if a.tiny else [1024, 2048, 4096])
    text = a.text or (16 if a.tiny else 512)
    if a.steps < 1 or any(s % (2 * b4.DC_F) for s in sizes):
        ap.error(f"expected --steps >= 1 and sizes that are multiples of {2 * b4.DC_F}")
    torch.set_grad_enabled(False)
    wall = time.perf_counter()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[a.dtype] if cuda else torch.float32
    vae_dtype = DTYPES[a.vae_dtype] if cuda else torch.float32
    te_dtype = DTYPES[a.te_dtype] if cuda else torch.float32

    boot_comfy(cuda)
    d = Dims(a.tiny)
    where = (f"{torch.cuda.get_device_name()} ({gib(torch.cuda.get_device_properties(0).total_memory)}), "
             f"torch {torch.__version__}, CUDA {torch.version.cuda}" if cuda
             else f"CPU ({torch.get_num_threads()} threads; {loadavg()}) - DRY RUN, timings meaningless")
    print(f"{'TINY ' if a.tiny else ''}FLUX hidden {d.hidden}, {d.heads} heads, {d.double} double + {d.single} single "
          f"blocks, random weights, {str(dtype).replace('torch.', '')}, ComfyUI attention {b4.attention_name()}; "
          f"text length {text} tokens; {where}")

    # FLUX: base and DC-Gen-f64 sharing the transformer blocks
    free(cuda)
    before = allocated(cuda)
    cfg = flux_config(d.double, d.single, hidden=d.hidden, heads=d.heads, context=d.context, pooled=d.pooled)
    t = time.perf_counter()
    base, dcgen = b4.build_flux_pair(cfg, device, dtype, {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                          torch.float32: "fp32"}[dtype], d.hidden)
    weights = allocated(cuda) - before
    n_params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    print(f"[build]    {n_params / 1e6:,.1f} M parameters, weights {gib(weights)} on {device}, "
          f"built in {time.perf_counter() - t:.1f} s")
    sample = b4.make_sampler(b4.make_cond(text, d.context, d.pooled))

    step = {}  # (kind, size) -> (seconds or None, peak bytes, note)
    for size in sizes:
        for kind, model in (("dcgen", dcgen), ("base", base)):
            latent = b4.latents(size)[kind]
            clock = Clock(cuda)
            try:
                sec, fixed, _ = marginal(partial(sample, model, latent), a.steps, a.repeats, clock=clock)
                frac = loaded_fraction(model)
                note = f"setup {b4.fmt_s(fixed)} per call"
                if frac is not None and frac < 0.999:
                    note += f"; ComfyUI kept only {100 * frac:.0f}% of the weights on the GPU (lowvram)"
                step[kind, size] = (sec, clock.peak, note)
            except oom_errors() as e:
                step[kind, size] = (None, clock.peak, f"OUT OF MEMORY ({str(e).splitlines()[0][:90]})")
            free(cuda)
    print(f"[step]     per-step latency, marginal over {a.steps} step(s), best of {a.repeats}, after a warm-up call; "
          f"peak = max_memory_allocated (weights {gib(weights)})")
    for size in sizes:
        for kind, label in (("base", "base FLUX "), ("dcgen", "DC-Gen-f64")):
            sec, peak, note = step[kind, size]
            tokens = b4.base_tokens(size) if kind == "base" else b4.dc_tokens(size)
            fl = d.flops(kind, size, text)
            timing = (f"{sec * 1000:10,.1f} ms/step  {fl / sec / 1e12:7.2f} TFLOP/s" if sec is not None
                      else f"{'-':>18s}  {'-':>15s}")
            extra = f" (activations {gib(peak - weights)})" if cuda and peak else ""
            print(f"[step]     {label} {size}x{size} {tokens:6d} img tokens {fl / 1e12:8.3f} TFLOP {timing}  "
                  f"peak {gib(peak) if cuda else 'n/a'}{extra}  {note}")
    for size in sizes:
        tb, td = step["base", size][0], step["dcgen", size][0]
        ratio = d.flops("base", size, text) / d.flops("dcgen", size, text)
        measured = f"{tb / td:6.1f}x" if tb and td else "   n/a"
        print(f"[speedup]  {size}x{size}: per-step {measured} measured vs FLOP ratio {ratio:6.1f}x")

    del base, dcgen, model  # model: the loop variable above
    import comfy.model_management

    comfy.model_management.unload_all_models()
    free(cuda)

    text_time = None if a.skip_text else bench_text(d, text, device, te_dtype, cuda, a.repeats)
    decode = {} if a.skip_decode else bench_decode(d, sizes, device, vae_dtype, cuda, a.repeats)

    print(f"[e2e]      {OFFICIAL_STEPS} steps (official default): text encoding (T5-XXL + CLIP-L) + {OFFICIAL_STEPS} x "
          f"step + decode (DC-AE-1.5, untiled if it fit, else tiled); base FLUX's VAE decode is not benchmarked here")
    for size in sizes:
        td, tb = step["dcgen", size][0], step["base", size][0]
        dec = decode.get(size)
        parts = [("text encoding", text_time), ("sampling", OFFICIAL_STEPS * td if td else None),
                 ("decode", dec[0] if dec else None)]
        known = sum(t for _, t in parts if t is not None)
        cells = "  ".join(f"{name} {b4.fmt_s(t)} ({100 * t / known:.1f}%)" if t is not None else f"{name} n/a"
                          for name, t in parts)
        mode = f" [decode {dec[1]}]" if dec else ""
        print(f"[e2e]      DC-Gen-f64 {size}x{size}: total {b4.fmt_s(known)}: {cells}{mode}")
        if tb and td:
            print(f"[e2e]      base FLUX  {size}x{size}: sampling {b4.fmt_s(OFFICIAL_STEPS * tb)} "
                  f"({tb / td:.1f}x DC-Gen's sampling)")
        else:
            print(f"[e2e]      base FLUX  {size}x{size}: sampling n/a ({step['base', size][2]})")
    print(f"wall time {time.perf_counter() - wall:.0f} s")


def measure(fn, repeats: int, cuda: bool) -> tuple[float, int]:
    """Median latency of ``fn`` after one warm-up call, and the peak memory allocated during the timed calls."""
    fn()
    clock = Clock(cuda)
    times = [clock(fn) for _ in range(max(repeats, 1))]
    return statistics.median(times), clock.peak


def bench_text(d: Dims, text: int, device, dtype, cuda: bool, repeats: int) -> float | None:
    total = 0.0
    g = torch.Generator().manual_seed(2)
    for kind, cfg, tokens in (("t5", d.t5, text), ("clip", d.clip, d.clip["max_position_embeddings"])):
        name = "T5-XXL" if kind == "t5" else "CLIP-L"
        free(cuda)
        before = allocated(cuda)
        try:
            model = b4.build_text_encoder(kind, cfg, device, dtype)
            weights = allocated(cuda) - before
            ids = torch.randint(0, cfg["vocab_size"], (1, tokens), generator=g).to(device)
            sec, peak = measure(partial(b4.run_text_encoder, model, ids), repeats, cuda)
            total += sec
            layers = cfg.get("num_layers", cfg.get("num_hidden_layers"))
            print(f"[text]     {name} (ComfyUI, {layers} layers, {str(dtype).replace('torch.', '')} weights, fp32 "
                  f"activations as ComfyUI runs it; {tokens} tokens): {b4.fmt_s(sec)}, weights {gib(weights)}, "
                  f"peak {gib(peak)}")
            del model
        except oom_errors() as e:
            print(f"[text]     {name}: OUT OF MEMORY ({str(e).splitlines()[0][:90]})")
            return None
    free(cuda)
    return total


def bench_decode(d: Dims, sizes, device, dtype, cuda: bool, repeats: int) -> dict[int, tuple[float, str]]:
    from dcgen_core.shared.dcae import decode_tiled
    from dcgen_core.shared.dcae.tiling import default_overlap

    free(cuda)
    before = allocated(cuda)
    dcae = random_dcae_decoder(d.dcae, device, dtype)
    weights = allocated(cuda) - before
    params = sum(p.numel() for p in dcae.decoder.parameters())
    overlap = default_overlap(d.tile)
    print(f"[decode]   DC-AE-1.5 f64c128 decoder ({'tiny' if d.tiny else 'full size'}, {params / 1e6:.1f} M params, "
          f"random weights, {str(dtype).replace('torch.', '')}), weights {gib(weights)}; tiled = {d.tile}x{d.tile} "
          f"latent tiles, overlap {overlap}")
    out = {}
    for size in sizes:
        lat = size // b4.DC_F
        z = torch.randn(1, b4.DC_CHANNELS, lat, lat, device=device, dtype=dtype)
        cells = []
        for mode, fn in (("untiled", partial(dcae.decode, z, tiled=False)),
                         ("tiled", partial(decode_tiled, dcae, z, d.tile, overlap))):
            try:
                sec, peak = measure(fn, repeats, cuda)
                cells.append(f"{mode} {b4.fmt_s(sec)} peak {gib(peak) if cuda else 'n/a'}")
                if size not in out:
                    out[size] = (sec, mode)
            except oom_errors() as e:
                cells.append(f"{mode} OUT OF MEMORY ({str(e).splitlines()[0][:60]})")
            free(cuda)
        print(f"[decode]   {size}x{size} (latent {lat}x{lat}): " + " | ".join(cells))
    del dcae
    free(cuda)
    return out


if __name__ == "__main__":
    main()
