"""DC-Gen-Qwen-Image-Edit in ComfyUI: core's Qwen-Image transformer on 1x1-patch DC-AE f32c32 latents.

Tokens. Core's Qwen-Image patchifies 2x2 (hard-coded in ``process_img`` on v0.3.64 and v0.33). A DC-AE latent
(B, C, h, w) seen through ``pixel_shuffle(., 2)`` as (B, C/4, 2h, 2w) gives exactly the authors' 1x1 tokens (same
order, same channels); the edit reference latents go through the same view and core appends them after the noise
tokens; ``pixel_unshuffle`` undoes the view on the first (noise) tokens core returns. A DIFFUSION_MODEL wrapper does
this, so LATENTs stay natural (B, C, H/32, W/32).

Positions. Core's RoPE ids are not the authors' p=1 grid in two cases: an odd token grid (core centres rows at
i - h//2, diffusers' QwenEmbedRope at i - ceil(h/2)) and text positions (core starts them at max(h, w)//2 of the
noise grid only, diffusers over every image in ``img_shapes``, the reference included). The edit reference is often
odd (calculate_dimensions rounds to multiples of 32 px = 1 token). The wrapper therefore hands core's RoPE embedder
the authors' ids (``_AuthorsGrid``, an object patch of ``diffusion_model.pe_embedder``); the rest of core's forward
runs as is on both versions.

Schedule and guidance. The authors' pipeline: sigmas linspace(1, 1/steps), FlowMatchEulerDiscreteScheduler with the
exponential shift mu = calculate_shift(noise tokens) and the terminal stretch of its scheduler config, timestep =
sigma, true CFG on the velocity with the per-token norm rescale, output = the noise tokens. The loaded MODEL carries a
model sampling with mu of a 1024x1024 image; an OUTER_SAMPLE wrapper re-makes any schedule for the latent actually
sampled (same unshifted times, mu of its token count, terminal stretch), so core's "simple" scheduler (t = 1 - i/steps)
gives the authors' sigmas; a ``sampler_cfg_function`` does the norm rescale in core's CFG.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ..shared.embedding import AlignedEmbedding, check_embedding_for_model
from ..shared.errors import DCGenError
from ..shared.latent_space import (check_context_width, check_latent_channels, dcgen_info, install_empty_latent_hook,
                                   install_preview_hook, linear_like, make_latent_format, resolve_scaling)
from ..shared.schedules import EXPONENTIAL, LINEAR, TimeShift, comfy_model_sampling

WRAPPER_KEY = "dcgen_qwen_image_tokens"
LATENT_CHANNELS = 32
SPATIAL = 32
NAME = "DC-Gen-Qwen-Image-Edit"

#: The scheduler config the authors' pipeline reads (``scheduler/scheduler_config.json``: calculate_shift's
#: base_image_seq_len, max_image_seq_len, base_shift, max_shift and FlowMatchEulerDiscreteScheduler's
#: use_dynamic_shifting, time_shift_type, shift, shift_terminal) when the release folder has none (scheduler.py
#: reads it when it is there): Qwen-Image-Edit's values, which the DC release is built from.
SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
             "shift_terminal": 0.02, "use_dynamic_shifting": True, "time_shift_type": "exponential", "shift": 1.0}
NATIVE_TOKENS = (1024 // SPATIAL) ** 2


def qwen_mu(tokens: int, cfg: dict = SCHEDULER) -> float:
    """The authors' calculate_shift for ``tokens`` noise tokens (one per DC-AE latent pixel)."""
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return tokens * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]


def edit_shift(tokens: int, cfg: dict = SCHEDULER) -> TimeShift:
    """FlowMatchEulerDiscreteScheduler's shift for ``tokens`` noise tokens: with use_dynamic_shifting its
    exponential (e^mu / (e^mu + 1/t - 1)) or linear (mu / (mu + 1/t - 1): LINEAR with r = mu) time shift of mu =
    calculate_shift(tokens), else its static ``shift`` (shift t / (1 + (shift - 1) t))."""
    if not cfg.get("use_dynamic_shifting", True):
        return TimeShift(LINEAR, float(cfg.get("shift", 1.0)))
    mu = qwen_mu(tokens, cfg)
    return TimeShift(LINEAR if cfg.get("time_shift_type") == "linear" else EXPONENTIAL, mu)


def edit_sigmas(unshifted: torch.Tensor, tokens: int, cfg: dict = SCHEDULER) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's sigmas for unshifted times (trailing zeros kept): the shift of
    ``edit_shift``, then the stretch that ends the last non-zero sigma at ``shift_terminal``."""
    t = unshifted.double()
    nonzero = t > 0
    shifted = edit_shift(tokens, cfg).apply(t.clamp(min=1e-12))
    terminal = cfg.get("shift_terminal")
    if terminal:
        last = shifted[nonzero][-1]
        shifted = 1 - (1 - shifted) / ((1 - last) / (1 - terminal))
    return torch.where(nonzero, shifted, torch.zeros_like(t)).to(unshifted.dtype)


def native_shift(cfg: dict = SCHEDULER) -> TimeShift:
    return edit_shift(NATIVE_TOKENS, cfg)


def _grid(latent: torch.Tensor, subject: str) -> tuple[int, int]:
    if latent.ndim == 5 and latent.shape[2] == 1:
        latent = latent[:, :, 0]
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise DCGenError(
            f"{subject}: expected a DC-AE f32c32 latent (32 channels, one token per 32x32 px) for {NAME}, found "
            f"shape {list(latent.shape)}{' (a Wan VAE latent of base Qwen-Image)' if latent.shape[1] == 16 else ''}. "
            f"Encode the reference with DC-Gen Qwen Encode and the DC-AE f32c32.")
    return int(latent.shape[-2]), int(latent.shape[-1])


def authors_ids(grids: list[tuple[int, int]], text_tokens: int) -> torch.Tensor:
    """Position ids (1, text + image tokens, 3) of diffusers' QwenEmbedRope (scale_rope) for ``img_shapes`` =
    [(1, h, w) noise, (1, h, w) per reference], text first as core concatenates them."""
    parts = []
    for index, (h, w) in enumerate(grids):
        rows = torch.arange(h, dtype=torch.float32) - (h - h // 2)
        cols = torch.arange(w, dtype=torch.float32) - (w - w // 2)
        ids = torch.zeros(h, w, 3)
        ids[..., 0] = index
        ids[..., 1] = rows[:, None]
        ids[..., 2] = cols[None, :]
        parts.append(ids.reshape(-1, 3))
    start = max(max(h // 2, w // 2) for h, w in grids)
    txt = torch.arange(start, start + text_tokens, dtype=torch.float32)[:, None].repeat(1, 3)
    return torch.cat([txt, *parts])[None]


class _AuthorsGrid(torch.nn.Module):
    """Core's RoPE embedder fed the authors' ids while the token wrapper has set them."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.ids = None

    def forward(self, ids):
        if self.ids is None:
            raise DCGenError(f"{NAME}: internal error, the RoPE embedder ran outside the DC-Gen token wrapper.")
        if self.ids.shape[1] != ids.shape[1]:
            raise DCGenError(f"{NAME}: expected {self.ids.shape[1]} text + image tokens, core built {ids.shape[1]} "
                             "(a patch that adds tokens is not supported on this model).")
        return self.embedder(self.ids.to(device=ids.device, dtype=ids.dtype).expand(ids.shape[0], -1, -1))


def _ref_index(dm) -> int:
    """Position of ``ref_latents`` among the forward's arguments after ``x`` (it moved between versions)."""
    names = list(inspect.signature(type(dm)._forward).parameters)[1:]
    return names.index("ref_latents") - 1


def _view(latent: torch.Tensor) -> torch.Tensor:
    if latent.ndim == 5:
        latent = latent[:, :, 0]
    return F.pixel_shuffle(latent, 2).unsqueeze(2)


def _tokens_wrapper(executor, x, *args, **kwargs):
    dm = executor.class_obj
    pe = dm.pe_embedder
    if not isinstance(pe, _AuthorsGrid):
        raise DCGenError(f"{NAME}: internal error, the RoPE object patch is missing.")
    args = list(args)
    i = _ref_index(dm)
    refs = kwargs.pop("ref_latents", None) if "ref_latents" in kwargs else args[i]
    method = kwargs.get("ref_latents_method", "index")
    if method not in ("index", None):
        raise DCGenError(f"reference_latents_method: expected 'index' (the authors' packing) for {NAME}, "
                         f"found '{method}'.")
    grids = [_grid(x, "LATENT")] + [_grid(r, "reference latent") for r in (refs or [])]
    refs = None if refs is None else [_view(r) for r in refs]
    if "ref_latents" in kwargs or i >= len(args):
        kwargs["ref_latents"] = refs
    else:
        args[i] = refs
    context = args[1]
    if context.shape[-1] != dm.txt_in.in_features:
        raise DCGenError(f"CONDITIONING: expected text embeddings of width {dm.txt_in.in_features} (Qwen2.5-VL 7B) "
                         f"for {NAME}, found {context.shape[-1]}. Encode with the qwen_2.5_vl_7b text encoder "
                         "(Load CLIP, type qwen_image).")
    pe.ids = authors_ids(grids, context.shape[1])
    try:
        out = executor(_view(x), *args, **kwargs)
    finally:
        pe.ids = None
    out = F.pixel_unshuffle(out[:, :, 0], 2)
    return out if x.ndim == 4 else out.unsqueeze(2)


def _outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """Before sampling: reject latents of another model, and make the schedule the authors' for this latent."""
    guider = executor.class_obj
    info = guider.model_options.get("dcgen") or {}
    if info.get("family") == NAME:
        if latent_image.ndim == 4:
            check_latent_channels(latent_image, LATENT_CHANNELS)
        h, w = _grid(latent_image, "LATENT")
        check_context_width(getattr(guider, "conds", {}) or {},
                            guider.model_patcher.get_model_object("diffusion_model").txt_in.in_features, NAME,
                            "Encode with the qwen_2.5_vl_7b text encoder (Load CLIP, type qwen_image).")
        configured = getattr(guider.model_patcher.get_model_object("model_sampling"), "time_shift", None)
        if configured is not None:
            unshifted = torch.where(sigmas > 0, configured.inverse(sigmas.double().clamp(min=1e-12)),
                                    torch.zeros_like(sigmas.double()))
            sigmas = edit_sigmas(unshifted, h * w, info.get("scheduler", SCHEDULER)).to(sigmas.dtype)
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


def norm_rescaled_cfg(args):
    """The authors' true CFG: comb = uncond + s (cond - uncond) on the velocity, rescaled per token (over channels)
    to the conditional prediction's norm. Core passes sigma * velocity as cond/uncond; the ratio is the same."""
    cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
    comb = uncond + scale * (cond - uncond)
    return comb * (torch.norm(cond, dim=1, keepdim=True) / torch.norm(comb, dim=1, keepdim=True))


def install_latent_space(m, scaling_factor: float, own_model: bool, scheduler: dict = SCHEDULER,
                         scheduler_source: str = "Qwen-Image-Edit's values"):
    """Latent format, model sampling, token/position wrapper, schedule (of the ``scheduler`` config) and CFG on
    ``m`` (a clone, or a fresh patcher when ``own_model``)."""
    import comfy.patcher_extension as pe

    install_preview_hook()
    install_empty_latent_hook()
    fmt = make_latent_format(LATENT_CHANNELS, scaling_factor)
    native = native_shift(scheduler)
    sampling = comfy_model_sampling(native)
    memory_factor = m.model.memory_usage_factor * 4  # one token per latent pixel, where core assumes four
    if own_model:
        m.model.latent_format, m.model.model_sampling, m.model.memory_usage_factor = fmt, sampling, memory_factor
    else:
        m.add_object_patch("latent_format", fmt)
        m.add_object_patch("model_sampling", sampling)
        m.add_object_patch("memory_usage_factor", memory_factor)
    embedder = m.get_model_object("diffusion_model.pe_embedder")
    m.add_object_patch("diffusion_model.pe_embedder",
                       _AuthorsGrid(embedder.embedder if isinstance(embedder, _AuthorsGrid) else embedder))
    for kind, wrapper in ((pe.WrappersMP.DIFFUSION_MODEL, _tokens_wrapper),
                          (pe.WrappersMP.OUTER_SAMPLE, _outer_sample)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    m.set_model_sampler_cfg_function(norm_rescaled_cfg)
    m.model_options["dcgen"] = {
        "family": NAME, "name": NAME, "latent_channels": LATENT_CHANNELS, "spatial_compression": SPATIAL,
        "scaling_factor": scaling_factor, "rule": EXPONENTIAL, "guidance": "cfg", "fixed_resolution": None,
        "scheduler": dict(scheduler),
        "shift": (f"calculate_shift of the noise tokens ({native.describe()} at 1024x1024)"
                  if scheduler.get("use_dynamic_shifting", True) else f"static flow shift {native.value}")
                 + f", terminal {scheduler.get('shift_terminal')} ({scheduler_source}); follows the latent",
    }


def require_qwen_image(model, subject: str = "model"):
    import comfy.ldm.qwen_image.model as qm

    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, qm.QwenImageTransformer2DModel):
        raise DCGenError(f"{subject}: expected a Qwen-Image model (Qwen-Image-Edit from Load Diffusion Model, or "
                         f"DC-Gen Load Qwen), found {type(model.model).__name__} with a "
                         f"{type(dm).__name__} transformer.")
    return dm


def apply_aligned_embedding(model, emb: AlignedEmbedding, vae=None, clone: bool = True):
    """A clone of a ComfyUI Qwen-Image ``model`` with the DC-Gen embedder (``img_in``) and head (``proj_out``) of
    ``emb``, sampling DC-AE f32c32 latents."""
    dm = require_qwen_image(model)
    check_embedding_for_model(emb, hidden_size=dm.inner_dim, latent_channels=LATENT_CHANNELS, source=emb.source)
    scaling = resolve_scaling(LATENT_CHANNELS, vae, emb.source)
    m = model.clone() if clone else model
    fallback = getattr(model.model, "manual_cast_dtype", None)
    m.add_object_patch("diffusion_model.img_in", linear_like(dm.img_in, emb.img_in_weight, emb.img_in_bias, fallback))
    m.add_object_patch("diffusion_model.proj_out", linear_like(dm.proj_out, emb.out_weight, emb.out_bias, fallback))
    info = dcgen_info(model)
    if info is None or info["scaling_factor"] != scaling:
        install_latent_space(m, scaling, own_model=False, scheduler=(info or {}).get("scheduler", SCHEDULER))
    return m


def is_dcgen_qwen(model) -> bool:
    return (dcgen_info(model) or {}).get("family") == NAME


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """The authors' calculate_dimensions: (width, height) of ~target_area px at ``ratio``, multiples of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32
