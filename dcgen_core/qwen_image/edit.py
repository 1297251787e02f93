"""DC-Gen-Qwen-Image-Edit conditioning, as the authors' pipeline prepares it.

The reference image is resized to the authors' ``calculate_dimensions(1024*1024, w/h)`` (multiples of 32, PIL
Lanczos as diffusers' VaeImageProcessor), encoded by the DC-AE (the model's latent format scales it, as the
pipeline's ``latent * scaling_factor``) and attached to the conditioning as ``reference_latents`` (core's Qwen-Image
appends them after the noise tokens; dcgen.py packs them 1x1). The same resized image goes to core's Qwen2.5-VL
encoder with the edit template (core's QwenImageTokenizer uses the authors' template when given an image), for the
prompt and for the negative prompt, as the pipeline encodes both with the image. The output size defaults to the
reference's, floored to multiples of 64 (the pipeline's ``vae_scale_factor * 2``).

Core's TextEncodeQwenImageEdit cannot do this: it resizes to ~1 MP without rounding to 32 and encodes with the VAE
it is given (for Qwen-Image, the Wan VAE).
"""

from __future__ import annotations

import numpy as np
import torch

from ..shared.comfy_vae import check_resolution, require_dcae, zero_latent
from ..shared.errors import DCGenError
from .dcgen import LATENT_CHANNELS, NAME, SPATIAL, calculate_dimensions

RESIZE_MODES = ("authors (~1 MP, multiples of 32)", "none (multiples of 32 already)")
TARGET_AREA = 1024 * 1024


def _lanczos(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL Lanczos on 8-bit images (what diffusers does to the PIL image the pipeline is given)."""
    from PIL import Image

    out = []
    for img in image[..., :3].cpu():
        pil = Image.fromarray((img.numpy() * 255.0).round().clip(0, 255).astype(np.uint8))
        out.append(torch.from_numpy(np.asarray(pil.resize((width, height), resample=Image.Resampling.LANCZOS),
                                               dtype=np.float32) / 255.0))
    return torch.stack(out).to(image.device)


def reference_image(image: torch.Tensor, resize: str = RESIZE_MODES[0]) -> torch.Tensor:
    """The reference IMAGE (B, H, W, 3) at the size the authors' pipeline encodes it."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise DCGenError(f"image: expected an IMAGE (batch, height, width, channels), found shape {list(image.shape)}.")
    h, w = int(image.shape[1]), int(image.shape[2])
    if resize == RESIZE_MODES[0]:
        width, height = calculate_dimensions(TARGET_AREA, w / h)
        return _lanczos(image, width, height)
    if resize != RESIZE_MODES[1]:
        raise DCGenError(f"resize: expected one of {list(RESIZE_MODES)}, found '{resize}'.")
    check_resolution(w, h, SPATIAL, subject=f"reference image for {NAME} (resize: none)")
    return image[..., :3]


def _require_dcae_f32(vae):
    cfg = require_dcae(vae, subject=f"vae ({NAME})")
    if cfg.latent_channels != LATENT_CHANNELS or cfg.spatial_compression != SPATIAL:
        raise DCGenError(f"vae: expected the DC-AE f32c32 of {NAME} ({LATENT_CHANNELS} channels at 1/{SPATIAL}), "
                         f"found '{cfg.variant}' ({cfg.latent_channels} channels at 1/{cfg.spatial_compression}).")
    return cfg


def output_size(ref: torch.Tensor, width: int = 0, height: int = 0) -> tuple[int, int]:
    """The output size: the reference's floored to multiples of 64 (the pipeline's default), or the one asked."""
    if width == 0 and height == 0:
        return int(ref.shape[2]) // 64 * 64, int(ref.shape[1]) // 64 * 64
    check_resolution(width, height, SPATIAL, subject=f"output size for {NAME}")
    return width, height


def attach_reference(conditioning, vae, ref: torch.Tensor):
    """``conditioning`` with the DC-AE latent of ``ref`` (already sized) as its reference latent."""
    import node_helpers

    _require_dcae_f32(vae)
    latent = vae.encode(ref)
    return node_helpers.conditioning_set_values(conditioning, {"reference_latents": [latent]}, append=True)


def reference_conditioning(conditioning, vae, image, resize: str = RESIZE_MODES[0], width: int = 0, height: int = 0):
    """(conditioning + reference latent, empty output LATENT) for conditioning encoded elsewhere."""
    ref = reference_image(image, resize)
    w, h = output_size(ref, width, height)
    return attach_reference(conditioning, vae, ref), {"samples": zero_latent(1, LATENT_CHANNELS, w, h, SPATIAL, NAME)}


def _require_qwen_clip(clip):
    tokenizer = getattr(clip, "tokenizer", None)
    if not hasattr(tokenizer, "llama_template_images"):
        raise DCGenError(f"clip: expected the Qwen2.5-VL 7B text encoder of Qwen-Image (Load CLIP, type qwen_image), "
                         f"found a {type(tokenizer).__name__} tokenizer.")


def encode_edit(clip, vae, image, prompt: str, negative_prompt: str = " ", resize: str = RESIZE_MODES[0],
                width: int = 0, height: int = 0):
    """(positive, negative, empty output LATENT): both prompts encoded with the reference image, both carrying its
    DC-AE latent."""
    _require_qwen_clip(clip)
    _require_dcae_f32(vae)
    ref = reference_image(image, resize)
    w, h = output_size(ref, width, height)
    conds = []
    for text in (prompt, negative_prompt):
        tokens = clip.tokenize(text, images=[ref])
        conds.append(attach_reference(clip.encode_from_tokens_scheduled(tokens), vae, ref))
    return conds[0], conds[1], {"samples": zero_latent(1, LATENT_CHANNELS, w, h, SPATIAL, NAME)}
