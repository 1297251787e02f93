"""The model architectures the pack patches (FLUX, SANA): what the shared nodes need from each.

Apply DC-Gen Aligned Embedding and Load DC-Gen LoRA take any supported MODEL; this module tells which one it is
and hands out its embedding patch and LoRA key map, so neither node nor the LoRA code branches on model types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import DCGenError


@dataclass(frozen=True)
class Architecture:
    name: str
    apply_aligned_embedding: Callable  # (model, AlignedEmbedding, vae=None, clone=True) -> model
    lora_key_map: Callable  # (model, model weight keys) -> {LoRA module name: ComfyUI patch key}
    lora_example: str


def _flux_key_map(model, keys):
    from .flux import flux_config_of
    from .lora import flux_lora_key_map

    return flux_lora_key_map(keys, flux_config_of(model))


def _sana_key_map(model, keys):
    from .lora import diffusers_lora_key_map

    return diffusers_lora_key_map(keys)


def architecture_of(model, subject: str = "model") -> Architecture:
    import comfy.ldm.flux.model

    from .sana.model import SanaTransformer

    dm = model.get_model_object("diffusion_model")
    if isinstance(dm, SanaTransformer):
        from .sana.dcgen import apply_aligned_embedding

        return Architecture("SANA", apply_aligned_embedding, _sana_key_map,
                            "transformer.transformer_blocks.0.attn1.to_q")
    if isinstance(dm, comfy.ldm.flux.model.Flux) and hasattr(dm, "img_in"):
        from .flux import apply_aligned_embedding

        return Architecture("FLUX", apply_aligned_embedding, _flux_key_map,
                            "transformer.transformer_blocks.0.attn.to_q or lora_unet_double_blocks_0_img_attn_qkv")
    raise DCGenError(f"{subject}: expected a FLUX model (FLUX.1-dev / Krea-dev from Load Diffusion Model) or a SANA "
                     f"model (Load SANA Diffusion Model), found {type(model.model).__name__} with a "
                     f"{type(dm).__name__} transformer.")


def apply_aligned_embedding(model, emb, vae=None):
    """The embedding patch of ``model``'s architecture, on a clone."""
    return architecture_of(model, subject=emb.source).apply_aligned_embedding(model, emb, vae=vae)
