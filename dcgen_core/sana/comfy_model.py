"""SANA as a ComfyUI model: a model config (``supported_models_base.BASE``), a flow-matching ``BaseModel`` and the
transformer loader.

ComfyUI core has no SANA. The model config gives ComfyUI what it needs for any model: the latent format of the
DC-AE the model samples (f32c32 for SANA, DC-AE-1.5 f64c128 for DC-Gen-SANA), flow sampling with SANA's shift
(sigma = shift * t / (1 + (shift - 1) * t), timestep = 1000 * sigma; the shift of the release's scheduler config,
else 6.0 at 4K and 3.0 below, see release.py) and the inference dtypes; the
BaseModel passes the text attention mask from the conditioning. So core KSampler / SamplerCustomAdvanced, LoRA
loaders, previews and offloading work on it as on core models.
"""

from __future__ import annotations

import torch

from ..shared.checkpoints import check_tensors_match, load_checkpoint, owned
from ..shared.comfy_compat import archive_weight_dtypes, make_model_patcher
from ..shared.errors import DCGenError
from ..shared.latent_space import (SPATIAL_COMPRESSION, build_on_meta, check_context_width, check_latent_channels,
                                   check_size_for_model, install_empty_latent_hook, install_preview_hook,
                                   load_with_cached_init, make_latent_format, resolve_scaling)
from .keys import (is_diffusers_sana, is_original_sana, original_pos_embed_config, original_to_diffusers,
                   sana_config_from_state_dict, unwrap)
from .model import SanaConfig, SanaTransformer
from .release import SANA_FLOW_SHIFT, check_resolution_known, sana_flow_shift

#: The largest side SANA models are made for.
SANA_MAX_SIDE = 4096
_CLASSES = {}


def comfy_classes():
    """(model config class, BaseModel class), built once ComfyUI is importable."""
    if _CLASSES:
        return _CLASSES["config"], _CLASSES["model"]
    import comfy.conds
    import comfy.model_base
    import comfy.supported_models_base

    class ComfySanaTransformer(SanaTransformer):
        """The transformer as ComfyUI's BaseModel builds its diffusion model: from the unet config's fields."""

        def __init__(self, image_model=None, sana_config=None, dtype=None, device=None, operations=None, **_):
            super().__init__(SanaConfig(**sana_config), dtype=dtype, device=device, operations=operations)

    class SanaModel(comfy.model_base.BaseModel):
        def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
            super().__init__(model_config, model_type, device=device, unet_model=ComfySanaTransformer)

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                out["attention_mask"] = comfy.conds.CONDRegular(mask)
            return out

    class Sana(comfy.supported_models_base.BASE):
        unet_config = {"image_model": "sana"}
        unet_extra_config = {}
        sampling_settings = {"shift": SANA_FLOW_SHIFT, "multiplier": 1000.0}
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
        vae_key_prefix = ["vae."]
        text_encoder_key_prefix = ["text_encoders."]

        def get_model(self, state_dict, prefix="", device=None):
            return SanaModel(self, device=device)

    _CLASSES.update(config=Sana, model=SanaModel)
    return Sana, SanaModel


def require_sana(model, subject: str = "model") -> SanaTransformer:
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, SanaTransformer):
        raise DCGenError(f"{subject}: expected a SANA model (from DC-Gen Load SANA), found "
                         f"{type(model.model).__name__} with a {type(dm).__name__} transformer.")
    return dm


def read_sana_checkpoint(path: str):
    """(diffusers-keyed state dict of mapped views, SanaConfig) of a SANA transformer in diffusers or original
    NVlabs/Sana layout (single safetensors or diffusers folder)."""
    sd, cfg, _ = _read_sana(path)
    return sd, cfg


def _read_sana(path: str):
    """As read_sana_checkpoint, and whether the resolution was told (a config, or an original file's pos_embed)."""
    ckpt = load_checkpoint(path, component="transformer")
    sd = unwrap(ckpt.state_dict)
    config = ckpt.config
    told = config is not None
    if is_original_sana(sd):
        # the pos_embed buffer (dropped by the conversion) tells 1K (zeros) from 2K / 4K (sin-cos)
        config = {**(config or {}), **original_pos_embed_config(sd, config, path)}
        sd, told = original_to_diffusers(sd), True
    elif not is_diffusers_sana(sd):
        sample = ", ".join(sorted(sd)[:3])
        raise DCGenError(f"{path}: expected a SANA transformer (diffusers SanaTransformer2DModel or original "
                         f"NVlabs/Sana keys), found keys like {sample}.")
    return sd, sana_config_from_state_dict(sd, config), told


def sana_info(channels: int, scaling: float, shift: float = SANA_FLOW_SHIFT, reason: str = "") -> dict:
    """The DC-AE facts a SANA MODEL carries (read by the pack's latent hooks, size checks and sampler)."""
    return {"architecture": "sana", "latent_channels": channels, "spatial_compression": SPATIAL_COMPRESSION[channels],
            "scaling_factor": scaling, "rule": "sana-flow", "fixed_resolution": None,
            "shift": f"flow shift {shift}" + (f" ({reason})" if reason else ""),
            "guidance": "cfg",  # classifier-free: the DC-Gen Sampler's guidance is the cfg scale
            "max_side": SANA_MAX_SIDE, "name": "SANA" if channels == 32 else f"DC-Gen-SANA ({channels}-channel DC-AE)"}


CHECKS_KEY = "dcgen_sana_checks"


def _sana_outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Before sampling a SANA model: the latent is one of its DC-AE, on its grid and in range, and the text comes
    from Gemma-2 (SANA's caption width); otherwise the failure would be a shape error deep in the transformer."""
    guider = executor.class_obj
    info = guider.model_options.get("dcgen")
    if info is not None:
        check_latent_channels(latent_image, info["latent_channels"])
        if latent_image.ndim == 4:
            f = info["spatial_compression"]
            check_size_for_model(info, latent_image.shape[-1] * f, latent_image.shape[-2] * f)
        dm = guider.model_patcher.get_model_object("diffusion_model")
        check_context_width(getattr(guider, "conds", {}) or {}, dm.config.caption_channels, "SANA",
                            "Encode the prompt with DC-Gen Load Gemma-2 (Gemma-2-2B).")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


def build_comfy_sana(sd: dict, cfg: SanaConfig, weight_dtype: str, source: str, scaling: float,
                     disable_dynamic: bool = False, shift: float = SANA_FLOW_SHIFT, shift_reason: str = ""):
    if cfg.in_channels != cfg.out_channels or cfg.in_channels not in SPATIAL_COMPRESSION:
        raise DCGenError(f"{source}: expected a SANA transformer for a DC-AE latent (32, 128 or 512 channels in and "
                         f"out), found {cfg.in_channels} in / {cfg.out_channels} out.")
    config_cls, _ = comfy_classes()
    model_config = config_cls({"image_model": "sana", "sana_config": cfg.to_dict()})
    model_config.sampling_settings["shift"] = shift  # an instance copy: read when the model sampling is built
    model, unet_dtype, load_device, offload_device = build_on_meta(model_config, sd, weight_dtype)
    dm = model.diffusion_model
    check_tensors_match(dm.state_dict(), sd, source, f"a SANA transformer with {cfg.num_layers} blocks")
    # owned memory, one tensor at a time (a later change to the file cannot reach the model)
    def own(v):
        return owned(v, unet_dtype if v.is_floating_point() else None)

    dm.load_state_dict({k: own(sd.pop(k)) for k in list(sd)}, strict=True, assign=True)
    archive_weight_dtypes(dm)
    model.latent_format = make_latent_format(cfg.in_channels, scaling)
    model.to(offload_device)
    m = make_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)
    install_preview_hook()
    install_empty_latent_hook()
    m.model_options["dcgen"] = sana_info(cfg.in_channels, scaling, shift, shift_reason)
    import comfy.patcher_extension as pe

    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, CHECKS_KEY, _sana_outer_sample)
    return m


def read_sana_release(path: str):
    """(state dict, SanaConfig, flow shift, why that shift) of a SANA to sample or train: read_sana_checkpoint,
    the shift of its release (sana_flow_shift), and refused when a 2K / 4K model's resolution cannot be known."""
    sd, cfg, told = _read_sana(path)
    shift, reason, from_file = sana_flow_shift(path, cfg)
    if not told:
        check_resolution_known(path, cfg, shift if from_file else None)
    return sd, cfg, shift, reason


def _load_sana_patcher(path: str, weight_dtype: str, vae=None, disable_dynamic: bool = False):
    sd, cfg, shift, reason = read_sana_release(path)
    scaling = resolve_scaling(cfg.in_channels, vae, path)
    return build_comfy_sana(sd, cfg, weight_dtype, path, scaling, disable_dynamic=disable_dynamic, shift=shift,
                            shift_reason=reason)


def load_sana_transformer(path: str, weight_dtype: str = "default", vae=None):
    """Load a SANA (or DC-Gen-SANA) transformer as a ComfyUI MODEL sampling DC-AE latents."""
    return load_with_cached_init(_load_sana_patcher, path, weight_dtype, vae=vae)
