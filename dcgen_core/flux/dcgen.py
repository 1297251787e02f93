"""DC-Gen-FLUX in ComfyUI: move a ComfyUI FLUX model into DC-AE latent space.

A DC-Gen model is a FLUX transformer whose input embedder and output head take
C DC-AE latent channels per token, one token per latent pixel (1x1 patches).
ComfyUI's FLUX patchifies 2x2 (hard-coded in v0.3.64, ``patch_size`` in newer
releases). Viewing a natural DC-AE latent (B, C, h, w) through
``pixel_shuffle(., 2)`` as (B, C/4, 2h, 2w) makes that 2x2 patchify produce
exactly the DC-Gen tokens (same order, same channel layout, position ids
[0, row, col]); ``pixel_unshuffle`` undoes it on the way out. This is done by a
diffusion-model wrapper, so the forward of either ComfyUI version is used as is
and LATENTs stay natural (B, C, H/f, W/f) for every core latent node.

Everything is installed on a clone: object patches for the new embedder/head,
latent format and model sampling, and a wrapper. The incoming model is never
modified.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F

from ..shared.comfy_vae import check_resolution
from ..shared.embedding import AlignedEmbedding, check_embedding_for_model
from ..shared.errors import DCGenError
from ..shared.latent_space import (NATIVE_RESOLUTION, SPATIAL_COMPRESSION, check_latent_channels, check_size_for_model,
                                   dcgen_info, encoder_name, install_empty_latent_hook, install_preview_hook,
                                   linear_like, logical_weights, make_latent_format, require_dcgen, resolve_scaling)
from ..shared.schedules import RULES, TimeShift, comfy_model_sampling, official_shift, retarget_sigmas


WRAPPER_KEY = "dcgen_dcae_tokens"


def _dcae_tokens_wrapper(executor, x, *args, **kwargs):
    out = executor(F.pixel_shuffle(x, 2), *args, **kwargs)
    return F.pixel_unshuffle(out, 2)


def flux_config_of(model):
    """The FluxConfig of a ComfyUI FLUX MODEL (read from its weights, as loaded)."""
    from .keys import flux_config_from_state_dict

    dm = require_flux(model)
    return flux_config_from_state_dict(logical_weights(dm), {"axes_dims_rope": list(dm.params.axes_dim)})


def require_flux(model, subject: str = "model"):
    import comfy.ldm.flux.model

    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, comfy.ldm.flux.model.Flux) or not hasattr(dm, "img_in") or not hasattr(dm, "final_layer"):
        raise DCGenError(
            f"{subject}: expected a FLUX model (FLUX.1-dev / Krea-dev loaded with Load Diffusion Model), "
            f"found {type(model.model).__name__} with a {type(dm).__name__} transformer."
        )
    return dm


def _shift_for_image(latent_channels: int, width: int, height: int, rule: str | None = None) -> TimeShift:
    f = SPATIAL_COMPRESSION[latent_channels]
    check_resolution(width, height, f)
    return official_shift(height // f, width // f, latent_channels, rule)


def _dcgen_outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Before sampling a DC-Gen model: reject latents of another model and ControlNets, and re-target
    the schedule to the latent actually sampled (the official shift depends on its size)."""
    guider = executor.class_obj
    info = guider.model_options.get("dcgen")
    if info is not None:
        check_latent_channels(latent_image, info["latent_channels"])
        if latent_image.ndim == 4:  # the model's size range on every sampling path, before the first step
            f = info["spatial_compression"]
            check_size_for_model(info, latent_image.shape[-1] * f, latent_image.shape[-2] * f)
        conds = getattr(guider, "conds", {}) or {}
        reject_controlnets(conds)
        check_text_widths(conds, guider.model_patcher.get_model_object("diffusion_model"))
        configured = getattr(guider.model_patcher.get_model_object("model_sampling"), "time_shift", None)
        if info.get("fixed_resolution") is None and configured is not None and noise.ndim == 4:
            actual = official_shift(noise.shape[-2], noise.shape[-1], info["latent_channels"], configured.rule)
            if actual != configured:
                sigmas = retarget_sigmas(sigmas, configured, actual)
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


def reject_controlnets(conds: dict):
    """FLUX ControlNets cannot drive a DC-Gen model; say so before anything runs.

    A FLUX ControlNet embeds FLUX's own 16-channel latent at 1/8 scale in 2x2 patches and returns one
    residual per FLUX token; a DC-Gen model samples DC-AE latents (C channels at 1/32 or 1/64), so both the
    ControlNet's input and the token grid of its residuals are those of another latent space.
    """
    for cond_list in conds.values():
        for cond in cond_list or []:
            control = cond.get("control") if isinstance(cond, dict) else None
            if control is not None:
                raise DCGenError(
                    f"ControlNet: expected no ControlNet on a DC-Gen model, found {type(control).__name__}. FLUX "
                    "ControlNets read FLUX's 16-channel latent at 1/8 scale in 2x2 patches and add residuals per "
                    "FLUX token; DC-Gen samples DC-AE latents with 4x-16x fewer tokens, so neither fits. Apply the "
                    "ControlNet to the base FLUX model instead (e.g. refine a DC-Gen draft: "
                    "workflows/dcgen-flux-controlnet-chain.json).")


def check_text_widths(conds: dict, dm):
    """CONDITIONING made by another model's text encoder gives a raw matmul error deep in FLUX; say which."""
    context = getattr(getattr(dm, "txt_in", None), "in_features", None)
    vector_in = getattr(dm, "vector_in", None)
    pooled = getattr(getattr(vector_in, "in_layer", None), "in_features", None)
    for cond_list in conds.values():
        for cond in cond_list or []:
            if not isinstance(cond, dict):
                continue
            pooled_found = cond.get("pooled_output")
            if pooled_found is None:
                pooled_found = getattr((cond.get("model_conds") or {}).get("y"), "cond", None)
            for found, expected, what in ((cond.get("cross_attn"), context, "text embeddings"),
                                          (pooled_found, pooled, "a pooled text embedding")):
                if expected is not None and found is not None and found.shape[-1] != expected:
                    raise DCGenError(
                        f"CONDITIONING: expected {what} of width {encoder_name(expected)} for this FLUX model, "
                        f"found {encoder_name(found.shape[-1])}. Encode the prompt with FLUX's text encoders "
                        f"(DualCLIPLoader, type flux: clip_l + t5xxl).")


def set_time_shift(model, width: int, height: int, rule: str | None = None):
    """Clone ``model`` with the DC-Gen time shift of ``rule`` (None: the model's own, see schedules.rule_for_channels)
    fixed to a width x height image; width = height = 0 keep it following the size of the latent sampled."""
    info = require_dcgen(model)
    rule = rule or info["rule"]
    if rule not in RULES:
        raise DCGenError(f"time shift rule: expected one of {list(RULES)}, found '{rule}'.")
    follow = width == 0 and height == 0
    native = NATIVE_RESOLUTION[info["latent_channels"]]
    shift = _shift_for_image(info["latent_channels"], native if follow else width, native if follow else height, rule)
    m = model.clone()
    m.add_object_patch("model_sampling", comfy_model_sampling(shift))
    m.model_options["dcgen"] = {**info, "rule": rule, "fixed_resolution": None if follow else (width, height),
                                "shift": shift.describe() + ("; follows the latent" if follow else "")}
    return m


_FLUX_SHIFT_DEFAULTS = (1.15, 0.5)  # core ModelSamplingFlux's max_shift, base_shift


def install_model_sampling_flux_hook():
    """Core ModelSamplingFlux on a DC-Gen model: the official DC-Gen schedule for the image size it names.

    Left alone it would count width*height/256 tokens (FLUX's 2x2 patches on a 1/8 latent: 4x the 1K model's,
    16x the 4K model's) and silently replace the official shift. Other max/base shifts than core's defaults
    describe FLUX's token count, not DC-Gen's: refused with a pointer to DC-Gen Time Shift.
    """
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get("ModelSamplingFlux")
    original = getattr(cls, "patch", None)
    if original is None or getattr(original, "dcgen_hook", False):
        return

    def patch(self, model, max_shift, base_shift, width, height, *args, **kwargs):
        info = dcgen_info(model) if hasattr(model, "model_options") else None
        if info is None:
            return original(self, model, max_shift, base_shift, width, height, *args, **kwargs)
        if (round(max_shift, 6), round(base_shift, 6)) != _FLUX_SHIFT_DEFAULTS:
            raise DCGenError(
                f"ModelSamplingFlux: expected the default max_shift {_FLUX_SHIFT_DEFAULTS[0]} / base_shift "
                f"{_FLUX_SHIFT_DEFAULTS[1]} on a DC-Gen model (they are then replaced by the official DC-Gen shift "
                f"for {width}x{height}), found {max_shift} / {base_shift}, which describe FLUX's own token count. "
                f"Use DC-Gen Time Shift to choose the rule and size.")
        logging.info("ModelSamplingFlux on a DC-Gen model: the official DC-Gen time shift for %dx%d (%d-channel "
                     "DC-AE latents) instead of FLUX's.", width, height, info["latent_channels"])
        return (set_time_shift(model, width, height),)

    patch.dcgen_hook = True
    cls.patch = patch


def _no_concat_cond(**kwargs):
    return None


def _install_latent_space(m, latent_channels: int, scaling_factor: float, own_model: bool):
    """Latent format, time shift and token wrappers. ``own_model``: the BaseModel is ours (fresh from a loader)."""
    import comfy.patcher_extension as pe

    install_preview_hook()
    install_empty_latent_hook()
    install_model_sampling_flux_hook()
    native = NATIVE_RESOLUTION[latent_channels]
    shift = _shift_for_image(latent_channels, native, native)
    fmt = make_latent_format(latent_channels, scaling_factor)
    sampling = comfy_model_sampling(shift)
    # one DC-Gen token covers one latent pixel, where ComfyUI's FLUX estimate assumes four
    memory_factor = m.model.memory_usage_factor * 4
    if own_model:
        m.model.latent_format = fmt
        m.model.model_sampling = sampling
        m.model.memory_usage_factor = memory_factor
    else:
        m.add_object_patch("latent_format", fmt)
        m.add_object_patch("model_sampling", sampling)
        m.add_object_patch("memory_usage_factor", memory_factor)
    # ComfyUI's FLUX reads img_in's width as C/4 input channels; C/4 above the base's 16 output channels would
    # make it concatenate a (Fill/Kontext-style) conditioning image to the latent. DC-Gen has none.
    m.add_object_patch("concat_cond", _no_concat_cond)
    # installed again (another VAE scaling, a second embedding): the last one wins, never a second token view
    for kind, wrapper in ((pe.WrappersMP.DIFFUSION_MODEL, _dcae_tokens_wrapper),
                          (pe.WrappersMP.OUTER_SAMPLE, _dcgen_outer_sample)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    m.model_options["dcgen"] = {
        "latent_channels": latent_channels,
        "spatial_compression": SPATIAL_COMPRESSION[latent_channels],
        "scaling_factor": scaling_factor,
        "rule": shift.rule,
        "shift": shift.describe() + " at native size; follows the latent",
        "fixed_resolution": None,
    }


def apply_aligned_embedding(model, emb: AlignedEmbedding, vae=None, clone: bool = True):
    """A clone of a ComfyUI FLUX ``model`` that samples DC-AE latents with ``emb``.

    The official time shift for the sampled latent's size is applied at sampling time.
    """
    dm = require_flux(model)
    check_embedding_for_model(emb, hidden_size=dm.hidden_size, source=emb.source)
    c = emb.latent_channels
    scaling = resolve_scaling(c, vae, emb.source)
    info = dcgen_info(model)
    if info is not None and info["latent_channels"] != c:
        raise DCGenError(
            f"{emb.source}: expected an aligned embedding for {info['latent_channels']}-channel DC-AE latents (this "
            f"model already samples them), found one for {c} channels. A DC-Gen model's blocks were fine-tuned for "
            f"its own latent space: apply this embedding to the base FLUX model instead.")
    m = model.clone() if clone else model
    fallback = getattr(model.model, "manual_cast_dtype", None)
    m.add_object_patch("diffusion_model.img_in", linear_like(dm.img_in, emb.img_in_weight, emb.img_in_bias, fallback))
    m.add_object_patch("diffusion_model.final_layer.linear",
                       linear_like(dm.final_layer.linear, emb.out_weight, emb.out_bias, fallback))
    if info is None or info["scaling_factor"] != scaling:
        _install_latent_space(m, c, scaling, own_model=False)
    return m
