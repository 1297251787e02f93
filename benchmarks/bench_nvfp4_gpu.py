"""NVFP4 vs bf16 DC-Gen-FLUX (4K model, f64c128) on a CUDA GPU: per-step latency and peak VRAM at 1K and 4K.

    python benchmarks/bench_nvfp4_gpu.py [--sizes 1024 4096] [--repeats 5] [--text 512] [--modulation]
    python benchmarks/bench_nvfp4_gpu.py --tiny      # dry run of the same code at tiny dims (CPU without CUDA)

Full FLUX.1 dimensions (hidden 3072, 19 double + 38 single blocks) with random bf16 weights made on the GPU. The
bf16 model is built as DC-Gen Load Model builds it; the NVFP4 one is quantized on the GPU by the
quantizer's own code (dcgen_core.shared.quant.quantize.quantize_state_dict: block linears, plus the modulation linears with
--modulation) and built as DC-Gen Load 4-bit builds it, with the ops the running ComfyUI picks.
Compute path: native NVFP4 matmul where the GPU and comfy-kitchen's CUDA backend support it (SM >= 10),
weight-only otherwise (each layer dequantized to bf16 just before its matmul). Per step = one diffusion-model call
(guidance-distilled, cfg 1), median of --repeats after a warm-up, CUDA-synchronized; peak VRAM =
torch.cuda.max_memory_allocated during the calls, weights included. The two models are measured side by side,
the NVFP4/bf16 ratios printed (target for weight-only: <= 1.15x per step).

Without CUDA (and without --tiny) it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_4k_gpu import boot_comfy  # noqa: E402
from common import CONTEXT, FULL_DOUBLE, FULL_SINGLE, POOLED, flux_config, random_flux_state_dict  # noqa: E402


def sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def step_time(model, x, cond, pooled, repeats: int, cuda: bool) -> tuple[float, int]:
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    opts = {**model.model_options.get("transformer_options", {}), "wrappers": model.wrappers}

    def call():
        with torch.no_grad():
            model.model.apply_model(x, torch.tensor([0.7], device=x.device), c_crossattn=cond, y=pooled,
                                    guidance=torch.tensor([3.5], device=x.device), transformer_options=opts)

    call()
    sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        sync(cuda)
        times.append(time.perf_counter() - t)
    return statistics.median(times), (torch.cuda.max_memory_allocated() if cuda else 0)


def gib(n: int) -> str:
    return f"{n / 2**30:6.1f} GiB" if n else "   n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 1024 4096; tiny 256 512)")
    ap.add_argument("--text", type=int, default=None, help="text tokens (default 512; tiny 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modulation", action="store_true", help="also quantize the modulation linears")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, runs on CPU")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print("no CUDA device: run on a GPU machine, or pass --tiny for a dry run", file=sys.stderr)
        return 2
    boot_comfy(cuda)
    import comfy.model_management as mm

    from dcgen_core.shared.quant import nvfp4
    from dcgen_core.flux.dcgen import _install_latent_space
    from dcgen_core.flux.comfy_model import build_comfy_flux
    from dcgen_core.flux.four_bit import build_quantized_flux
    from dcgen_core.tools.headless import comfyui_path, comfyui_version_at
    from dcgen_core.shared.quant.quantize import quantize_state_dict

    device = mm.get_torch_device()
    if a.tiny:
        cfg = flux_config(1, 1, channels=128, hidden=256, heads=2, context=64, pooled=32)
        sizes, text = a.sizes or [256, 512], a.text or 16
    else:
        cfg = flux_config(FULL_DOUBLE, FULL_SINGLE, channels=128, context=CONTEXT, pooled=POOLED)
        sizes, text = a.sizes or [1024, 4096], a.text or 512
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    cap = torch.cuda.get_device_capability() if cuda else None
    print(f"ComfyUI {comfyui_version_at(comfyui_path())}; torch {torch.__version__}; {dev_name}"
          f"{f' (SM {cap[0]}.{cap[1]})' if cap else ''}; NVFP4 compute: {nvfp4.compute_path(device)}")
    print(f"DC-Gen-FLUX f64c128, hidden {cfg.hidden_size}, {cfg.depth} double + {cfg.depth_single_blocks} single "
          f"blocks, {text} text tokens")

    models = {}
    start = time.perf_counter()
    sd = random_flux_state_dict(cfg, device=device, dtype=torch.bfloat16)
    models["bf16"] = build_comfy_flux(sd, cfg, "bf16", source="random bf16")
    del sd
    gc.collect()
    print(f"built bf16 in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    sd = random_flux_state_dict(cfg, device=device, dtype=torch.bfloat16)
    qsd, layers, worst = quantize_state_dict(sd, a.modulation, str(device))
    del sd
    name = "nvfp4" + (" + modulation" if a.modulation else "")
    models[name] = build_quantized_flux(qsd, layers, cfg, "random nvfp4")
    del qsd
    gc.collect()
    print(f"quantized ({len(layers)} layers, worst relative error {worst[0]:.3f}) and built in "
          f"{time.perf_counter() - start:.0f} s via {models[name].model_options['dcgen_quantization']['ops']}")
    for m in models.values():
        _install_latent_space(m, 128, 0.5935, own_model=True)
    weights = {k: mm.module_size(m.model.diffusion_model) for k, m in models.items()}
    print("weights: " + ", ".join(f"{k} {gib(v)}" for k, v in weights.items())
          + f" ({weights[name] / weights['bf16']:.3f}x)")

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, text, cfg.context_in_dim, generator=g).to(device)
    pooled = torch.randn(1, cfg.vec_in_dim, generator=g).to(device)
    print(f"\n{'size':>6s} {'model':22s} {'per step':>10s} {'vs bf16':>8s} {'peak VRAM':>10s}")
    for size in sizes:
        side = size // 64
        x = torch.randn(1, 128, side, side, generator=g).to(device)
        results = {}
        for k, m in models.items():
            try:
                results[k] = step_time(m, x, cond, pooled, a.repeats, cuda)
            except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
                results[k] = None
                print(f"{size:6d} {k:22s} OUT OF MEMORY ({str(e).splitlines()[0][:80]})")
            mm.unload_all_models()
        for k, r in results.items():
            if r is not None:
                ratio = r[0] / results["bf16"][0] if results.get("bf16") else float("nan")
                print(f"{size:6d} {k:22s} {r[0] * 1000:8.1f}ms {ratio:7.2f}x {gib(r[1]):>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
