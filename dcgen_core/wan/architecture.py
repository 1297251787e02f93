"""Wan2.1 in the architecture registry: how a Wan MODEL is recognised (core's WanModel, DC-Gen-Wan or base), its
(absent) embedding patch, and its LoRA key map (diffusers module names -> Wan's)."""

from __future__ import annotations

from ..shared.family import Architecture
from .dcgen import apply_aligned_embedding
from .keys import comfy_to_diffusers_key


def is_wan(dm) -> bool:
    import comfy.ldm.wan.model as wm

    return type(dm) is wm.WanModel


def _lora_key_map(model, keys):
    """diffusers LoRA module names (``transformer.blocks.0.attn1.to_q``) -> ComfyUI patch keys (Wan names)."""
    key_map = {}
    for k in keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            module = comfy_to_diffusers_key(k[len("diffusion_model."):])[:-len(".weight")]
            for name in (f"transformer.{module}", "lora_transformer_" + module.replace(".", "_")):
                key_map[name] = k
    return key_map


ARCHITECTURE = Architecture(
    name="Wan2.1",
    matches=is_wan,
    apply_aligned_embedding=apply_aligned_embedding,
    lora_key_map=_lora_key_map,
    lora_example="transformer.blocks.0.attn1.to_q",
    expected="a Wan2.1 model (DC-Gen Load Wan, or core Load Diffusion Model)",
)
