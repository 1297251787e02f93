"""The DC-Gen sampler: official schedule, native size or any size on the grid up to 4096x4096, text-to-image and
img2img.

Sampling goes through ComfyUI's own KSampler path (noise, previews, progress,
noise masks), with the model's DC-Gen latent space and time shift.
"""

from __future__ import annotations

from .comfy_vae import require_dcae, zero_latent
from .errors import DCGenError
from .latent_space import NATIVE_RESOLUTION, check_latent_channels, check_size_for_model, require_dcgen


def resolve_size(info: dict, width: int, height: int, latent: dict | None) -> tuple[int, int]:
    """width x height to sample: 0 x 0 = the connected LATENT's size (img2img) or else the model's native size."""
    f = info["spatial_compression"]
    if latent is not None:
        samples = latent["samples"]
        check_latent_channels(samples, info["latent_channels"])
        lw, lh = samples.shape[-1] * f, samples.shape[-2] * f
        if (width, height) not in ((0, 0), (lw, lh)):
            raise DCGenError(f"width/height: expected 0 x 0 (the connected LATENT's size) or its {lw}x{lh}, found "
                             f"{width}x{height}. The LATENT decides the size of img2img; resize it first (e.g. "
                             "upscale the image and encode it with the DC-AE) to refine at another size.")
        return lw, lh
    if width == 0 and height == 0:
        native = NATIVE_RESOLUTION[info["latent_channels"]]
        return native, native
    if width == 0 or height == 0:
        raise DCGenError(f"width/height: expected both 0 (the model's native size) or both set, found "
                         f"{width}x{height}.")
    return width, height


def sample(model, positive, width: int, height: int, steps: int, guidance: float, seed: int, sampler_name: str,
           scheduler: str, denoise: float = 1.0, latent: dict | None = None, vae=None, negative=None,
           batch_size: int = 1):
    """(LATENT, IMAGE or None): sample ``model`` at width x height (0 x 0: native), or refine ``latent``."""
    import node_helpers
    import nodes

    info = require_dcgen(model)
    f = info["spatial_compression"]
    width, height = resolve_size(info, width, height, latent)
    check_size_for_model(info, width, height)
    if latent is not None and batch_size not in (1, latent["samples"].shape[0]):
        raise DCGenError(f"batch_size: expected 1 or the connected LATENT's batch {latent['samples'].shape[0]}, "
                         f"found {batch_size}.")
    if vae is not None and require_dcae(vae).latent_channels != info["latent_channels"]:
        raise DCGenError(f"vae: expected the {info['latent_channels']}-channel DC-AE of this model, found "
                         f"'{vae.dcae_config.variant}' with {vae.dcae_config.latent_channels} channels.")
    if latent is None:
        latent = {"samples": zero_latent(batch_size, info["latent_channels"], width, height, f, "DC-Gen Sampler")}
    if info.get("guidance") == "cfg":  # classifier-free guidance (SANA): guidance is the cfg scale (SANA: 4.5)
        if negative is None:
            raise DCGenError("negative: expected the negative prompt for a SANA model (CLIP Text Encode of \"\" with "
                             "DC-Gen Load Gemma-2: SANA uses classifier-free guidance) or DC-Gen-Qwen-Image-Edit (the "
                             "negative of DC-Gen Qwen Edit Encode), found none connected.")
        cfg = guidance
    else:  # guidance-distilled FLUX runs at cfg 1 with its guidance embedding: the negative is never evaluated
        positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance})
        negative, cfg = negative if negative is not None else positive, 1.0
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise)
    image = vae.decode(out["samples"]) if vae is not None else None
    return out, image
