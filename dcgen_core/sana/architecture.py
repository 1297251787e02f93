"""SANA in the architecture registry: how a SANA MODEL is recognised, its DC-Gen embedding patch, and its LoRA key
map (diffusers module names, as SANA's parameters carry them)."""

from __future__ import annotations

from ..shared.family import Architecture
from ..shared.lora import diffusers_lora_key_map
from .dcgen import apply_aligned_embedding
from .model import SanaTransformer


def is_sana(dm) -> bool:
    return isinstance(dm, SanaTransformer)


def _lora_key_map(model, keys):
    return diffusers_lora_key_map(keys)


ARCHITECTURE = Architecture(
    name="SANA",
    matches=is_sana,
    apply_aligned_embedding=apply_aligned_embedding,
    lora_key_map=_lora_key_map,
    lora_example="transformer.transformer_blocks.0.attn1.to_q",
    expected="a SANA model (DC-Gen Load SANA)",
)
