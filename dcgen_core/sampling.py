"""The DC-Gen sampler: official schedule, size presets up to 4096x4096, text-to-image and img2img.

Sampling goes through ComfyUI's own KSampler path (noise, previews, progress,
noise masks), with the model's DC-Gen latent space and time shift.
"""

from __future__ import annotations

import torch

from .comfy_vae import require_dcae
from .errors import DCGenError
from .flux import check_latent_channels, check_size_for_model, require_dcgen

SIZE_PRESETS = {
    "custom (width x height)": None,
    "4096x4096 (1:1, 4K)": (4096, 4096),
    "4096x2304 (16:9)": (4096, 2304),
    "2304x4096 (9:16)": (2304, 4096),
    "4096x3072 (4:3)": (4096, 3072),
    "3072x4096 (3:4)": (3072, 4096),
    "3072x3072 (1:1)": (3072, 3072),
    "2048x2048 (1:1, 2K)": (2048, 2048),
    "2048x1152 (16:9)": (2048, 1152),
    "1024x1024 (1:1, 1K)": (1024, 1024),
}


def resolve_size(preset: str, width: int, height: int) -> tuple[int, int]:
    if preset not in SIZE_PRESETS:
        raise DCGenError(f"size: expected one of {list(SIZE_PRESETS)}, found '{preset}'.")
    return SIZE_PRESETS[preset] or (width, height)


def sample(model, positive, width: int, height: int, steps: int, guidance: float, seed: int, sampler_name: str,
           scheduler: str, denoise: float = 1.0, latent: dict | None = None, vae=None, negative=None):
    """(LATENT, IMAGE or None): sample ``model`` at width x height, or refine ``latent`` (img2img)."""
    import node_helpers
    import nodes

    info = require_dcgen(model)
    f = info["spatial_compression"]
    if latent is not None:
        samples = latent["samples"]
        check_latent_channels(samples, info["latent_channels"])
        width, height = samples.shape[-1] * f, samples.shape[-2] * f
    check_size_for_model(info, width, height)
    if latent is None:
        import comfy.model_management as mm

        latent = {"samples": torch.zeros(1, info["latent_channels"], height // f, width // f,
                                         device=mm.intermediate_device())}
    if vae is not None and require_dcae(vae).latent_channels != info["latent_channels"]:
        raise DCGenError(f"vae: expected the {info['latent_channels']}-channel DC-AE of this model, found "
                         f"'{vae.dcae_config.variant}' with {vae.dcae_config.latent_channels} channels.")
    positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
    # guidance-distilled FLUX runs at cfg 1: the negative is never evaluated
    (out,) = nodes.common_ksampler(model, seed, steps, 1.0, sampler_name, scheduler, positive,
                                   negative if negative is not None else positive, latent, denoise=denoise)
    image = vae.decode(out["samples"]) if vae is not None else None
    return out, image
