"""Tiled DC-AE decode/encode and the activation-memory estimates.

Conv-only decoders (Lite, 1.5) must tile exactly (1e-3) once a quarter of the
overlap covers the receptive field (about 7 latent pixels for these tiny
models). Attention decoders cannot tile exactly (the linear attention is
global), so their seams are measured instead:

    seam ratio = max over column (row) boundaries j inside a blend band of
                 mean|y[.., j+1] - y[.., j]|  /  max of the same over boundaries
                 outside every band that have the same position modulo f

(same phase modulo f, because pixel-shuffle/interpolate heads make the
jump size periodic with f). A visible seam pushes the ratio well above 1.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_dcae import tiny_config, tiny_diffusers_model  # noqa: E402

from dcgen_core.shared.dcae import (DCAE, VARIANTS, decode_tiled, encode_tiled, estimate_decode_bytes,
                                    estimate_encode_bytes, should_tile_decode)
from dcgen_core.shared.dcae.tiling import _tile_starts  # noqa: E402

EXACT_TOL = 1e-3
SEAM_BOUND = 1.25


def tiny_dcae(variant: str, seed: int = 0) -> DCAE:
    model = DCAE(tiny_config(variant)).eval()
    model.load_state_dict(tiny_diffusers_model(variant, seed).state_dict())
    return model


def seam_ratio(y: torch.Tensor, starts: list[int], tile: int, f: int) -> float:
    worst = 0.0
    for dim in (-1, -2):
        jumps = y.diff(dim=dim).abs().mean(dim=(0, 1, -2 if dim == -1 else -1))
        band = torch.zeros_like(jumps, dtype=torch.bool)
        for a, b in zip(starts[:-1], starts[1:]):
            band[b * f - 1:(a + tile) * f] = True  # the cut (overlap 0) or the whole overlap
        phase = torch.arange(len(jumps)) % f
        for j in band.nonzero().flatten().tolist():
            reference = jumps[~band & (phase == phase[j])].max()
            worst = max(worst, (jumps[j] / reference).item())
    return worst


@torch.no_grad()
def test_lite_decoder_tiles_exactly():
    dcae = tiny_dcae("dc-ae-lite-f32c32")
    torch.manual_seed(0)
    z = torch.randn(1, 8, 48, 48)
    untiled = dcae.decode(z, tiled=False)
    tiled = decode_tiled(dcae, z, tile_latent=30, overlap_latent=14)  # 3x3 tiles, 21-pixel overlaps
    assert (tiled - untiled).abs().max().item() <= EXACT_TOL
    # without overlap the tile borders are visibly inexact: the check above has teeth
    assert (decode_tiled(dcae, z, tile_latent=24, overlap_latent=0) - untiled).abs().max().item() > 10 * EXACT_TOL


@torch.no_grad()
def test_dc_ae_1_5_decoder_and_encoder_tile_exactly():
    dcae = tiny_dcae("dc-ae-1.5-f64c128")
    torch.manual_seed(0)
    z = torch.randn(1, 16, 4, 64)  # one tile high, three wide (28-pixel overlaps): keeps the f64 image small
    assert (decode_tiled(dcae, z, 40, 20) - dcae.decode(z, tiled=False)).abs().max().item() <= EXACT_TOL
    x = torch.rand(1, 3, 4 * 64, 64 * 64) * 2 - 1
    untiled = dcae.encode(x)
    tiled = encode_tiled(dcae, x, tile_px=40 * 64, overlap_px=20 * 64)
    assert tiled.shape == untiled.shape
    assert (tiled - untiled).abs().max().item() <= EXACT_TOL


@pytest.mark.parametrize("variant", ["dc-ae-f32c32-sana-1.1", "dc-ae-f32c32-mix-1.0"])
@torch.no_grad()
def test_attention_decoder_seams_are_feathered(variant):
    dcae = tiny_dcae(variant)
    f = dcae.spatial_compression
    torch.manual_seed(0)
    z = torch.randn(1, 8, 24, 24)
    tile, overlap = 12, 4
    feathered = decode_tiled(dcae, z, tile, overlap)
    assert seam_ratio(feathered, _tile_starts(24, tile, overlap), tile, f) <= SEAM_BOUND
    if variant == "dc-ae-f32c32-sana-1.1":
        # the metric does see a seam where there is one: hard cuts without overlap (measured ~2.0)
        hard = decode_tiled(dcae, z, tile, 0)
        assert seam_ratio(hard, _tile_starts(24, tile, 0), tile, f) >= 1.5


@torch.no_grad()
def test_decode_tiled_flag_and_single_tile():
    dcae = tiny_dcae("dc-ae-lite-f32c32")
    z = torch.randn(1, 8, 6, 10)
    untiled = dcae.decode(z, tiled=False)
    assert torch.equal(dcae.decode(z), untiled)  # tiled=None on CPU never tiles
    assert torch.allclose(decode_tiled(dcae, z, tile_latent=16, overlap_latent=4), untiled, atol=1e-6)  # one tile
    assert dcae.decode(z, tiled=True).shape == untiled.shape
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(dcae, z, tile_latent=4, overlap_latent=3)


def test_tile_starts_cover_and_overlap():
    for size, tile, overlap in [(64, 40, 20), (100, 32, 8), (33, 32, 8), (10, 32, 8), (57, 16, 0)]:
        starts = _tile_starts(size, tile, overlap)
        t = min(tile, size)
        assert starts[0] == 0 and starts[-1] + t == size
        assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:]))


def test_memory_estimates():
    sana = VARIANTS["dc-ae-f32c32-sana-1.1"]
    full = estimate_decode_bytes(sana, (1, 32, 128, 128), torch.float32)
    # REFERENCE.md: untiled fp32 decode at 4096^2 needs roughly 18-39 GB depending on the decoder
    assert 15e9 < full < 45e9
    assert estimate_decode_bytes(sana, (1, 32, 128, 128), torch.bfloat16) == full // 2
    assert estimate_decode_bytes(sana, (2, 32, 128, 128), torch.float32) == 2 * full
    assert estimate_decode_bytes(sana, (1, 32, 32, 32), torch.float32) < full / 10
    v15 = VARIANTS["dc-ae-1.5-f64c128"]
    assert 10e9 < estimate_decode_bytes(v15, (1, 128, 64, 64), torch.float32) < 45e9
    assert 10e9 < estimate_encode_bytes(v15, (1, 3, 4096, 4096), torch.float32) < 60e9
    assert not should_tile_decode(sana, (1, 32, 16, 16), torch.float32, torch.device("cpu"))


def test_auto_tiling_follows_the_free_memory_of_the_device(monkeypatch):
    """On CPU the budget is the available RAM: a 4096^2 SANA decode tiles with 8 GB free, not with 64 GB."""
    from dcgen_core.shared.dcae import tiling

    sana = VARIANTS["dc-ae-f32c32-sana-1.1"]
    cpu = torch.device("cpu")
    monkeypatch.setattr(tiling, "available_ram", lambda: 8 * 2**30)
    assert should_tile_decode(sana, (1, 32, 128, 128), torch.float32, cpu)
    assert tiling.pick_decode_tile(sana, (1, 32, 128, 128), torch.float32, cpu) < 128
    monkeypatch.setattr(tiling, "available_ram", lambda: 64 * 2**30)
    assert not should_tile_decode(sana, (1, 32, 128, 128), torch.float32, cpu)
    monkeypatch.setattr(tiling, "available_ram", lambda: None)
    assert not should_tile_decode(sana, (1, 32, 128, 128), torch.float32, cpu)
    assert tiling.pick_decode_tile(sana, (1, 32, 128, 128), torch.float32, cpu) == tiling.DEFAULT_TILE_LATENT
