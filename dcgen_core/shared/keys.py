"""Wrapper prefixes in front of model keys (ComfyUI checkpoints, diffusers pipelines and LoRA files, PEFT), which
every family's key maps and the aligned-embedding reader strip, and the
half swap of modulation rows that FLUX's two layouts differ by."""

from __future__ import annotations

import torch


# Wrapper prefixes put in front of the model keys by ComfyUI checkpoints, diffusers
# pipelines/LoRA files and PEFT. Longest first so that "model.diffusion_model." wins
# over "diffusion_model.".
WRAPPER_PREFIXES = (
    "model.diffusion_model.",
    "base_model.model.",
    "diffusion_model.",
    "transformer.",
)


def strip_prefix(sd: dict) -> dict:
    """Remove wrapper prefixes shared by every key (repeatedly, e.g. ``base_model.model.transformer.``).

    Returns a new dict holding the same tensor objects (or ``sd`` itself when nothing
    is stripped). A prefix is only removed when *all* keys carry it.
    """
    if not sd:
        return sd
    out = sd
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
                break
    return out


def strip_key_prefix(key: str) -> str:
    """Remove any leading wrapper prefixes from a single key or module path."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                changed = True
                break
    return key


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """Swap the two halves along dim 0 (diffusers [scale, shift] <-> BFL [shift, scale]).

    The operation is its own inverse. Also applies to a LoRA delta (or LoRA B matrix)
    of ``norm_out.linear``.
    """
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
