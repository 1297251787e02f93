"""DC-Gen-Wan image-to-video conditioning, as the authors' ``DCVideoGenWanImageToVideoPipeline`` builds it.

Condition video: the start image repeated 4 times (one latent frame), then zeros (in [-1, 1]; grey 0.5 in a
ComfyUI IMAGE) up to the frame count, DC-AE-V encoded; core's ``model_base.WAN21.concat_cond`` scales it by the
latent format (0.7241, the authors' ``latent_condition * scaling_factor``). Mask: 1 on the first latent frame's 4
channels, 0 after (core's ``concat_mask`` is the complement: the model input gets ``1 - concat_mask``). The CLIP
vision output (core CLIP Vision Encode of ViT-H/14, ``penultimate_hidden_states`` = the authors'
``hidden_states[-2]``) goes in as core's ``clip_vision_output``. Frames are rounded down to a multiple of 4.
"""

from __future__ import annotations

import torch

from ..shared.comfy_vae_v import require_dcae_v, video_frames
from ..shared.errors import DCGenError


def wan_image_to_video(positive, negative, vae, width: int, height: int, length: int, batch_size: int,
                       start_image=None, clip_vision_output=None):
    """(positive, negative, empty latent) for a DC-Gen-Wan i2v model (start_image None: t2v latent only)."""
    import comfy.model_management as mm
    import comfy.utils
    import node_helpers

    subject = "DC-Gen Wan I2V"
    cfg = require_dcae_v(vae, f"{subject}: vae")
    f, t = cfg.spatial_compression, cfg.temporal_compression
    frames = video_frames(length, t, f"{subject}: length")
    lat_h, lat_w = height // f, width // f
    if lat_h < 1 or lat_w < 1:
        raise DCGenError(f"{subject}: expected a size of at least {f}x{f}, found {width}x{height}.")
    height, width = lat_h * f, lat_w * f  # the authors' pipeline floors to the grid (720 -> 704)
    latent = torch.zeros(batch_size, cfg.latent_channels, frames // t, lat_h, lat_w, device=mm.intermediate_device())
    if start_image is not None:
        if start_image.ndim != 4 or start_image.shape[-1] < 3:
            raise DCGenError(f"{subject}: expected start_image as an IMAGE (batch, height, width, 3), found shape "
                             f"{list(start_image.shape)}.")
        first = start_image[:1, :, :, :3]
        if first.shape[1:3] != (height, width):
            first = comfy.utils.common_upscale(first.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        video = torch.full((frames, height, width, 3), 0.5, dtype=first.dtype, device=first.device)
        video[:t] = first
        condition = vae.encode(video)
        mask = torch.ones(1, t, frames // t, lat_h, lat_w, dtype=condition.dtype, device=condition.device)
        mask[:, :, 0] = 0.0
        values = {"concat_latent_image": condition, "concat_mask": mask}
        positive = node_helpers.conditioning_set_values(positive, values)
        negative = node_helpers.conditioning_set_values(negative, values)
    if clip_vision_output is not None:
        positive = node_helpers.conditioning_set_values(positive, {"clip_vision_output": clip_vision_output})
        negative = node_helpers.conditioning_set_values(negative, {"clip_vision_output": clip_vision_output})
    return positive, negative, {"samples": latent}


I2V_CHECK_KEY = "dcgen_wan_i2v_requires_image"


def _require_image(executor, x, t, c_concat=None, *args, **kwargs):
    """APPLY_MODEL wrapper of an i2v DC-Gen-Wan: refuse sampling without the start image / CLIP vision."""
    missing = []
    if c_concat is None or c_concat.shape[1] < 4 or not bool(c_concat[:, :4].any()):
        missing.append("the start image (concat_latent_image and its mask)")
    if kwargs.get("clip_fea") is None:
        missing.append("clip_vision_output")
    if missing:
        raise DCGenError(
            f"DC-Gen-Wan i2v model: expected image conditioning, found no {' and no '.join(missing)}. Put DC-Gen-Wan "
            f"Image to Video (with start_image and a CLIP Vision Encode of it) between the prompts and the sampler; "
            f"for text-to-video load transformer_t2v.")
    return executor(x, t, c_concat, *args, **kwargs)


def install_i2v_check(patcher):
    import comfy.patcher_extension as pe

    pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, I2V_CHECK_KEY, _require_image, patcher.model_options,
                            is_model_options=True)
    return patcher
