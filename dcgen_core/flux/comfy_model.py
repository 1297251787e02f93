"""FLUX as a ComfyUI model: the model config and ModelPatcher of a BFL-keyed FLUX of any width, depth and channel
count (what differs between ComfyUI versions in building one included), and the bf16 loader for every file and folder
layout the pack reads. The DC-AE latent space a DC-Gen-FLUX samples in is installed by dcgen.py."""

from __future__ import annotations

import dataclasses
import logging

from ..shared.checkpoints import check_tensors_match, load_checkpoint, owned, weight_format
from ..shared.comfy_compat import make_model_patcher
from ..shared.errors import DCGenError
from ..shared.keys import strip_prefix
from ..shared.latent_space import SPATIAL_COMPRESSION, build_on_meta, load_with_cached_init, resolve_scaling
from ..shared.quant.svdquant.folder import split_file_hint
from .dcgen import _install_latent_space
from .keys import diffusers_to_bfl, flux_config_from_state_dict, is_bfl_flux, is_diffusers_flux


def flux_model_config(sd_bfl: dict, cfg, source: str):
    """ComfyUI's model config (supported_models.Flux) for a FLUX of ``cfg``: any width, depth and channel count
    (a DC-Gen model of C channels runs as patch_size 2, in_channels C/4 on the pixel-shuffled latent)."""
    import comfy.model_detection

    if cfg.img_in_features % 4 or cfg.out_features % 4:
        raise DCGenError(f"{source}: expected in/out channel counts divisible by 4, "
                         f"found {cfg.img_in_features}/{cfg.out_features}.")
    unet_config = comfy.model_detection.detect_unet_config(sd_bfl, "") or {"image_model": "flux"}
    unet_config.update(image_model="flux", **cfg.comfy_flux_kwargs(patch_size=2))
    unet_config = flux_params_kwargs(unet_config)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd_bfl)
    if model_config is None:
        raise DCGenError(f"{source}: ComfyUI has no FLUX model class for config {unet_config}.")
    return model_config


def build_comfy_flux(sd_bfl: dict, cfg, weight_dtype: str = "default", source: str = "checkpoint",
                     disable_dynamic: bool = False, replace: dict | None = None):
    """A ComfyUI FLUX ModelPatcher for a BFL-keyed state dict of any width/depth/channel count.

    The model is built on the meta device and each tensor (a view of the mapped file, or a
    :class:`~.flux_keys.FusedTensor`) is copied into private memory in the weight dtype and assigned, one at a
    time, so the peak private memory of a load stays near the final model size. ``replace`` (module path ->
    module, already loaded) swaps in modules that hold their own weights (4-bit SVDQuant linears); ``sd_bfl``
    then carries only shape stand-ins for their weights.
    """
    model_config = flux_model_config(sd_bfl, cfg, source)
    model, unet_dtype, load_device, offload_device = build_on_meta(model_config, sd_bfl, weight_dtype)
    dm = model.diffusion_model
    sd_bfl = flux_model_keys(model_config, sd_bfl)
    replaced = tuple(f"{path}." for path in (replace or {}))
    for path, module in (replace or {}).items():
        parent, _, name = path.rpartition(".")
        setattr(dm.get_submodule(parent) if parent else dm, name, module)
    sd_bfl = {k: v for k, v in sd_bfl.items() if not k.startswith(replaced)}
    expected = {k: v for k, v in dm.state_dict().items() if not k.startswith(replaced)}
    check_tensors_match(expected, sd_bfl, source,
                        f"a FLUX transformer with {cfg.depth} double / {cfg.depth_single_blocks} single blocks")
    # owned memory, one tensor at a time: the model never stays backed by the file, and a load peaks near its size
    result = dm.load_state_dict({k: owned(sd_bfl.pop(k), unet_dtype) for k in list(sd_bfl)}, strict=False,
                                assign=True)
    assert not result.unexpected_keys and all(k.startswith(replaced) for k in result.missing_keys)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise DCGenError(f"{source}: internal error, tensors left unloaded: {leftovers[:4]}")
    model.to(offload_device)
    return make_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)


def load_flux_transformer(path: str, weight_dtype: str = "default", vae=None):
    """Load a DC-Gen-FLUX (or base FLUX) transformer file or diffusers folder as a ComfyUI MODEL.

    The patcher carries ``cached_patcher_init`` as core loaders' do, so ComfyUI (v0.33) can rebuild a pristine
    copy: MultiGPU deep clones, and the non-dynamic delegate that hooks need under dynamic VRAM.
    """
    return load_with_cached_init(_load_flux_patcher, path, weight_dtype, vae=vae)


def read_flux_checkpoint(path: str):
    """(BFL-keyed state dict of mapped views / lazy fused tensors, FluxConfig, Checkpoint without its tensors) of
    a FLUX transformer file or diffusers folder in any layout the pack loads."""
    ckpt = load_checkpoint(path, component="transformer")
    sd = strip_prefix(ckpt.state_dict)
    del ckpt.state_dict
    four_bit = {"nvfp4": "NVFP4", "svdquant": "nunchaku SVDQuant"}.get(weight_format(sd, ckpt.metadata))
    half = split_file_hint(path)  # one of the two files of nunchaku's pre-v1 folder, picked alone
    if four_bit:
        raise DCGenError(f"{path}: expected a bf16/fp16/fp32 FLUX transformer, found a 4-bit {four_bit} file."
                         f"{half or ' Load it with DC-Gen Load 4-bit.'}")
    if is_diffusers_flux(sd):
        sd = diffusers_to_bfl(sd, lazy=True)
    elif not is_bfl_flux(sd):
        sample = ", ".join(sorted(sd)[:3])
        qwen = (" (a Qwen-Image transformer: load DC-Gen-Qwen-Image-Edit with DC-Gen Load Qwen)"
                if "txt_norm.weight" in sd else "")
        raise DCGenError(f"{path}: expected a FLUX transformer (diffusers or BFL/ComfyUI keys), found keys like "
                         f"{sample}{qwen}.{half}")
    return sd, flux_config_from_state_dict(sd, ckpt.config), ckpt


def dcgen_channels(cfg, source: str) -> int | None:
    """The DC-AE channel count of a DC-Gen transformer; None for a base FLUX (16-channel latents, 2x2 patches)."""
    c_in, c_out = cfg.img_in_features, cfg.out_features
    if c_in == c_out == 64:
        logging.info("%s: base FLUX (16-channel latents, 2x2 patches); loaded without DC-AE latent space.", source)
        return None
    if c_in != c_out or c_in not in SPATIAL_COMPRESSION:
        raise DCGenError(f"{source}: expected a DC-Gen transformer whose embedder and head take the same DC-AE "
                         f"channel count (32, 128 or 512), found {c_in} in / {c_out} out.")
    return c_in


def _load_flux_patcher(path: str, weight_dtype: str, vae=None, disable_dynamic: bool = False):
    sd, cfg, _ = read_flux_checkpoint(path)
    channels = dcgen_channels(cfg, path)
    scaling = None if channels is None else resolve_scaling(channels, vae, path)
    m = build_comfy_flux(sd, cfg, weight_dtype, source=path, disable_dynamic=disable_dynamic)
    if channels is not None:
        _install_latent_space(m, channels, scaling, own_model=True)
    return m


#: FluxParams fields that newer ComfyUI requires and FLUX.1 leaves at these values
#: (``txt_ids_dims`` since v0.4: FLUX.1's text position ids are all zero).
_FLUX1_PARAM_DEFAULTS = {"txt_ids_dims": []}


def flux_params_kwargs(kwargs: dict) -> dict:
    """``comfy.ldm.flux.model.Flux`` keyword arguments for FLUX.1, completed with the fields this ComfyUI requires."""
    import comfy.ldm.flux.model as flux_model

    fields = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    out = dict(kwargs)
    for name, value in _FLUX1_PARAM_DEFAULTS.items():
        if name in fields and name not in out:
            out[name] = list(value)
    return out


def flux_model_keys(model_config, sd: dict) -> dict:
    """``sd`` (BFL keys) renamed the way this ComfyUI's loader renames a FLUX state dict.

    v0.33 names FLUX's RMSNorm parameters ``.weight`` (BFL files say ``.scale``) and its
    ``supported_models.Flux.process_unet_state_dict`` renames them; v0.3.64 keeps ``.scale``.
    """
    return model_config.process_unet_state_dict(dict(sd))
