"""DC-Gen on Wan2.1: the DC-AE-V latent space of a DC-Gen-Wan MODEL (latent format, ``model_options["dcgen"]``).

DC-Gen-Wan ships whole transformers (its patch embedding and head already take DC-AE-V latents), so there is no
aligned-embedding adapter to apply to a base Wan2.1; :func:`apply_aligned_embedding` says so.
"""

from __future__ import annotations

from ..shared.comfy_vae_v import make_video_latent_format
from ..shared.dcae_v import WAN_SCALING_FACTOR
from ..shared.errors import DCGenError


def install_dcae_v_latent_space(patcher, cfg):
    """DC-AE-V latent format (32 channels, 5-D, scaling 0.7241) and the DC-Gen facts on a DC-Gen-Wan patcher."""
    fmt = make_video_latent_format(cfg.out_dim, WAN_SCALING_FACTOR)
    patcher.model.latent_format = fmt
    patcher.model.model_config.latent_format = fmt
    patcher.model_options.setdefault("dcgen", {}).update({
        "family": "wan", "latent_channels": cfg.out_dim, "scaling_factor": WAN_SCALING_FACTOR,
        "spatial_compression": 32, "temporal_compression": 4, "guidance": "cfg",
        "image_to_video": cfg.image_to_video, "patch_size": cfg.patch_size,
    })
    return patcher


def apply_aligned_embedding(model, emb, vae=None, clone=True):
    raise DCGenError(f"{emb.source}: DC-Gen-Wan2.1 ships whole transformers (transformer_t2v/, transformer_i2v/); "
                     f"no aligned embedding for a base Wan2.1 is published. Load the DC-Gen-Wan transformer with "
                     f"DC-Gen Load Wan instead.")
