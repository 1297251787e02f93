"""Acceptance: DC-Gen-Qwen-Image-Edit through ComfyUI's executor equals the authors' DCQwenImageEditPipeline.

Same weights (a tiny random QwenImageTransformer2DModel with patch 1 on 32 channels, saved in the Hub repo's nested
folder layout, and a tiny DC-AE f32c32), the same reference image (200x150, resized by both to calculate_dimensions'
1184x896: an odd 37-token row, where core's RoPE centring differs from the authors'), the same initial noise
(ComfyUI's seed -> torch.randn of the natural latent, packed 1x1 for the pipeline), the same fixed prompt and
negative embeddings, true CFG 3.5 with the per-token norm rescale. Outputs: the pipeline's default size (1152x896)
and a smaller one (256x192: the text positions then follow the reference, not the noise grid). Routes: the release
(full checkpoint; KSampler, SamplerCustomAdvanced and the DC-Gen Sampler) and a base Qwen-Image-Edit + DC-Gen
aligned embedding + DC-Gen LoRA whose merge is its weights. Tolerance: final images (in [0, 1]) within 1e-3 max abs
and final latents within 1e-4, fp32 CPU.
"""

import pytest

import tiny
import tiny_qwen

IMAGE_TOL = 1e-3
LATENT_TOL = 1e-4  # final latents in model space (the tiny DC-AE decoder compresses differences)
SEED, STEPS, CFG = 42, 4, 3.5


@pytest.fixture(scope="module")
def qwen_models(comfyui):
    return tiny_qwen.install_models(comfyui)


@pytest.mark.parametrize("route,sampler,size", [
    ("full-checkpoint", "KSampler", (0, 0)),
    ("full-checkpoint", "SamplerCustomAdvanced", (256, 192)),
    ("embedding+lora", "KSampler", (256, 192)),
    ("full-checkpoint", "DCGenSampler", (256, 192)),
])
def test_comfyui_matches_authors_edit_pipeline(comfyui, qwen_models, route, sampler, size):
    transformer, vae, image, pos, neg = qwen_models
    key = f"qwen-edit-{route}-{sampler}"
    comfyui.runtime.run(tiny_qwen.edit_prompt(key, sampler, *size, seed=SEED, steps=STEPS, cfg=CFG, route=route))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    ref, ref_latents, height, width = tiny_qwen.authors_edit(transformer, vae, image, pos, neg, SEED, STEPS, CFG,
                                                *(size if size != (0, 0) else (None, None)))
    assert ours.shape == ref.shape == (1, height, width, 3)
    latents = comfyui.test_nodes.CAPTURED[key]["latent"]["samples"]
    assert latents.shape == (1, 32, height // 32, width // 32)
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5  # not saturated: the comparison means something
    diff = (ours - ref).abs().max().item()
    latent_diff = (latents * tiny.SCALING - ref_latents).abs().max().item()
    print(f"DC-Gen-Qwen-Image-Edit {route} {sampler} {width}x{height}: max |ComfyUI - authors| image {diff:.2e}, "
          f"latent {latent_diff:.2e} (latent std {ref_latents.std().item():.2f})")
    assert diff <= IMAGE_TOL
    assert latent_diff <= LATENT_TOL
