"""Qwen-Image in the architecture registry: how a Qwen-Image MODEL is recognised, its DC-Gen embedding patch
(img_in / proj_out) and its LoRA key map (diffusers module names are core's)."""

from __future__ import annotations

from ..shared.family import Architecture
from ..shared.lora import diffusers_lora_key_map
from .dcgen import apply_aligned_embedding


def is_qwen_image(dm) -> bool:
    import comfy.ldm.qwen_image.model as qm

    return isinstance(dm, qm.QwenImageTransformer2DModel)


def _lora_key_map(model, keys):
    return diffusers_lora_key_map(keys)


ARCHITECTURE = Architecture(
    name="Qwen-Image",
    matches=is_qwen_image,
    apply_aligned_embedding=apply_aligned_embedding,
    lora_key_map=_lora_key_map,
    lora_example="transformer.transformer_blocks.0.attn.to_q or lora_unet_transformer_blocks_0_attn_to_q",
    expected="a Qwen-Image model (Qwen-Image-Edit from Load Diffusion Model, or DC-Gen Load Qwen)",
)
