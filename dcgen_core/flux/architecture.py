"""FLUX in the architecture registry: how a FLUX MODEL is recognised, its DC-Gen embedding patch, and its LoRA key
map (diffusers, kohya and BFL module names; fused q/k/v offsets; the norm_out scale/shift swap)."""

from __future__ import annotations

from ..shared.comfy_compat import norm_param_in
from ..shared.family import Architecture
from .dcgen import apply_aligned_embedding, flux_config_of
from .keys import (SCALE_SHIFT_SWAPPED_MODULES, diffusers_flux_module_names, diffusers_flux_module_to_bfl,
                   swap_scale_shift)


def is_flux(dm) -> bool:
    """A ComfyUI FLUX transformer (what core Load Diffusion Model builds for FLUX.1)."""
    import comfy.ldm.flux.model

    return isinstance(dm, comfy.ldm.flux.model.Flux) and hasattr(dm, "img_in")


def flux_lora_key_map(model_keys, cfg) -> dict:
    """LoRA module name -> ComfyUI patch key.

    Values are ``"diffusion_model.<w>.weight"``, ``(key, (0, start, rows))`` for a
    part of a fused weight, or ``(key, None, swap_scale_shift)`` for ``norm_out``.
    """
    key_map = {}
    for k in model_keys:
        # RMSNorm parameters are ".scale" on ComfyUI v0.3.64 and ".weight" on v0.33: either is the module's weight
        if k.startswith("diffusion_model.") and (k.endswith(".weight") or (k.endswith(".scale") and "_norm" in k)):
            module = k[len("diffusion_model."):].rpartition(".")[0]
            key_map[f"diffusion_model.{module}"] = k
            key_map["lora_unet_" + module.replace(".", "_")] = k
    for name in diffusers_flux_module_names(cfg):
        bfl_key, offset = diffusers_flux_module_to_bfl(name, config=cfg)
        target = norm_param_in(f"diffusion_model.{bfl_key}", model_keys)
        if target is None:
            continue
        if offset is not None:
            value = (target, tuple(offset))
        elif name in SCALE_SHIFT_SWAPPED_MODULES:
            value = (target, None, swap_scale_shift)
        else:
            value = target
        key_map[f"transformer.{name}"] = value
        key_map["lora_transformer_" + name.replace(".", "_")] = value
    return key_map


def _lora_key_map(model, keys):
    return flux_lora_key_map(keys, flux_config_of(model))


ARCHITECTURE = Architecture(
    name="FLUX",
    matches=is_flux,
    apply_aligned_embedding=apply_aligned_embedding,
    lora_key_map=_lora_key_map,
    lora_example="transformer.transformer_blocks.0.attn.to_q or lora_unet_double_blocks_0_img_attn_qkv",
    expected="a FLUX model (FLUX.1-dev / Krea-dev from Load Diffusion Model)",
)
