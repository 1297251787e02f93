"""Chunk-by-chunk DC-AE-V encode/decode: feature cache, optional spatial tiles, progress and cancel per chunk.

A clip is cut into chunks of ``chunk_frames`` frames (``chunk_frames / 4`` latent frames) and run through the
encoder/decoder one chunk at a time with one feature cache, so memory holds one chunk's activations plus one
cached frame per conv, whatever the clip length. This is the authors' ``temporal_tiled_encode/decode`` with their
settings (tile = chunk, overlap 0, ``use_feature_cache=True``), and equals one pass over the whole clip.

When one chunk's activations would not fit the device, each chunk is also cut into overlapping spatial tiles
(one feature cache per tile) that are feather-blended as the image DC-AE's tiles are
(:func:`..dcae.tiling._blend`). Spatial tiling changes the result slightly near tile seams; chunking does not.

Clips whose length is not a multiple of the chunk (in latent frames: of ``chunk_frames / 4``): the last, shorter
chunk is run as the authors' code runs it, i.e. each conv falls back to a plain zero-padded conv over the short
chunk, without the previous chunk's frame. That keeps the pack equal to the reference implementation for every
frame count; the pack logs a warning naming the frames affected, because the authors' pipelines only ever produce
whole chunks (80 frames = 2 chunks) and the short tail may show a seam at the chunk boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..dcae.tiling import _blend, _tile_starts, _usable_bytes
from ..errors import DCGenError
from .config import DCAEVConfig

Progress = Callable[[int, int], None] | None  # progress(chunks_done, chunks_total), called after each chunk

# live tensors per stage, in (channels x pixels x frames) of that stage: the input kept for the residual, padded
# chunk copies, conv outputs, SiLU and RMSNorm temporaries, conv workspace; 8 covers the peak measured on CPU
# (benchmarks/bench_wan_video.py: about 9 stage-1 tensors including the output buffers)
_RESBLOCK_FACTOR = 8


def _warn_tail(what: str, total: int, chunk: int, unit: str):
    tail = total % chunk
    if tail:
        logging.warning(
            "DC-AE-V %s: %d %s are not a multiple of the chunk (%d %s); the last %d run as the authors' code runs "
            "them, without the previous chunk's context (a seam may show there). Use a multiple of %d %s.",
            what, total, unit, chunk, unit, tail, chunk, unit)


def estimate_chunk_bytes(cfg: DCAEVConfig, height: int, width: int, dtype: torch.dtype, encode: bool) -> int:
    """Rough peak bytes of one chunk at ``height`` x ``width`` pixels (activations + feature cache). Encoder and
    decoder mirror each other stage for stage, so ``encode`` does not change the estimate."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    frames = cfg.chunk_frames
    peak, cache = cfg.in_channels * frames * height * width * 4, 0
    for i in range(1, cfg.num_stages):
        scale = 2 ** min(i, cfg.num_stages - 2)
        pixels = (height // scale) * (width // scale)
        t = frames if i < cfg.num_stages - 1 else cfg.chunk_latent_frames
        peak = max(peak, _RESBLOCK_FACTOR * cfg.widths[i] * t * pixels)
        cache += 2 * cfg.depths[i] * cfg.widths[i] * pixels
    peak = max(peak, 3 * cfg.widths[1] * frames * (height // 2) * (width // 2))  # head: norm temporaries at H/2
    return int((peak + cache) * size)


def pick_tile(cfg: DCAEVConfig, height: int, width: int, dtype: torch.dtype, device) -> int | None:
    """None when a whole chunk fits the device, else the largest square tile (latent pixels) that does."""
    budget = _usable_bytes(torch.device(device))
    if budget is None:
        return None
    f = cfg.spatial_compression
    if estimate_chunk_bytes(cfg, height, width, dtype, True) <= budget:
        return None
    for tile in (64, 48, 40, 32, 24, 16, 12, 8, 6, 4, 2):
        if estimate_chunk_bytes(cfg, tile * f, tile * f, dtype, True) <= budget:
            return tile
    return 2


def _check_tile(tile, overlap):
    if tile is not None and (tile < 1 or not 0 <= overlap <= tile // 2):
        raise DCGenError(f"DC-AE-V tiling: expected a tile of >= 1 latent pixels and an overlap of at most half of "
                         f"it, found tile {tile}, overlap {overlap}.")


def _run(fn, x, chunk: int, time_ratio: float, space_scale: int, out_channels: int, tile, overlap,
         progress: Progress, output_device, pixel: int):
    """Run ``fn(part, cache)`` chunk by chunk (and tile by tile).

    ``time_ratio``: output frames per input frame; ``space_scale``: output pixels per latent pixel; ``pixel``: input
    pixels per latent pixel (tiles are laid out on the latent grid).
    """
    b, _, frames, h, w = x.shape
    lat_h, lat_w = h // pixel, w // pixel
    starts = list(range(0, frames, chunk))
    caches: dict = {}
    out = None
    for k, t0 in enumerate(starts):
        part = x[:, :, t0:t0 + chunk]
        if tile is None or (lat_h <= tile and lat_w <= tile):
            y = fn(part, caches.setdefault((0, 0), {}))
        else:
            n_t = int(part.shape[2] * time_ratio)

            def run_tile(y0, x0, th, tw, part=part):
                sub = part[..., y0 * pixel:(y0 + th) * pixel, x0 * pixel:(x0 + tw) * pixel]
                return fn(sub, caches.setdefault((y0, x0), {})).flatten(1, 2)

            y = _blend((lat_h, lat_w), tile, overlap, space_scale, out_channels * n_t, b, run_tile, x.device,
                       x.dtype).unflatten(1, (out_channels, n_t))
        y = y.to(output_device or x.device)
        if out is None:
            out = torch.empty((b, out_channels, int(frames * time_ratio), *y.shape[-2:]), dtype=y.dtype,
                              device=y.device)
        o0 = int(t0 * time_ratio)
        out[:, :, o0:o0 + y.shape[2]] = y
        del y
        if progress is not None:
            progress(k + 1, len(starts))
    return out


@torch.no_grad()
def encode_video(model, x: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                 progress: Progress = None, output_device=None) -> torch.Tensor:
    """Pixels (B, 3, F, H, W) in [-1, 1] -> raw latent (B, C, F/4, H/f, W/f).

    ``tile``: spatial tile in latent pixels (None: one tile per chunk), ``overlap`` in latent pixels (default a
    quarter of the tile).
    """
    cfg: DCAEVConfig = model.config
    f, t = cfg.spatial_compression, cfg.temporal_compression
    if x.ndim != 5 or x.shape[1] != cfg.in_channels:
        raise DCGenError(f"DC-AE-V encode ({cfg.variant}): expected a video (batch, 3, frames, height, width), "
                         f"found shape {list(x.shape)}.")
    frames, h, w = x.shape[2:]
    if frames % t or frames == 0:
        raise DCGenError(
            f"DC-AE-V encode ({cfg.variant}): expected a frame count that is a multiple of {t} (one latent frame per "
            f"{t} frames), found {frames}. Use {max(t, frames // t * t)} frames (the authors' pipelines round down "
            f"to a multiple of {t}); a still image: repeat it {t} times.")
    if h % f or w % f:
        raise DCGenError(f"DC-AE-V encode ({cfg.variant}): expected width and height that are multiples of {f}, "
                         f"found {w}x{h}. Nearest: {max(f, round(w / f) * f)}x{max(f, round(h / f) * f)}.")
    overlap = max(1, tile // 4) if tile is not None and overlap is None else (overlap or 0)
    _check_tile(tile, overlap)
    _warn_tail("encode", frames, cfg.chunk_frames, "frames")
    return _run(lambda part, cache: model.encoder(part, cache), x, cfg.chunk_frames, 1 / t, 1, cfg.latent_channels,
                tile, overlap, progress, output_device, f)


@torch.no_grad()
def decode_video(model, z: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                 progress: Progress = None, output_device=None) -> torch.Tensor:
    """Raw latent (B, C, F/4, h, w) -> pixels (B, 3, F, h*f, w*f), roughly in [-1, 1]."""
    cfg: DCAEVConfig = model.config
    if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
        raise DCGenError(f"DC-AE-V decode ({cfg.variant}): expected a video latent (batch, {cfg.latent_channels}, "
                         f"frames/4, height/{cfg.spatial_compression}, width/{cfg.spatial_compression}), found "
                         f"shape {list(z.shape)}.")
    overlap = max(1, tile // 4) if tile is not None and overlap is None else (overlap or 0)
    _check_tile(tile, overlap)
    _warn_tail("decode", z.shape[2], cfg.chunk_latent_frames, "latent frames")
    return _run(lambda part, cache: model.decoder(part, cache), z, cfg.chunk_latent_frames,
                cfg.temporal_compression, cfg.spatial_compression, cfg.in_channels, tile, overlap, progress,
                output_device, 1)


def tile_count(latent_hw: tuple[int, int], tile: int | None, overlap: int) -> int:
    if tile is None:
        return 1
    h, w = latent_hw
    return len(_tile_starts(h, min(tile, h), overlap)) * len(_tile_starts(w, min(tile, w), overlap))
