"""Which model family a training run is for: the base transformer decides (FLUX or SANA), the cache must have been
prepared for the same family (its text embeddings differ: T5 + CLIP for FLUX, Gemma-2 with a mask for SANA).

Each family's training module (model.py, sana_model.py) has the same functions: load_base_transformer,
hidden_size, base_embedder, install_embedding, embedding_state_dict, save_embedding, teacher_tokens, Denoiser,
LORA_TARGET_REGEX.
"""

from __future__ import annotations

import torch

from ...shared.errors import DCGenError
from . import model, sana_model

FAMILIES = {"flux": "FLUX", "sana": "SANA"}
_MODULES = {"flux": model, "sana": sana_model}


def base_family(base) -> str:
    """"flux" or "sana" for a base transformer path (any layout the pack's loaders read) or loaded diffusers model."""
    if isinstance(base, torch.nn.Module):
        from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

        if isinstance(base, SanaTransformer2DModel):
            return "sana"
        if isinstance(base, FluxTransformer2DModel):
            return "flux"
        raise DCGenError(f"base transformer: expected a diffusers FluxTransformer2DModel or SanaTransformer2DModel, "
                         f"found a {type(base).__name__}.")
    from ...flux.keys import is_bfl_flux, is_diffusers_flux
    from ...sana.keys import is_diffusers_sana, is_original_sana, unwrap
    from ...shared.checkpoints import load_checkpoint

    sd = load_checkpoint(base, component="transformer").state_dict  # views of the memory-mapped files
    sana = unwrap(sd)
    if is_diffusers_sana(sana) or is_original_sana(sana):
        return "sana"
    if is_diffusers_flux(sd) or is_bfl_flux(sd):
        return "flux"
    raise DCGenError(f"{base}: expected a FLUX transformer (diffusers or BFL keys) or a SANA transformer (diffusers "
                     f"or NVlabs keys), found keys like {', '.join(sorted(sd)[:3])}.")


def training_family(base, cache, objective: str = "auto"):
    """The training module of ``base``'s family, after checking that ``cache`` was prepared for it and that
    ``objective`` applies to it."""
    family = base_family(base)
    found = getattr(cache, "family", "flux")
    if found != family:
        where = getattr(cache, "folder", "in-memory cache")
        what = base if isinstance(base, str) else "the base model"
        raise DCGenError(f"{where}: expected a training cache prepared for {FAMILIES[family]} (the base transformer "
                         f"{what} is a {FAMILIES[family]}), found one prepared for {FAMILIES.get(found, found)}. "
                         f"Prepare the cache with {FAMILIES[family]}'s text encoder, or train the "
                         f"{FAMILIES.get(found, found)} base it was made for.")
    if family == "sana" and objective == "guidance-distilled":
        raise DCGenError("--objective guidance-distilled: expected a guidance-distilled base (FLUX.1-dev / "
                         "Krea-dev), found SANA, which samples with classifier-free guidance: DC-Gen-SANA is trained "
                         "with plain flow matching (--objective flow, or auto).")
    return _MODULES[family]


def model_family(model):
    """The training module of a loaded (possibly PEFT-wrapped) diffusers model's family."""
    return _MODULES[base_family(model)]
