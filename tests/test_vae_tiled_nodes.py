"""DC-Gen DC-AE Decode / DC-Gen DC-AE Encode in real ComfyUI.

A tiny conv-only DC-AE-1.5 (f = 64, 128 latent channels) tiles exactly once a
quarter of the overlap covers the decoder's reach: tiled == untiled == core
VAE Decode/Encode within 1e-3. Mode ``never`` is core VAE Decode/Encode bit
for bit, and ``auto`` does not tile where the untiled pass fits in RAM.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import tiny

TOL = 1e-3
F64 = 64
LATENT_HW = (4, 80)  # 256 x 5120 px: one tile high, three wide with the tile below
TILE, OVERLAP = 40 * F64, 20 * F64  # 2560 px tiles, 1280 px overlaps (a quarter covers the tiny decoder's reach)


def _smooth_image(h, w, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 8, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1).permute(0, 2, 3, 1)


def _node(comfyui, name):
    return comfyui.runtime.node_classes[name]()


@pytest.fixture(scope="module")
def vae15(comfyui):
    tiny.save_dcae_folder(tiny.tiny_dcae15(), os.path.join(comfyui.dirs["vae"], "dc-ae-1.5-f64c128-tiny"))
    vae = _node(comfyui, "DCGenDCAELoader").load("dc-ae-1.5-f64c128-tiny", "auto")[0]
    assert vae.dcae_config.spatial_compression == F64 and not vae.dcae_config.has_attention
    return vae


@pytest.fixture(scope="module")
def latent(vae15):
    g = torch.Generator().manual_seed(5)
    return {"samples": torch.randn(2, vae15.dcae_config.latent_channels, *LATENT_HW, generator=g)}


@pytest.fixture
def progress(monkeypatch):
    """(value, total) of every ComfyUI progress-bar update."""
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, *a, **k: calls.append((value, total)))
    return calls


def _decode(comfyui, vae, latent, mode, tile=TILE, overlap=OVERLAP):
    return _node(comfyui, "DCGenDCAEDecodeTiled").decode(latent, vae, mode, tile, overlap)[0]


def _encode(comfyui, vae, pixels, mode, tile=TILE, overlap=OVERLAP):
    return _node(comfyui, "DCGenDCAEEncodeTiled").encode(pixels, vae, mode, tile, overlap)[0]["samples"]


@torch.inference_mode()  # as ComfyUI's executor runs nodes
def test_tiled_decode_matches_untiled_and_core(comfyui, vae15, latent, progress):
    tiled = _decode(comfyui, vae15, latent, "always")
    assert progress[-1] == (2 * 3, 2 * 3)  # two images, three tiles each
    untiled = _decode(comfyui, vae15, latent, "never")
    core = _node(comfyui, "VAEDecode").decode(vae15, latent)[0]
    assert tiled.shape == untiled.shape == (2, LATENT_HW[0] * F64, LATENT_HW[1] * F64, 3)
    assert tiled.dtype == core.dtype == torch.float32 and 0 <= tiled.min() and tiled.max() <= 1
    assert (tiled - untiled).abs().max().item() <= TOL
    assert (tiled - core).abs().max().item() <= TOL
    # tiles without overlap are visibly inexact: the comparison above has teeth
    hard = _decode(comfyui, vae15, latent, "always", overlap=0)
    assert (hard - untiled).abs().max().item() > 10 * TOL


@torch.inference_mode()
def test_tiled_encode_matches_untiled_and_core(comfyui, vae15, progress):
    pixels = _smooth_image(LATENT_HW[0] * F64, LATENT_HW[1] * F64, batch=2)
    tiled = _encode(comfyui, vae15, pixels, "always")
    assert progress[-1] == (6, 6)
    untiled = _encode(comfyui, vae15, pixels, "never")
    core = _node(comfyui, "VAEEncode").encode(vae15, pixels)[0]["samples"]
    assert tiled.shape == untiled.shape == (2, vae15.dcae_config.latent_channels, *LATENT_HW)
    assert (tiled - untiled).abs().max().item() <= TOL
    assert (tiled - core).abs().max().item() <= TOL
    assert (_encode(comfyui, vae15, pixels, "always", overlap=0) - untiled).abs().max().item() > 10 * TOL
    # RGBA input: the alpha channel is dropped, as core VAE Encode does
    rgba = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)
    assert torch.equal(_encode(comfyui, vae15, rgba, "never"), untiled)


@torch.inference_mode()
def test_mode_never_is_core_vae_decode_and_encode(comfyui, comfy_models):
    """Bit for bit, also for the attention (SANA-shaped) tiny DC-AE."""
    vae = _node(comfyui, "DCGenDCAELoader").load(comfy_models.vae, "auto")[0]
    pixels = _smooth_image(128, 192, seed=3)
    latent = _node(comfyui, "VAEEncode").encode(vae, pixels)[0]
    assert torch.equal(_encode(comfyui, vae, pixels, "never", 0, 512), latent["samples"])
    core = _node(comfyui, "VAEDecode").decode(vae, latent)[0]
    assert torch.equal(_decode(comfyui, vae, latent, "never", 0, 512), core)


@torch.inference_mode()
def test_mode_auto_is_untiled_when_it_fits(comfyui, vae15, latent, progress):
    untiled = _decode(comfyui, vae15, latent, "never")
    assert torch.equal(_decode(comfyui, vae15, latent, "auto"), untiled)
    assert progress[-1][1] == 1  # one untiled batch, no tiles
    pixels = _smooth_image(LATENT_HW[0] * F64, LATENT_HW[1] * F64, seed=4)
    assert torch.equal(_encode(comfyui, vae15, pixels, "auto"), _encode(comfyui, vae15, pixels, "never"))


@torch.inference_mode()
def test_mode_auto_tiles_when_the_untiled_pass_would_not_fit(comfyui, vae15, latent, progress, monkeypatch):
    """Where the estimate says the untiled pass does not fit, auto tiles; tile_size 0 picks the tile
    (32 latent pixels where the free memory is unknown) and limits the overlap to a quarter of it."""
    comfy_vae = comfyui.core.shared.comfy_vae
    monkeypatch.setattr(comfyui.core.shared.dcae.tiling, "_usable_bytes", lambda device: None)
    monkeypatch.setattr(comfy_vae, "should_tile_decode", lambda *a: True)
    monkeypatch.setattr(comfy_vae, "should_tile_encode", lambda *a: True)
    one = {"samples": latent["samples"][:1]}
    auto = _decode(comfyui, vae15, one, "auto", tile=0, overlap=4096)
    assert progress[-1] == (3, 3)  # 80 latent pixels wide in 32-wide tiles overlapping by 8
    assert torch.equal(auto, _decode(comfyui, vae15, one, "always", tile=32 * F64, overlap=8 * F64))
    pixels = _smooth_image(LATENT_HW[0] * F64, LATENT_HW[1] * F64, seed=6)
    auto = _encode(comfyui, vae15, pixels, "auto", tile=0)
    assert progress[-1] == (3, 3)
    assert torch.equal(auto, _encode(comfyui, vae15, pixels, "always", tile=32 * F64, overlap=8 * F64))


def test_vae_that_is_not_a_dcae(comfyui, latent):
    import comfy.sd

    kl = comfy.sd.VAE(sd={})  # a core VAE object (defaults: 4-ch latent at 1/8), e.g. the FLUX/SD VAE
    err = comfyui.core.shared.errors.DCGenError
    with pytest.raises(err, match=r"DC-Gen DC-AE Decode: vae: expected a DC-AE VAE .* found .* 4 latent channels"):
        _decode(comfyui, kl, latent, "auto")
    with pytest.raises(err, match=r"DC-Gen DC-AE Encode: vae: expected a DC-AE VAE"):
        _encode(comfyui, kl, _smooth_image(64, 64), "auto")


def test_bad_tile_size_and_overlap(comfyui, vae15, latent):
    err = comfyui.core.shared.errors.DCGenError
    with pytest.raises(err, match=r"f=64\): expected tile_size 0 \(automatic\) or a multiple of 64 .* found 1000\. "
                                  r"Nearest: 1024"):
        _decode(comfyui, vae15, latent, "always", tile=1000, overlap=0)
    with pytest.raises(err, match=r"expected an overlap that is a multiple of 64 .* found 96\. Nearest: 128"):
        _decode(comfyui, vae15, latent, "always", tile=1024, overlap=96)
    with pytest.raises(err, match=r"expected an overlap of at most half the tile \(512 pixels for tile_size 1024\), "
                                  r"found 640"):
        _encode(comfyui, vae15, _smooth_image(256, 256), "always", tile=1024, overlap=640)
    with pytest.raises(err, match=r"expected mode one of auto, always, never, found 'sometimes'"):
        _decode(comfyui, vae15, latent, "sometimes")
    with pytest.raises(err, match=r"expected a latent \(batch, 128, h, w\) of the dc-ae-1.5-f64c128 DC-AE, "
                                  r"found shape \(1, 32, 4, 4\)"):
        _decode(comfyui, vae15, {"samples": torch.zeros(1, 32, 4, 4)}, "auto")


def test_encode_size_not_on_the_latent_grid(comfyui, vae15):
    with pytest.raises(comfyui.core.shared.errors.DCGenError,
                       match=r"image size: expected width and height that are multiples of 64 .* found 320x200\. "
                             r"Nearest: 320x192\. Crop or scale"):
        _encode(comfyui, vae15, _smooth_image(200, 320), "auto")


def test_nodes_in_a_prompt(comfyui, vae15):
    """Registered with their display names; widgets validate and run through ComfyUI's executor."""
    names = comfyui.pack.NODE_DISPLAY_NAME_MAPPINGS
    assert names["DCGenDCAEDecodeTiled"] == "DC-Gen DC-AE Decode"
    assert names["DCGenDCAEEncodeTiled"] == "DC-Gen DC-AE Encode"
    pixels = _smooth_image(128, 256, seed=7)
    comfyui.test_nodes.IMAGES["tiled-nodes"] = pixels
    tiling = {"mode": "always", "tile_size": 128, "overlap": 0}
    prompt = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": "dc-ae-1.5-f64c128-tiny", "variant": "auto"}},
        "image": {"class_type": "TestImage", "inputs": {"key": "tiled-nodes"}},
        "enc": {"class_type": "DCGenDCAEEncodeTiled", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0], **tiling}},
        "dec": {"class_type": "DCGenDCAEDecodeTiled", "inputs": {"samples": ["enc", 0], "vae": ["vae", 0], **tiling}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": "tiled-nodes", "image": ["dec", 0],
                                                            "latent": ["enc", 0]}},
    }
    comfyui.runtime.run(prompt)
    got = comfyui.test_nodes.CAPTURED["tiled-nodes"]
    assert got["latent"]["samples"].shape == (1, 128, 2, 4)
    assert got["image"].shape == (1, 128, 256, 3)
    with torch.inference_mode():
        expected = _decode(comfyui, vae15, {"samples": _encode(comfyui, vae15, pixels, "always", 128, 0)},
                           "always", 128, 0)
    assert torch.equal(got["image"], expected)
