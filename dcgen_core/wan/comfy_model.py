"""DC-Gen-Wan2.1 as a ComfyUI MODEL on core's ``WanModel`` / ``model_base.WAN21``.

The transformer folders of nvidia/DC-VideoGen-Wan2.1-14B (``transformer_t2v/``, ``transformer_i2v/``: diffusers
``WanTransformer3DModel``) are renamed to Wan's keys (:mod:`.keys`) and loaded into core's model class with the
config read from the files: patch size, 32 latent channels in and out, or the i2v 68-channel input (32 noise +
4 mask + 32 DC-AE-V condition, which ``model_base.WAN21.concat_cond`` builds from the conditioning). The latent
format is the DC-AE-V one (5-D, 32 channels, scaling 0.7241); the flow shift comes from the shipped
``scheduler/scheduler_config.json`` beside the transformer folder when it is there.
"""

from __future__ import annotations

import logging

from ..shared.checkpoints import check_tensors_match, load_checkpoint, owned, weight_format
from ..shared.comfy_compat import make_model_patcher
from ..shared.errors import DCGenError
from ..shared.keys import strip_prefix
from ..shared.latent_space import build_on_meta, install_empty_latent_hook
from ..shared.scheduler_config import config_number, read_scheduler_config
from .conditioning import install_i2v_check
from .dcgen import install_dcae_v_latent_space
from .keys import WanConfig, diffusers_to_comfy, is_comfy_wan, is_diffusers_wan, wan_config

#: the flow shift of Wan2.1 at 720p (diffusers' Wan2.1-14B scheduler config) when no scheduler config is found
DEFAULT_FLOW_SHIFT = 5.0


def read_wan_checkpoint(path: str) -> tuple[dict, WanConfig]:
    """(Wan/ComfyUI-keyed state dict of mapped views, config) of a diffusers folder or a single file."""
    ckpt = load_checkpoint(path, component="transformer")
    sd = strip_prefix(ckpt.state_dict)
    if weight_format(sd, ckpt.metadata) != "plain":
        raise DCGenError(f"{path}: expected a bf16/fp16/fp32/fp8 Wan2.1 transformer, found a 4-bit file.")
    if is_diffusers_wan(sd):
        sd = diffusers_to_comfy(sd)
    elif not is_comfy_wan(sd):
        raise DCGenError(f"{path}: expected a Wan2.1 transformer (diffusers WanTransformer3DModel or Wan/ComfyUI "
                         f"keys), found keys like {', '.join(sorted(sd)[:3])}.")
    return sd, wan_config(sd, ckpt.config, path)


def scheduler_shift(path: str) -> float:
    """``flow_shift`` of the scheduler config shipped beside the transformer folder (../scheduler/)."""
    config, file = read_scheduler_config(path)
    shift = None if config is None else config_number(config, "flow_shift", file, positive=True)
    if shift is not None:
        logging.info("%s: flow shift %s (flow_shift of %s).", path, shift, file)
        return shift
    logging.info("%s: no flow_shift in a scheduler/scheduler_config.json beside it; flow shift %.1f (Wan2.1 720p).",
                 path, DEFAULT_FLOW_SHIFT)
    return DEFAULT_FLOW_SHIFT


def wan_model_config(cfg: WanConfig, shift: float):
    import comfy.supported_models as sm

    model_config = (sm.WAN21_I2V if cfg.image_to_video else sm.WAN21_T2V)(cfg.unet_config())
    model_config.sampling_settings["shift"] = shift
    return model_config


def build_comfy_wan(sd: dict, cfg: WanConfig, weight_dtype: str, shift: float, source: str,
                    disable_dynamic: bool = False):
    """A ModelPatcher of core's WAN21 for a Wan-keyed state dict; tensors copied one at a time (meta build)."""
    model_config = wan_model_config(cfg, shift)
    model, unet_dtype, load_device, offload_device = build_on_meta(model_config, sd, weight_dtype)
    dm = model.diffusion_model
    check_tensors_match(dm.state_dict(), sd, source,
                        f"a Wan2.1 {'i2v' if cfg.image_to_video else 't2v'} transformer with {cfg.num_layers} "
                        f"blocks, width {cfg.dim}, patch {cfg.patch_size}")
    dm.load_state_dict({k: owned(sd.pop(k), unet_dtype) for k in list(sd)}, strict=True, assign=True)
    model.to(offload_device)
    return make_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)


def load_dcgen_wan(path: str, weight_dtype: str = "default"):
    """Load a DC-Gen-Wan2.1 transformer (diffusers folder or file) as a ComfyUI MODEL in the DC-AE-V latent space."""
    m = _load_patcher(path, weight_dtype)
    m.cached_patcher_init = (_load_patcher, (path, weight_dtype))
    return m


def _load_patcher(path: str, weight_dtype: str, disable_dynamic: bool = False):
    sd, cfg = read_wan_checkpoint(path)
    if cfg.out_dim == 16:
        raise DCGenError(f"{path}: expected a DC-Gen-Wan transformer (32 DC-AE-V latent channels), found a base "
                         f"Wan2.1 transformer (16 channels, Wan's VAE): load it with core Load Diffusion Model.")
    expected_in = cfg.out_dim + (4 + cfg.out_dim if cfg.image_to_video else 0)
    if cfg.in_dim != expected_in:
        raise DCGenError(f"{path}: expected {expected_in} input channels for a DC-Gen-Wan "
                         f"{'i2v (noise + 4 mask + condition)' if cfg.image_to_video else 't2v'} transformer with "
                         f"{cfg.out_dim} latent channels, found {cfg.in_dim}.")
    m = build_comfy_wan(sd, cfg, weight_dtype, scheduler_shift(path), path, disable_dynamic)
    install_dcae_v_latent_space(m, cfg)
    install_empty_latent_hook()  # checks the LATENT of a video model (shared.comfy_vae_v.check_video_latent)
    if cfg.image_to_video:
        install_i2v_check(m)
    return m
