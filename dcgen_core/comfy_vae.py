"""A DC-AE as a core ComfyUI VAE object.

``comfy.sd.VAE`` is built from a state dict it recognises; a DC-AE is not one
of them, so we let its constructor set the defaults of whichever ComfyUI
version is running (an empty state dict builds nothing) and then install our
DC-AE, its compression, channel count and a device-managed patcher. Core
VAEDecode, VAEEncode, VAEDecodeTiled and VAEEncodeTiled then work unchanged.
"""

from __future__ import annotations

import logging

import torch

from . import previews
from .dcae import DCAE, estimate_decode_bytes, estimate_encode_bytes, load_dcae
from .errors import DCGenError


class _QuietEmptyVAE(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


class ComfyDCAE(torch.nn.Module):
    """The DC-AE as ComfyUI's ``first_stage_model`` (ComfyUI sets its own attributes, e.g. ``device``, on it).

    Decode/encode tile on their own when the untiled pass would not fit the device.
    """

    def __init__(self, dcae: DCAE):
        super().__init__()
        self.dcae = dcae

    def encode(self, x, **options):
        return self.dcae.encode(x, tiled=None)

    def decode(self, z, **options):
        return self.dcae.decode(z, tiled=None)


def make_comfy_vae(model: DCAE, device=None, dtype=None):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    class DCAEVAE(comfy.sd.VAE):
        def __init__(self, dcae: DCAE):
            quiet = _QuietEmptyVAE()
            logging.getLogger().addFilter(quiet)
            try:
                super().__init__(sd={})
            finally:
                logging.getLogger().removeFilter(quiet)
            cfg = dcae.config
            f = cfg.spatial_compression
            self.first_stage_model = ComfyDCAE(dcae.eval())
            self.dcae_config = dcae.config
            self.latent_channels = dcae.config.latent_channels
            self.downscale_ratio = f
            self.upscale_ratio = f
            self.latent_dim = 2
            self.output_channels = 3
            self.working_dtypes = [torch.bfloat16, torch.float32]
            # per batch item; ComfyUI multiplies by the batch size it picks
            self.memory_used_decode = lambda shape, dt: estimate_decode_bytes(cfg, (1, *shape[1:]), dt)
            self.memory_used_encode = lambda shape, dt: estimate_encode_bytes(cfg, (1, *shape[1:]), dt)
            self.device = device or mm.vae_device()
            self.vae_dtype = dtype or mm.vae_dtype(self.device, self.working_dtypes)
            self.first_stage_model.to(self.vae_dtype)
            self.output_device = mm.intermediate_device()
            self.patcher = comfy.model_patcher.ModelPatcher(
                self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device())

    return DCAEVAE(model)


def load_comfy_vae(path: str, variant: str = "auto"):
    """Load a DC-AE file/folder as a ComfyUI VAE and register its latent-preview factors."""
    model = load_dcae(path, variant=variant)
    cfg = model.config
    factors, bias = previews.fit_latent_rgb(model.encode, cfg.spatial_compression, cfg.scaling_factor)
    previews.register(cfg.latent_channels, factors, bias)
    return make_comfy_vae(model)


def require_dcae(vae, subject: str = "vae"):
    """The DC-AE config of a VAE from Load DC-AE VAE; a clear error for any other VAE."""
    cfg = getattr(vae, "dcae_config", None)
    if cfg is None:
        model = getattr(vae, "first_stage_model", vae)
        raise DCGenError(
            f"{subject}: expected a DC-AE VAE (from Load DC-AE VAE), found a {type(model).__name__} with "
            f"{getattr(vae, 'latent_channels', '?')} latent channels at 1/{getattr(vae, 'downscale_ratio', '?')} "
            f"resolution (e.g. the FLUX/SD VAE).")
    return cfg


def check_resolution(width: int, height: int, f: int, subject: str = "resolution"):
    if width % f or height % f or width <= 0 or height <= 0:
        raise DCGenError(
            f"{subject}: expected width and height that are multiples of {f} (the DC-AE latent grid, one latent "
            f"pixel per {f}x{f} image pixels), found {width}x{height}. "
            f"Nearest: {max(f, round(width / f) * f)}x{max(f, round(height / f) * f)}.")


def empty_dcae_latent(vae, width: int, height: int, batch_size: int = 1) -> torch.Tensor:
    import comfy.model_management as mm

    cfg = require_dcae(vae)
    f = cfg.spatial_compression
    check_resolution(width, height, f, subject=f"Empty DC-AE Latent ({cfg.variant}, f={f})")
    return torch.zeros(batch_size, cfg.latent_channels, height // f, width // f, device=mm.intermediate_device())
