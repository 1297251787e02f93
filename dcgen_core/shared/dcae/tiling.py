"""Tiled DC-AE encode/decode with linear feather blending, and activation-memory estimates.

Blending: neighbouring tiles overlap by ``overlap`` units. Inside each overlap
the outer quarter next to a tile's edge gets weight 0 (zero padding makes those
pixels differ from an untiled pass), the middle half is a linear ramp, so the
two weights always sum to 1. For conv-only decoders (DC-AE-Lite, DC-AE-1.5)
the result equals the untiled decode once a quarter of the overlap covers the
decoder's receptive field; decoders with global linear attention (SANA,
in/mix) always change somewhat under tiling, and the feathering hides seams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import DCAEConfig

DEFAULT_TILE_LATENT = 32
DEFAULT_OVERLAP_FRACTION = 0.25  # overlap = tile * this, when not given
_TILE_CANDIDATES = (128, 96, 64, 48, 32, 24, 16, 12, 8)
_MEMORY_HEADROOM = 0.8


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts covering ``size`` with at least ``overlap`` between neighbours."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))  # ceil
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _edge_ramp(n: int, device) -> torch.Tensor:
    """Weights for the n positions nearest a shared tile edge, edge first."""
    margin = n // 4
    p = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    return ((p - margin) / max(n - 2 * margin, 1)).clamp(0, 1)


def _axis_weights(starts: list[int], index: int, tile: int, scale: int, device) -> torch.Tensor:
    w = torch.ones(tile * scale, device=device)
    s = starts[index]
    if index > 0:
        n = (starts[index - 1] + tile - s) * scale
        w[:n] = _edge_ramp(n, device)
    if index < len(starts) - 1:
        n = (s + tile - starts[index + 1]) * scale
        if n > 0:
            w[-n:] = torch.minimum(w[-n:], _edge_ramp(n, device).flip(0))
    return w


Progress = Callable[[int, int], None] | None  # called as progress(tiles_done, tiles_total) after each tile


def _grid(in_hw: tuple[int, int], tile: int, overlap: int) -> tuple[int, int, list[int], list[int]]:
    h, w = in_hw
    th, tw = min(tile, h), min(tile, w)
    return th, tw, _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)


def tile_count(in_hw: tuple[int, int], tile: int, overlap: int) -> int:
    """Number of tiles ``decode_tiled``/``encode_tiled`` run per batch item over a grid of ``in_hw`` latent pixels."""
    _, _, ys, xs = _grid(in_hw, tile, overlap)
    return len(ys) * len(xs)


def _blend(
    in_hw: tuple[int, int], tile: int, overlap: int, scale: int, out_channels: int, batch: int,
    run_tile: Callable[[int, int, int, int], torch.Tensor], device, dtype, progress: Progress = None,
) -> torch.Tensor:
    """Run ``run_tile(y0, x0, th, tw)`` over an overlapping grid (input units) and feather the outputs (x scale)."""
    if tile < 1 or not 0 <= overlap <= tile // 2:
        raise ValueError(f"tiling: expected tile >= 1 and 0 <= overlap <= tile/2, found tile={tile}, overlap={overlap}")
    h, w = in_hw
    th, tw, ys, xs = _grid(in_hw, tile, overlap)
    total, done = len(ys) * len(xs), 0
    out = torch.zeros(batch, out_channels, h * scale, w * scale, device=device, dtype=torch.float32)
    weight_sum = torch.zeros(h * scale, w * scale, device=device, dtype=torch.float32)
    for i, y0 in enumerate(ys):
        wy = _axis_weights(ys, i, th, scale, device)
        for j, x0 in enumerate(xs):
            weight = wy[:, None] * _axis_weights(xs, j, tw, scale, device)[None, :]
            tile_out = run_tile(y0, x0, th, tw).float()
            rows = slice(y0 * scale, (y0 + th) * scale)
            cols = slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, rows, cols] += tile_out * weight
            weight_sum[rows, cols] += weight
            del tile_out
            done += 1
            if progress is not None:
                progress(done, total)
    return out.div_(weight_sum).to(dtype)  # in place: no second full-size buffer at the end


def default_overlap(tile: int) -> int:
    """The overlap (same units as ``tile``) used when none is given: a quarter of the tile, at least 1."""
    return max(1, round(tile * DEFAULT_OVERLAP_FRACTION))


def available_ram() -> int | None:
    """Bytes of RAM available to new allocations (psutil, else /proc/meminfo); None where neither tells."""
    try:
        import psutil  # ComfyUI depends on it
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _usable_bytes(device: torch.device) -> int | None:
    """Memory the device can still give: CUDA free + PyTorch's reusable cache, or available RAM for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * _MEMORY_HEADROOM)
    if device.type == "cpu":
        available = available_ram()
        return None if available is None else int(available * _MEMORY_HEADROOM)
    return None


def _pick_tile(estimate: Callable[[int], int], budget: int | None, default: int) -> int:
    if budget is None:
        return default
    for tile in _TILE_CANDIDATES:
        if estimate(tile) <= budget:
            return tile
    return _TILE_CANDIDATES[-1]


def pick_decode_tile(config: DCAEConfig, latent_shape, dtype: torch.dtype, device) -> int:
    """Largest tile (latent pixels) whose estimated decode memory fits the device (GPU memory or RAM); 32 when unknown."""
    b = latent_shape[0] if len(latent_shape) == 4 else 1
    return _pick_tile(
        lambda t: estimate_decode_bytes(config, (b, config.latent_channels, t, t), dtype),
        _usable_bytes(torch.device(device)), DEFAULT_TILE_LATENT,
    )


def pick_encode_tile(config: DCAEConfig, image_shape, dtype: torch.dtype, device) -> int:
    """Largest tile (latent pixels, i.e. tile * f image pixels) whose estimated encode memory fits; 32 when unknown."""
    b = image_shape[0] if len(image_shape) == 4 else 1
    c, f = image_shape[-3], config.spatial_compression
    return _pick_tile(
        lambda t: estimate_encode_bytes(config, (b, c, t * f, t * f), dtype),
        _usable_bytes(torch.device(device)), DEFAULT_TILE_LATENT,
    )


def decode_tiled(
    dcae, z: torch.Tensor, tile_latent: int | None = None, overlap_latent: int | None = None,
    progress: Progress = None,
) -> torch.Tensor:
    """Decode a latent in overlapping tiles of ``tile_latent`` latent pixels.

    ``tile_latent=None`` picks the largest tile whose estimated activation memory
    fits the device (32 when its memory is unknown); ``overlap_latent=None`` uses a quarter of it.
    ``progress(done, total)`` is called after each tile.
    """
    cfg: DCAEConfig = dcae.config
    b, _, h, w = z.shape
    if tile_latent is None:
        tile_latent = pick_decode_tile(cfg, z.shape, z.dtype, z.device)
    if overlap_latent is None:
        overlap_latent = default_overlap(tile_latent)
    return _blend(
        (h, w), tile_latent, overlap_latent, cfg.spatial_compression, cfg.in_channels, b,
        lambda y0, x0, th, tw: dcae.decoder(z[:, :, y0:y0 + th, x0:x0 + tw]), z.device, z.dtype, progress,
    )


def encode_tiled(
    dcae, x: torch.Tensor, tile_px: int | None = None, overlap_px: int | None = None, progress: Progress = None,
) -> torch.Tensor:
    """Encode an image in overlapping tiles; sizes are rounded down to multiples of the compression f.

    ``tile_px=None`` picks the largest tile that fits the device (32*f when its memory is unknown);
    ``overlap_px=None`` uses a quarter of it. Latents are feathered in latent space.
    ``progress(done, total)`` is called after each tile.
    """
    cfg: DCAEConfig = dcae.config
    f = cfg.spatial_compression
    b, _, height, width = x.shape
    if tile_px is None:
        tile = pick_encode_tile(cfg, x.shape, x.dtype, x.device)
    else:
        tile = max(1, tile_px // f)
    overlap = default_overlap(tile) if overlap_px is None else overlap_px // f
    return _blend(
        (height // f, width // f), tile, overlap, 1, cfg.latent_channels, b,
        lambda y0, x0, th, tw: dcae.encoder(x[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f]), x.device, x.dtype,
        progress,
    )


# Rough peak live tensors per block, in units of (channels x pixels) of that stage,
# counted for inference without autograd (intermediates are freed as soon as replaced).
_RESBLOCK_FACTOR = 4
_EFFICIENTVIT_FACTOR = 18  # GLUMBConv expands to 8x channels and holds two such tensors
_SAMPLER_FACTOR = 3
_HEAD_FACTOR = 3


def _stage_peak(block_types, layers, widths, pixels_at, in_channels) -> int:
    peak = 0
    for i, (kind, depth, width) in enumerate(zip(block_types, layers, widths)):
        if depth == 0:
            continue
        factor = _EFFICIENTVIT_FACTOR if kind == "EfficientViTBlock" else _RESBLOCK_FACTOR
        peak = max(peak, factor * width * pixels_at(i))
        if i + 1 < len(widths):  # resampling between stage i and i+1 works at stage i's resolution
            peak = max(peak, (widths[i + 1] + _SAMPLER_FACTOR * width) * pixels_at(i))
    head_width = widths[0] if layers[0] > 0 else widths[1]
    head_pixels = pixels_at(0) if layers[0] > 0 else pixels_at(1)
    return max(peak, _HEAD_FACTOR * head_width * head_pixels + 2 * in_channels * pixels_at(-1))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_decode_bytes(config: DCAEConfig, latent_shape, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak activation bytes of an untiled decode of ``latent_shape`` (B, C, h, w); weights excluded."""
    batch = latent_shape[0] if len(latent_shape) == 4 else 1
    h, w = latent_shape[-2:]
    n = config.num_stages

    def pixels_at(stage: int) -> int:  # stage i runs at latent size * 2**(n-1-i); -1 means the output image
        return h * w * 4 ** (n - 1 if stage == -1 else n - 1 - stage)

    peak = _stage_peak(config.decoder_block_types, config.decoder_layers_per_block,
                       config.decoder_block_out_channels, pixels_at, config.in_channels)
    return int(peak * batch * _element_size(dtype))


def estimate_encode_bytes(config: DCAEConfig, image_shape, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak activation bytes of an untiled encode of ``image_shape`` (B, C, H, W); weights excluded."""
    batch = image_shape[0] if len(image_shape) == 4 else 1
    height, width = image_shape[-2:]

    def pixels_at(stage: int) -> int:
        return height * width if stage == -1 else height * width // 4 ** stage

    peak = _stage_peak(config.encoder_block_types, config.encoder_layers_per_block,
                       config.encoder_block_out_channels, pixels_at, config.in_channels)
    return int(peak * batch * _element_size(dtype))


def should_tile_decode(config: DCAEConfig, latent_shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Tile only when the untiled estimate exceeds what the device (GPU memory, or RAM for the CPU) can give."""
    budget = _usable_bytes(torch.device(device))
    return budget is not None and estimate_decode_bytes(config, latent_shape, dtype) > budget


def should_tile_encode(config: DCAEConfig, image_shape, dtype: torch.dtype, device: torch.device) -> bool:
    budget = _usable_bytes(torch.device(device))
    return budget is not None and estimate_encode_bytes(config, image_shape, dtype) > budget
