"""A DC-AE-V as a core ComfyUI video VAE, its latent format and empty latents.

As for the image DC-AE (:mod:`.comfy_vae`), ``comfy.sd.VAE`` is built empty and given our model. The video facts
core reads: ``latent_dim`` 3, ``downscale_ratio``/``upscale_ratio`` (frames / 4, 32, 32) and their index formulas.
Core VAE Encode hands (1, 3, F, H, W) in [-1, 1], VAE Decode gets (B, 3, F, H, W) back and flattens it to frames,
so Save WEBM / Create Video / Save Video take the result. Encode and decode run chunk by chunk (40 frames, the
feature cache carrying the context) with a progress step and a Cancel check per chunk, and cut each chunk into
feathered spatial tiles when one chunk would not fit the device.
"""

from __future__ import annotations

import logging
import os

import torch

from . import previews
from .comfy_vae import init_empty_core_vae, place_core_vae
from .dcae_v import DCAEV, decode_video, encode_video, estimate_chunk_bytes, load_dcae_v, pick_tile, preferred_file
from .dcae_v.chunked import tile_count
from .errors import DCGenError

PREVIEW_KEY = "dcae-v"
_fits: dict[tuple, tuple] = {}


class ComfyDCAEV(torch.nn.Module):
    """The DC-AE-V as ComfyUI's ``first_stage_model``: checks, chunked runs, progress, Cancel, automatic tiles."""

    def __init__(self, dcae_v: DCAEV):
        super().__init__()
        self.dcae_v = dcae_v
        self.tile: int | None = None  # None: automatic (tiles only when a chunk would not fit)
        self.output_device = None

    def _progress(self, total: int):
        import comfy.model_management as mm
        import comfy.utils

        pbar = comfy.utils.ProgressBar(total)

        def step(*_):
            pbar.update(1)
            mm.throw_exception_if_processing_interrupted()  # Cancel stops between chunks

        return step

    def _tile(self, height: int, width: int) -> int | None:
        if self.tile is not None:
            return self.tile
        return pick_tile(self.dcae_v.config, height, width, self.dcae_v.dtype, self.dcae_v.device)

    def encode(self, x, **options):
        cfg = self.dcae_v.config
        if x.ndim == 4:  # core VAE Encode of a not_video VAE; ours is a video VAE, so this is an API misuse
            raise DCGenError(f"VAE Encode ({cfg.variant}): expected video frames (1, 3, F, H, W), found shape "
                             f"{list(x.shape)}.")
        tile = self._tile(x.shape[-2], x.shape[-1])
        chunks = -(-x.shape[2] // cfg.chunk_frames) * x.shape[0]
        step = self._progress(chunks)
        out = [encode_video(self.dcae_v, x[i:i + 1], tile=tile, progress=step, output_device=self.output_device)
               for i in range(x.shape[0])]
        return torch.cat(out)

    def decode(self, z, **options):
        cfg = self.dcae_v.config
        if z.ndim == 4 and z.shape[1] == cfg.latent_channels:
            raise DCGenError(
                f"VAE Decode ({cfg.variant}): expected a video latent (batch, {cfg.latent_channels}, frames/4, "
                f"height/32, width/32), found a 4-D image latent {list(z.shape)} (e.g. from the image DC-AE, "
                f"whose latents also have 32 channels). Decode it with the DC-Gen Load DC-AE node's VAE.")
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            hint = (" That is a Wan2.1 VAE latent (16 channels at 1/8): decode it with Wan's VAE."
                    if z.ndim == 5 and z.shape[1] == 16 else "")
            raise DCGenError(f"VAE Decode ({cfg.variant}): expected a DC-AE-V latent (batch, {cfg.latent_channels}, "
                             f"frames/4, height/32, width/32), found shape {list(z.shape)}.{hint}")
        tile = self._tile(z.shape[-2] * cfg.spatial_compression, z.shape[-1] * cfg.spatial_compression)
        chunks = -(-z.shape[2] // cfg.chunk_latent_frames) * z.shape[0]
        step = self._progress(chunks)
        out = [decode_video(self.dcae_v, z[i:i + 1], tile=tile, progress=step, output_device=self.output_device)
               for i in range(z.shape[0])]
        return torch.cat(out)


def make_comfy_vae_v(model: DCAEV, device=None, dtype=None, disable_dynamic: bool = False):
    import comfy.sd

    class DCAEVVAE(comfy.sd.VAE):
        def __init__(self, dcae_v: DCAEV):
            init_empty_core_vae(self)
            cfg = dcae_v.config
            f, t = cfg.spatial_compression, cfg.temporal_compression
            self.first_stage_model = ComfyDCAEV(dcae_v.eval())
            self.dcae_v_config = cfg
            self.latent_channels = cfg.latent_channels
            self.latent_dim = 3
            self.not_video = False
            self.downscale_ratio = (lambda a: max(0, a // t), f, f)
            self.upscale_ratio = (lambda a: max(0, a * t), f, f)
            self.downscale_index_formula = (t, f, f)
            self.upscale_index_formula = (t, f, f)
            self.output_channels = 3
            # one chunk at a time, whatever the clip length (core divides free memory by this to batch items)
            self.memory_used_decode = lambda shape, dt: estimate_chunk_bytes(
                cfg, shape[-2] * f, shape[-1] * f, dt, False)
            self.memory_used_encode = lambda shape, dt: estimate_chunk_bytes(cfg, shape[-2], shape[-1], dt, True)
            place_core_vae(self, device, dtype, disable_dynamic)
            self.first_stage_model.output_device = self.output_device

    return DCAEVVAE(model)


def fit_preview(vae) -> tuple:
    """Latent -> RGB preview factors of a DC-AE-V VAE (static 4-frame clips of smooth colours, on its device)."""
    import comfy.model_management as mm

    cfg = vae.dcae_v_config
    mm.load_models_gpu([vae.patcher])
    model = vae.first_stage_model.dcae_v
    t = cfg.temporal_compression

    def encode(images):
        clip = images.unsqueeze(2).repeat(1, 1, t, 1, 1).to(model.device, model.dtype)
        return encode_video(model, clip)[:, :, 0].float().cpu()

    return previews.fit_latent_rgb(encode, cfg.spatial_compression, cfg.scaling_factor or 1.0, images=4)


def load_comfy_vae_v(path: str, variant: str = "auto"):
    """Load a DC-AE-V (safetensors copy preferred over the authors' .pt) as a ComfyUI VAE; register its previews."""
    vae = _load(path, variant)
    vae.patcher.cached_patcher_init = (_load_patcher, (path, variant))
    return vae


def _load(path: str, variant: str, disable_dynamic: bool = False):
    vae = make_comfy_vae_v(load_dcae_v(path, variant), disable_dynamic=disable_dynamic)
    real = preferred_file(path)
    key = (real, os.path.getmtime(real), vae.dcae_v_config.variant)
    if key not in _fits:
        _fits[key] = fit_preview(vae)
    previews.register((PREVIEW_KEY, vae.latent_channels), *_fits[key])
    return vae


def _load_patcher(path: str, variant: str, disable_dynamic: bool = False):
    return _load(path, variant, disable_dynamic).patcher


def require_dcae_v(vae, subject: str = "vae"):
    """The DC-AE-V config of a VAE from DC-Gen Load DC-AE-V; a clear error for any other VAE."""
    cfg = getattr(vae, "dcae_v_config", None)
    if cfg is None:
        model = getattr(vae, "first_stage_model", vae)
        channels, ratio = getattr(vae, "latent_channels", "?"), getattr(vae, "downscale_ratio", "?")
        ratio = ratio[-1] if isinstance(ratio, tuple) else ratio
        what = " (the image DC-AE)" if getattr(vae, "dcae_config", None) is not None else (
            " (Wan2.1's VAE)" if (channels, ratio) == (16, 8) else "")
        raise DCGenError(f"{subject}: expected a DC-AE-V video VAE (from DC-Gen Load DC-AE-V), found a "
                         f"{type(model).__name__} with {channels} latent channels at 1/{ratio}{what}.")
    return cfg


def make_video_latent_format(latent_channels: int, scaling_factor: float, spatial_compression: int = 32):
    """A core latent format for DC-AE-V latents (5-D), previews from the factors fitted at VAE load."""
    import comfy.latent_formats

    class DCAEVLatent(comfy.latent_formats.LatentFormat):
        latent_dimensions = 3

        def __init__(self):
            self.latent_channels = latent_channels
            self.scale_factor = scaling_factor
            self.spacial_downscale_ratio = spatial_compression
            self.taesd_decoder_name = None

        @property
        def latent_rgb_factors(self):
            return previews.lookup((PREVIEW_KEY, self.latent_channels))[0]

        @property
        def latent_rgb_factors_bias(self):
            return previews.lookup((PREVIEW_KEY, self.latent_channels))[1]

    return DCAEVLatent()


def video_frames(length: int, temporal: int = 4, subject: str = "length") -> int:
    """Frames floored to a multiple of the temporal compression, as the authors' pipelines do (81 -> 80)."""
    frames = length // temporal * temporal
    if frames < temporal:
        raise DCGenError(f"{subject}: expected at least {temporal} frames (one latent frame per {temporal}), found "
                         f"{length}.")
    return frames


def empty_video_latent(vae, width: int, height: int, length: int, batch_size: int = 1) -> torch.Tensor:
    """Zeros (B, C, F/4, H/32, W/32) for a DC-AE-V; frames floored to a multiple of 4 and the size to the grid, as
    the authors' pipelines do (81 -> 80 frames, 720 -> 704 pixels)."""
    import comfy.model_management as mm

    cfg = require_dcae_v(vae, "DC-Gen Empty Video: vae")
    f, t = cfg.spatial_compression, cfg.temporal_compression
    subject = f"DC-Gen Empty Video ({cfg.variant})"
    if width < f or height < f:
        raise DCGenError(f"{subject}: expected a size of at least {f}x{f}, found {width}x{height}.")
    if width % f or height % f:  # the authors' pipelines floor to the grid (720x1280 -> 704x1280)
        logging.info("%s: %dx%d floored to the %d-pixel grid: %dx%d, as the DC-VideoGen pipelines do.", subject,
                     width, height, f, width // f * f, height // f * f)
    frames = video_frames(length, t, f"{subject}: length")
    return torch.zeros(batch_size, cfg.latent_channels, frames // t, height // f, width // f,
                       device=mm.intermediate_device())


def chunk_summary(vae, latent_shape) -> str:
    """How a decode of ``latent_shape`` will run (for logs and benchmarks): chunks x tiles."""
    cfg = require_dcae_v(vae)
    model = vae.first_stage_model
    f = cfg.spatial_compression
    tile = model._tile(latent_shape[-2] * f, latent_shape[-1] * f)
    chunks = -(-latent_shape[2] // cfg.chunk_latent_frames)
    return f"{chunks} chunks x {tile_count(tuple(latent_shape[-2:]), tile, max(1, (tile or 4) // 4))} tiles"


def video_vae_files() -> list[str]:
    """What DC-Gen Load DC-AE-V offers from models/vae: safetensors and the authors' .pt (a .pt whose safetensors
    copy sits beside it is listed once, as the copy)."""
    import folder_paths

    from .dcae_v.loader import PICKLE_EXTENSIONS

    names = [n for n in folder_paths.get_filename_list("vae")
             if n.endswith((".safetensors", ".sft", *PICKLE_EXTENSIONS))]
    present = set(names)
    return sorted(n for n in names
                  if not (n.endswith(PICKLE_EXTENSIONS) and os.path.splitext(n)[0] + ".safetensors" in present))


def check_video_latent(info: dict, latent) -> None:
    """The LATENT a DC-AE-V video model samples: (B, C, F/4, H/32, W/32) of its channel count; clear errors for an
    image latent, a Wan2.1 VAE latent or another model's (``info``: the model's ``model_options["dcgen"]``)."""
    c, f = info["latent_channels"], info["spatial_compression"]
    expected = (f"a DC-AE-V video latent (batch, {c}, frames/4, height/{f}, width/{f}) from Empty DC-AE-V Latent "
                f"Video or DC-Gen Wan I2V")
    if not isinstance(latent, torch.Tensor) or getattr(latent, "is_nested", False):
        return
    if latent.ndim != 5:
        raise DCGenError(f"DC-Gen-Wan model: expected {expected}, found a {latent.ndim}-D latent "
                         f"{list(latent.shape)}: an image latent (e.g. of the image DC-AE or Empty Latent Image).")
    if latent.shape[1] != c:
        what = " (Wan2.1's VAE / Empty Hunyuan Latent Video: 16 channels at 1/8)" if latent.shape[1] == 16 else ""
        raise DCGenError(f"DC-Gen-Wan model: expected {expected}, found {latent.shape[1]} channels "
                         f"{list(latent.shape)}{what}.")
