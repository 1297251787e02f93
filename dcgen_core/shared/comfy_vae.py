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
from .comfy_compat import archive_weight_dtypes, make_model_patcher
from .dcae import DCAE, estimate_decode_bytes, estimate_encode_bytes, load_dcae
from .dcae.tiling import (decode_tiled, encode_tiled, pick_decode_tile, pick_encode_tile, should_tile_decode,
                          should_tile_encode, tile_count)
from .errors import DCGenError


class _QuietEmptyVAE(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


def init_empty_core_vae(vae):
    """``comfy.sd.VAE.__init__`` with no weights (this ComfyUI's defaults; its "No VAE weights" log line filtered):
    the caller then sets the model and the facts core reads."""
    import comfy.sd

    quiet = _QuietEmptyVAE()
    logging.getLogger().addFilter(quiet)
    try:
        comfy.sd.VAE.__init__(vae, sd={})
    finally:
        logging.getLogger().removeFilter(quiet)


def place_core_vae(vae, device, dtype, disable_dynamic: bool):
    """Device, dtype (bf16 or fp32, as ComfyUI picks for the device), output device and patcher of a VAE whose
    ``first_stage_model`` is set, as core's VAE sets them."""
    import comfy.model_management as mm

    vae.working_dtypes = [torch.bfloat16, torch.float32]
    vae.device = device or mm.vae_device()
    vae.vae_dtype = dtype or mm.vae_dtype(vae.device, vae.working_dtypes)
    vae.first_stage_model.to(vae.vae_dtype)
    archive_weight_dtypes(vae.first_stage_model)
    vae.output_device = mm.intermediate_device()
    vae.patcher = make_model_patcher(vae.first_stage_model, vae.device, mm.vae_offload_device(),
                                     disable_dynamic=disable_dynamic)


class ComfyDCAE(torch.nn.Module):
    """The DC-AE as ComfyUI's ``first_stage_model`` (ComfyUI sets its own attributes, e.g. ``device``, on it).

    Decode/encode tile on their own when the untiled pass would not fit the device.
    """

    def __init__(self, dcae: DCAE):
        super().__init__()
        self.dcae = dcae

    def encode(self, x, **options):
        cfg = self.dcae.config
        f = cfg.spatial_compression
        if x.ndim != 4 or x.shape[1] != 3:
            raise DCGenError(f"VAE Encode ({cfg.variant}): expected RGB images, found a tensor of shape "
                             f"{list(x.shape)} (channels first).")
        if x.shape[-1] % f or x.shape[-2] % f:
            w, h = x.shape[-1], x.shape[-2]
            raise DCGenError(f"VAE Encode ({cfg.variant}): expected width and height that are multiples of {f}, "
                             f"found {w}x{h}. Scale the image to e.g. {max(f, round(w / f) * f)}x"
                             f"{max(f, round(h / f) * f)} first (core Upscale Image).")
        return self.dcae.encode(x, tiled=None)

    def decode(self, z, **options):
        cfg = self.dcae.config
        if z.ndim != 4 or z.shape[1] != cfg.latent_channels:
            found = f"{z.shape[1]} channels (shape {list(z.shape)})" if z.ndim == 4 else f"shape {list(z.shape)}"
            raise DCGenError(f"VAE Decode ({cfg.variant}): expected a DC-AE latent with {cfg.latent_channels} "
                             f"channels, found {found}: a latent of another model (e.g. FLUX's 16 channels). "
                             f"Decode it with that model's VAE.")
        return self.dcae.decode(z, tiled=None)


def make_comfy_vae(model: DCAE, device=None, dtype=None, disable_dynamic: bool = False):
    import comfy.sd

    class DCAEVAE(comfy.sd.VAE):
        def __init__(self, dcae: DCAE):
            init_empty_core_vae(self)
            cfg = dcae.config
            f = cfg.spatial_compression
            self.first_stage_model = ComfyDCAE(dcae.eval())
            self.dcae_config = dcae.config
            self.latent_channels = dcae.config.latent_channels
            self.downscale_ratio = f
            self.upscale_ratio = f
            self.latent_dim = 2
            self.output_channels = 3
            # per batch item; ComfyUI multiplies by the batch size it picks
            self.memory_used_decode = lambda shape, dt: estimate_decode_bytes(cfg, (1, *shape[1:]), dt)
            self.memory_used_encode = lambda shape, dt: estimate_encode_bytes(cfg, (1, *shape[1:]), dt)
            place_core_vae(self, device, dtype, disable_dynamic)

    return DCAEVAE(model)


def load_comfy_vae(path: str, variant: str = "auto"):
    """Load a DC-AE file/folder as a ComfyUI VAE and register its latent-preview factors.

    Its patcher carries ``cached_patcher_init`` as core VAE loaders' do (v0.33 rebuilds pristine copies from it).
    """
    vae = _load_comfy_vae(path, variant)
    vae.patcher.cached_patcher_init = (_load_dcae_patcher, (path, variant))
    return vae


def _load_comfy_vae(path: str, variant: str, disable_dynamic: bool = False):
    model = load_dcae(path, variant=variant)
    cfg = model.config
    factors, bias = previews.fit_latent_rgb(model.encode, cfg.spatial_compression, cfg.scaling_factor)
    previews.register(cfg.latent_channels, factors, bias)
    return make_comfy_vae(model, disable_dynamic=disable_dynamic)


def _load_dcae_patcher(path: str, variant: str, disable_dynamic: bool = False):
    return _load_comfy_vae(path, variant, disable_dynamic).patcher


def require_dcae(vae, subject: str = "vae"):
    """The DC-AE config of a VAE from DC-Gen Load DC-AE; a clear error for any other VAE."""
    cfg = getattr(vae, "dcae_config", None)
    if cfg is None:
        model = getattr(vae, "first_stage_model", vae)
        channels, ratio = getattr(vae, "latent_channels", "?"), getattr(vae, "downscale_ratio", "?")
        raise DCGenError(
            f"{subject}: expected a DC-AE VAE (from DC-Gen Load DC-AE), found a {type(model).__name__} with "
            f"{channels} latent channels at 1/{ratio} resolution{_known_vae(channels, ratio)}.")
    return cfg


def _known_vae(channels, ratio) -> str:
    if ratio == 1:
        return " (a pixel-space VAE: it has no latent space)"
    names = {(16, 8): "the FLUX.1 VAE", (4, 8): "an SD 1.x / SDXL VAE", (32, 16): "the FLUX.2 VAE"}
    name = names.get((channels, ratio))
    return f" ({name})" if name else ""


def check_empty_latent_fits(batch: int, channels: int, width: int, height: int, f: int, subject: str):
    """Refuse, before allocating, a batch x size whose latents or decoded float32 images cannot fit in free RAM
    (ComfyUI keeps LATENTs and IMAGEs in system memory between nodes)."""
    from .dcae.tiling import available_ram

    free = available_ram()
    if free is None:
        return
    latent_bytes = batch * channels * (height // f) * (width // f) * 4
    image_bytes = batch * height * width * 3 * 4
    if max(latent_bytes, image_bytes) > free:
        raise DCGenError(
            f"{subject}: expected a batch x size whose images fit in free memory ({free / 2**30:.1f} GiB), found "
            f"{batch} x {width}x{height}: {image_bytes / 2**30:.1f} GiB of decoded float32 images "
            f"({latent_bytes / 2**30:.2f} GiB of latents). Lower batch_size or the size.")


def check_resolution(width: int, height: int, f: int, subject: str = "resolution"):
    if width % f or height % f or width <= 0 or height <= 0:
        raise DCGenError(
            f"{subject}: expected width and height that are multiples of {f} (the DC-AE latent grid, one latent "
            f"pixel per {f}x{f} image pixels), found {width}x{height}. "
            f"Nearest: {max(f, round(width / f) * f)}x{max(f, round(height / f) * f)}.")


def zero_latent(batch: int, channels: int, width: int, height: int, f: int, subject: str) -> torch.Tensor:
    """An empty (batch, C, H/f, W/f) latent where ComfyUI keeps LATENTs, after checking it (and its images) fit."""
    import comfy.model_management as mm

    check_empty_latent_fits(batch, channels, width, height, f, subject)
    return torch.zeros(batch, channels, height // f, width // f, device=mm.intermediate_device())


def empty_dcae_latent(vae, width: int, height: int, batch_size: int = 1) -> torch.Tensor:
    cfg = require_dcae(vae)
    f = cfg.spatial_compression
    subject = f"DC-Gen Empty Latent ({cfg.variant}, f={f})"
    check_resolution(width, height, f, subject=subject)
    return zero_latent(batch_size, cfg.latent_channels, width, height, f, subject)


# --- DC-AE Decode / Encode (Tiled) -------------------------------------------------------------------------------

TILE_MODES = ("auto", "always", "never")


def _tile_units(cfg, tile_size: int, overlap: int, subject: str) -> tuple[int | None, int]:
    """Pixel tile size and overlap -> latent units (tile None = automatic), checked against the DC-AE's f."""
    f = cfg.spatial_compression
    where = f"{subject} ({cfg.variant}, f={f})"
    if tile_size < 0 or tile_size % f:
        raise DCGenError(
            f"{where}: expected tile_size 0 (automatic) or a multiple of {f} pixels (one latent pixel per {f}x{f} "
            f"image pixels), found {tile_size}. Nearest: {max(f, round(tile_size / f) * f)}.")
    if overlap < 0 or overlap % f:
        raise DCGenError(
            f"{where}: expected an overlap that is a multiple of {f} pixels (0 allowed), found {overlap}. "
            f"Nearest: {max(0, round(overlap / f) * f)}.")
    if tile_size == 0:
        return None, overlap // f
    tile, ov = tile_size // f, overlap // f
    if ov > tile // 2:
        raise DCGenError(
            f"{where}: expected an overlap of at most half the tile ({tile // 2 * f} pixels for tile_size "
            f"{tile_size}), found {overlap}.")
    return tile, ov


def _run_dcae(vae, cfg, x: torch.Tensor, encode: bool, mode: str, tile_size: int, overlap: int, subject: str):
    """Encode (x: pixels (B, 3, H, W) in [-1, 1]) or decode (x: latent) with the DC-AE VAE of config ``cfg`` on
    its device, tiled per ``mode``.

    Returns the raw output (B, C, ., .) as float32 on the VAE's output device.
    """
    import comfy.model_management as mm
    import comfy.utils

    if mode not in TILE_MODES:
        raise DCGenError(f"{subject}: expected mode one of {', '.join(TILE_MODES)}, found {mode!r}.")
    tile, ov = _tile_units(cfg, tile_size, overlap, subject)
    f = cfg.spatial_compression
    dcae = vae.first_stage_model.dcae
    dtype, device = vae.vae_dtype, vae.device
    estimate = estimate_encode_bytes if encode else estimate_decode_bytes
    item_shape = (1, *x.shape[1:])
    per_item = max(1, estimate(cfg, item_shape, dtype))
    memory = per_item  # as core VAE.decode/encode: room for one untiled batch item
    if mode == "always" and tile is not None:
        tile_shape = (1, x.shape[1], tile * f, tile * f) if encode else (1, x.shape[1], tile, tile)
        memory = min(per_item, max(1, estimate(cfg, tile_shape, dtype)))
    mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=getattr(vae, "disable_offload", False))

    should_tile = should_tile_encode if encode else should_tile_decode
    tiled = mode == "always" or (mode == "auto" and should_tile(cfg, item_shape, dtype, device))
    batch = x.shape[0]
    grid = (x.shape[-2] // f, x.shape[-1] // f) if encode else tuple(x.shape[-2:])
    if tiled:
        if tile is None:
            pick = pick_encode_tile if encode else pick_decode_tile
            tile = pick(cfg, item_shape, dtype, device)
            ov = min(ov, tile // 4)
        chunk = 1
        total = batch * tile_count(grid, tile, ov)
    else:
        chunk = max(1, int(mm.get_free_memory(device) / per_item))
        total = -(-batch // chunk)
    pbar = comfy.utils.ProgressBar(total)

    def step(*_):
        pbar.update(1)
        mm.throw_exception_if_processing_interrupted()  # Cancel stops between tiles

    out = None
    for start in range(0, batch, chunk):
        part = x[start:start + chunk].to(dtype).to(device)
        if not tiled:
            y = dcae.encoder(part) if encode else dcae.decoder(part)
            step()
        elif encode:
            y = encode_tiled(dcae, part, tile * f, ov * f, progress=step)
        else:
            y = decode_tiled(dcae, part, tile, ov, progress=step)
        y = y.to(vae.output_device).float()
        if out is None:
            out = torch.empty((batch, *y.shape[1:]), device=vae.output_device)
        out[start:start + y.shape[0]] = y
    return out


def dcae_decode(vae, samples: torch.Tensor, mode: str = "auto", tile_size: int = 0, overlap: int = 512,
                subject: str = "DC-Gen DC-AE Decode") -> torch.Tensor:
    """A DC-AE LATENT (B, C, h, w) -> ComfyUI IMAGE (B, h*f, w*f, 3) in [0, 1], as core VAE Decode does.

    ``mode``: ``auto`` tiles only when the untiled decode would not fit the device memory, ``always`` tiles,
    ``never`` does not. ``tile_size``/``overlap`` are image pixels, multiples of f (tile 0: the largest tile that
    fits the device, with the overlap limited to a quarter of it).
    """
    cfg = require_dcae(vae, subject=f"{subject}: vae")
    if samples.ndim != 4 or samples.shape[1] != cfg.latent_channels:
        raise DCGenError(
            f"{subject}: expected a latent (batch, {cfg.latent_channels}, h, w) of the {cfg.variant} DC-AE, found "
            f"shape {tuple(samples.shape)}.")
    out = _run_dcae(vae, cfg, samples, False, mode, tile_size, overlap, subject)
    return vae.process_output(out).movedim(1, -1)


def dcae_encode(vae, pixels: torch.Tensor, mode: str = "auto", tile_size: int = 0, overlap: int = 512,
                subject: str = "DC-Gen DC-AE Encode") -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1], H and W multiples of f -> raw DC-AE latent (B, C, H/f, W/f).

    Same conversion as core VAE Encode (x * 2 - 1; RGB only), but sizes off the latent grid are an error,
    not cropped. ``mode``, ``tile_size``, ``overlap`` as in ``dcae_decode``.
    """
    cfg = require_dcae(vae, subject=f"{subject}: vae")
    f = cfg.spatial_compression
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise DCGenError(f"{subject}: expected an IMAGE (batch, height, width, 3), found shape {tuple(pixels.shape)}.")
    height, width = pixels.shape[1], pixels.shape[2]
    try:
        check_resolution(width, height, f, subject=f"{subject} ({cfg.variant}, f={f}): image size")
    except DCGenError as e:
        raise DCGenError(f"{e} Crop or scale the image to that size first (e.g. ImageCrop or Upscale Image).") from None
    x = vae.process_input(pixels[..., :3].movedim(-1, 1))
    return _run_dcae(vae, cfg, x, True, mode, tile_size, overlap, subject)
