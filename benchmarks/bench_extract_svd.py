"""LoRA extraction's truncated SVD: randomized (the default) vs exact, side by side on FLUX-sized weight deltas.

For each shape (FLUX.1's 3072x3072 attention projections and 3072x12288 MLP halves by default) and each spectrum:

- ``hard``: singular values j^-0.5 (a slowly decaying spectrum: the rank-R tail holds most of the energy; the worst
  case for a sketch);
- ``low-rank``: rank 200 (below --rank: what a LoRA-trained model's deltas are), 1/j decay;

the exact SVD (``torch.linalg.svd``) and the randomized one (``torch.svd_lowrank``, q = rank + --oversample,
--power-iters) are timed alternately (best of --repeats, after one warm-up each), through the same
``dcgen_core.tools.lowrank.low_rank`` that ``python -m dcgen_core.extract`` calls, and their relative errors
printed beside the randomized run's lower bound on the exact error. Reported: exact / randomized time ratio (the
speed-up) and randomized / exact error ratio (the price).

    python benchmarks/bench_extract_svd.py [--rank 256 --shapes 3072x3072 3072x12288 --repeats 1 --device cpu]

The matrices are built in float64 from random orthogonal factors (a QR of a Gaussian), which takes a while at
3072x12288 on a CPU; ``--shapes 1024x1024`` gives a quick run.
"""

from __future__ import annotations

import argparse
import math

import torch

from common import timed_pair  # noqa: F401  (puts the repository on sys.path)
from dcgen_core.tools.lowrank import low_rank


def spectrum_matrix(out: int, inp: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g))
    return (u * spectrum.float()) @ v.T


def spectra(n: int) -> dict:
    j = torch.arange(1, n + 1, dtype=torch.float64)
    return {"hard": j ** -0.5, "low-rank": torch.where(j <= 200, 1.0 / j, torch.zeros_like(j))[:max(200, 1)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--shapes", nargs="+", default=["3072x3072", "3072x12288"])
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--power-iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    print(f"rank {args.rank}, randomized: q = rank + {args.oversample}, {args.power_iters} power iterations; "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>11} {'spectrum':>9} | {'exact s':>8} {'random s':>8} {'speed-up':>8} | "
          f"{'exact err':>9} {'rand err':>9} {'bound':>9} {'err ratio':>9}")
    for shape in args.shapes:
        out, inp = (int(x) for x in shape.lower().split("x"))
        for kind, spec in spectra(min(out, inp)).items():
            delta = spectrum_matrix(out, inp, spec)
            energy = delta.double().square().sum().item()
            res = {}

            def run(method):
                res[method] = low_rank(delta, args.rank, device=args.device, method=method,
                                       oversample=args.oversample, niter=args.power_iters)

            t_exact, t_rand = timed_pair(lambda: run("exact"), lambda: run("randomized"), args.repeats)
            e, r = res["exact"], res["randomized"]
            err_e, err_r = math.sqrt(e.error / energy), math.sqrt(r.error / energy)
            bound = math.sqrt(r.bound / energy)
            ratio = err_r / err_e if err_e > 1e-5 else float("nan")  # both at rounding level: no ratio
            print(f"{shape:>11} {kind:>9} | {t_exact:8.2f} {t_rand:8.2f} {t_exact / t_rand:7.1f}x | "
                  f"{err_e:9.3e} {err_r:9.3e} {bound:9.3e} {ratio:9.4f}", flush=True)


if __name__ == "__main__":
    main()
