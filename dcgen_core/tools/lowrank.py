"""Truncated SVD of a weight difference for LoRA extraction: randomized (default) or exact.

Randomized: ``torch.svd_lowrank`` (Halko, Martinsson & Tropp 2011) with ``q = rank + oversample`` columns and
``niter`` power iterations, seeded so that a run is reproducible. Its factors are the best rank-``rank``
approximation of ``Q Q^T delta`` (Q the sketch's orthonormal basis), so

* the achieved error is ``||delta||^2 - sum_{j<=r} s_j^2`` (measured directly on the stored factors), and
* the best rank-``r`` error (the exact SVD's, Eckart-Young) lies between ``sum_{r<j<=q} s_j^2`` and the achieved
  one: the sketch's singular values never exceed the true ones (interlacing), so the tail of the sketch is a
  lower bound on the true tail. Both are free by-products.

Exact: ``torch.linalg.svd``; the achieved error is the Eckart-Young optimum (up to the factors' rounding).
When ``q`` reaches the smaller side of the matrix the randomized method is no cheaper: the exact SVD runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..shared.errors import DCGenError

METHODS = ("randomized", "exact")


@dataclass
class LowRank:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    rank: int
    error: float  # ||delta - up @ down||_F^2 with the factors as stored
    bound: float  # lower bound on the best rank-r error ||delta - delta_r||_F^2 (exact SVD: the optimum itself)
    method: str  # the method that ran ("exact" also when a randomized request covered the whole matrix)


def low_rank(delta: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32, device: str = "cpu",
             save_dtype: torch.dtype = torch.float32, method: str = "randomized", oversample: int = 10,
             niter: int = 4, seed: int = 0) -> LowRank:
    """Rank-``min(rank, out, in)`` factors of ``delta`` split as ``up = U sqrt(S)``, ``down = sqrt(S) V^T``."""
    if method not in METHODS:
        raise DCGenError(f"--svd: expected one of {', '.join(METHODS)}, found {method!r}.")
    if oversample < 0 or niter < 0:
        raise DCGenError(f"--oversample / --power-iters: expected 0 or more, found {oversample} / {niter}.")
    d = delta.to(device=device, dtype=svd_dtype)
    small = min(d.shape)
    r = min(rank, small)
    q = min(r + oversample, small)
    if method == "randomized" and q < small:
        devices = [d.device] if d.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
        vh = v.T
        bound = s[r:].double().square().sum().item()
        ran = "randomized"
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        bound = s[r:].double().square().sum().item()
        ran = "exact"
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to(save_dtype)
    down = (root[:, None] * vh[:r]).to(save_dtype)
    err = (d - up.to(svd_dtype) @ down.to(svd_dtype)).double().square().sum().item()
    return LowRank(down=down.cpu(), up=up.cpu(), rank=r, error=err, bound=min(bound, err), method=ran)
