"""DC-AE-V as a core ComfyUI video VAE: DC-Gen Load DC-AE-V -> core VAE Encode / VAE Decode / Create Video /
Save WEBM through ComfyUI's executor, matching the authors' encode/decode (1e-5, float32 on CPU), latent
previews of 5-D latents, Cancel between chunks, and bad input."""

import os

import pytest
import torch

import tiny_video
from authors_dc_gen import dc_videogen

TOL = 1e-5
FRAMES, H, W = 84, 32, 64  # two chunks + a 4-frame tail


@pytest.fixture(scope="module")
def setup(comfyui):
    authors = dc_videogen("dc_ae_v")
    ref = tiny_video.authors_model(authors, seed=7)
    tiny_video.save_pt(ref, os.path.join(comfyui.dirs["vae"], "dc-ae-v-tiny-bf16.pt"))
    ref = ref.to(torch.bfloat16).float()  # the file is bf16, as the release
    vae = comfyui.runtime.node_classes["DCGenDCAEVLoader"]().load("dc-ae-v-tiny-bf16.pt", "auto")[0]
    return ref, vae


def test_executor_encode_decode_create_video_save_webm(comfyui, setup):
    ref, _ = setup
    clip = tiny_video.smooth_video(FRAMES, H, W)
    comfyui.test_nodes.IMAGES["dcaev"] = clip
    prompt = {
        "1": {"class_type": "DCGenDCAEVLoader", "inputs": {"vae_name": "dc-ae-v-tiny-bf16.pt", "variant": "auto"}},
        "2": {"class_type": "TestImage", "inputs": {"key": "dcaev"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "TestCapture", "inputs": {"key": "dcaev", "latent": ["3", 0], "image": ["4", 0]}},
        "6": {"class_type": "CreateVideo", "inputs": {"images": ["4", 0], "fps": 16.0}},
        "7": {"class_type": "SaveVideo", "inputs": {"video": ["6", 0], "filename_prefix": "dcaev", "format": "auto",
                                                    "codec": "auto"}},
        "8": {"class_type": "SaveWEBM", "inputs": {"images": ["4", 0], "filename_prefix": "dcaev", "codec": "vp9",
                                                   "fps": 16.0, "crf": 32.0}},
    }
    comfyui.runtime.run(prompt)
    got = comfyui.test_nodes.CAPTURED["dcaev"]
    latent, frames = got["latent"]["samples"], got["image"]
    with torch.no_grad():
        ref_z = ref.encode(clip.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1)
        ref_frames = (ref.decode(ref_z) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0)
    assert latent.shape == ref_z.shape == (1, 32, FRAMES // 4, H // 32, W // 32)
    assert (latent - ref_z).abs().max().item() <= TOL * max(1.0, ref_z.abs().max().item())
    assert frames.shape == (FRAMES, H, W, 3)
    assert (frames - ref_frames).abs().max().item() <= TOL
    saved = [f for f in os.listdir(comfyui.output) if f.startswith("dcaev")]
    assert any(f.endswith(".webm") for f in saved) and any(f.endswith(".mp4") for f in saved), saved


def test_latent_previews_of_video_latents(comfyui, setup):
    """Preview factors are fitted at load and a 5-D latent previews as an image (core Latent2RGB)."""
    import latent_preview

    _, vae = setup
    fmt = comfyui.core.shared.comfy_vae_v.make_video_latent_format(32, 0.7241)  # the pack as ComfyUI loaded it
    assert fmt.latent_dimensions == 3 and len(fmt.latent_rgb_factors) == 32 and len(fmt.latent_rgb_factors_bias) == 3
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    image = previewer.decode_latent_to_preview(torch.randn(1, 32, 5, 4, 6))
    assert image is not None


def test_cancel_stops_between_chunks(comfyui, setup):
    import comfy.model_management as mm
    import comfy.utils

    _, vae = setup
    z = torch.randn(1, 32, 30, 1, 2)
    seen = []
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, *a, **k: (seen.append(value),
                                                                   mm.interrupt_current_processing())
    try:
        with pytest.raises(mm.InterruptProcessingException):
            vae.decode(z)
    finally:
        comfy.utils.PROGRESS_BAR_HOOK = saved
        mm.interrupt_current_processing(False)
    assert seen == [1]  # stopped after the first of three chunks


def test_bad_latents_name_what_was_expected(comfyui, setup):
    _, vae = setup
    with pytest.raises(ValueError, match="found a 4-D image latent.*DC-Gen Load DC-AE"):
        vae.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match="Wan2.1 VAE latent"):
        vae.decode(torch.zeros(1, 16, 5, 8, 8))
    with pytest.raises(ValueError, match="multiple of 4 .*found 6"):
        vae.encode(torch.rand(6, 32, 32, 3))
    empty = comfyui.runtime.node_classes["DCGenEmptyDCAEVLatentVideo"]()
    assert empty.generate(vae, 64, 32, 81, 1)[0]["samples"].shape == (1, 32, 20, 1, 2)
    assert empty.generate(vae, 1280, 720, 81, 1)[0]["samples"].shape == (1, 32, 20, 22, 40)  # as the authors
    with pytest.raises(ValueError, match="expected a DC-AE-V video VAE"):
        empty.generate(object(), 64, 32, 81, 1)


@torch.inference_mode()
def test_core_tiled_decode_node_runs(comfyui, setup):
    """Core VAE Decode (Tiled) cuts the latent in space and time itself; each piece goes through the chunked
    decoder (an approximation, as for every VAE: the output keeps the shape and stays finite)."""
    _, vae = setup
    z = torch.randn(1, 32, 21, 2, 3)
    out = comfyui.runtime.node_classes["VAEDecodeTiled"]().decode(vae, {"samples": z}, 64, 32, 40, 8)[0]
    assert out.shape == (84, 64, 96, 3) and torch.isfinite(out).all()


def test_previews_while_sampling_dcgen_wan(comfyui, setup):
    """A DC-Gen-Wan MODEL previews its 5-D latents with the factors fitted when the DC-AE-V was loaded."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    import tiny_video

    folder = os.path.join(comfyui.dirs["diffusion_models"], "dcgen-wan-preview", "transformer_t2v")
    if not os.path.isdir(folder):
        tiny_video.save_wan_folder(tiny_video.tiny_wan(False), folder)
    model = comfyui.runtime.node_classes["DCGenWanModelLoader"]().load("dcgen-wan-preview/transformer_t2v", "fp32")[0]
    seen = []
    saved_hook, saved_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, *a, **k: seen.append(preview)
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        x0 = torch.randn(1, 32, 5, 2, 3)
        latent_preview.prepare_callback(model, 1)(0, x0, x0, 1)
    finally:
        comfy.utils.PROGRESS_BAR_HOOK, args.preview_method = saved_hook, saved_method
    assert seen and seen[0] is not None
