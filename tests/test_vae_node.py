"""DC-Gen Load DC-AE gives a core VAE: VAEEncode, VAEDecode, VAEDecodeTiled, latent previews."""

import os

import pytest
import torch
import torch.nn.functional as F

import tiny

TOL = 1e-4


def _smooth_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def vae(comfyui, comfy_models):
    return comfyui.runtime.node_classes["DCGenDCAELoader"]().load(comfy_models.vae, "auto")[0]


def test_core_encode_decode_match_diffusers(comfyui, vae, tiny_vae):
    nodes = comfyui.runtime.node_classes
    pixels = _smooth_image(256, 192)
    latent = nodes["VAEEncode"]().encode(vae, pixels)[0]["samples"]
    with torch.no_grad():
        ref_latent = tiny_vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent
    assert latent.shape == (1, tiny.LATENT_CHANNELS, 8, 6)
    assert (latent - ref_latent).abs().max().item() <= TOL
    image = nodes["VAEDecode"]().decode(vae, {"samples": latent})[0]
    with torch.no_grad():
        ref_image = (tiny_vae.decode(ref_latent).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert image.shape == (1, 256, 192, 3)
    assert (image - ref_image).abs().max().item() <= TOL


@torch.inference_mode()  # as ComfyUI's executor runs nodes
def test_core_tiled_decode_runs(comfyui, vae):
    """Core tiled nodes work with the DC-AE's compression (the tiny decoder has attention, so tiles blend)."""
    nodes = comfyui.runtime.node_classes
    pixels = _smooth_image(192, 128, seed=1)
    latent = nodes["VAEEncode"]().encode(vae, pixels)[0]
    full = nodes["VAEDecode"]().decode(vae, latent)[0]
    tiled = nodes["VAEDecodeTiled"]().decode(vae, latent, tile_size=64, overlap=32)[0]
    assert tiled.shape == full.shape == (1, 192, 128, 3)
    assert torch.isfinite(tiled).all()
    assert (tiled - full).abs().mean().item() < 0.1


def test_latent_previews_show_the_image(comfyui, comfy_models):
    """During sampling ComfyUI previews x0 with our fitted latent->RGB map; on an encoded image the preview
    must look like the image (per-channel correlation of preview and image > 0.9). The model is a patched
    core FLUX: the preview must use the DC-AE factors, not FLUX's 16-channel ones. The DC-AE is a
    near-linear random one: like a trained DC-AE (and unlike a random deep net) its latents carry colour."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    nodes = comfyui.runtime.node_classes
    tiny.save_dcae_folder(tiny.tiny_dcae(seed=4, scale=0.01), os.path.join(comfyui.dirs["vae"], "near-linear-dcae"))
    vae = nodes["DCGenDCAELoader"]().load("near-linear-dcae", "auto")[0]
    base = nodes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]
    model = nodes["DCGenApplyAlignedEmbedding"]().apply(base, comfy_models.embedding, vae=vae)[0]
    pixels = _smooth_image(512, 512, seed=2)
    raw = nodes["VAEEncode"]().encode(vae, pixels)[0]["samples"]
    x0 = raw * vae.dcae_config.scaling_factor  # the sampler previews latents in model space

    previews = []
    saved_hook, saved_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, *a, **k: previews.append(preview)
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        callback = latent_preview.prepare_callback(model, 1)
        callback(0, x0, x0, 1)
    finally:
        comfy.utils.PROGRESS_BAR_HOOK, args.preview_method = saved_hook, saved_method
    assert previews and previews[0] is not None
    image = previews[0][1]
    import numpy as np

    preview = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32))
    target = F.adaptive_avg_pool2d(pixels.permute(0, 3, 1, 2), preview.shape[:2])[0].permute(1, 2, 0)
    for c in range(3):
        p, t = preview[..., c].flatten(), target[..., c].flatten()
        corr = torch.corrcoef(torch.stack([p, t]))[0, 1].item()
        assert corr > 0.9, (c, corr)
