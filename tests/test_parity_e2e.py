"""Acceptance: DC-Gen-FLUX through ComfyUI's executor equals the authors' diffusers pipeline.

Same weights (a tiny random DC-Gen-FLUX in the diffusers folder layout, and a
base FLUX + aligned embedding + LoRA whose merge is those weights), same
initial noise (ComfyUI's seed -> torch.randn on CPU) and the same prompt
embeddings. Tolerance: final images (in [0, 1]) within 1e-3 max abs, fp32 CPU.
"""

import pytest

import tiny

IMAGE_TOL = 1e-3
SEED, STEPS, GUIDANCE = 42, 4, 3.5


def _ksampler_prompt(model_nodes: dict, model_ref, key: str, width: int, height: int, models) -> dict:
    p = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": models.vae, "variant": "auto"}},
        **model_nodes,
        "latent": {"class_type": "DCGenEmptyLatent",
                   "inputs": {"vae": ["vae", 0], "width": width, "height": height, "batch_size": 1}},
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": GUIDANCE}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["guidance", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["decode", 0], "latent": ["sampler", 0]}},
    }
    return p


def _custom_advanced(prompt: dict, model_ref) -> dict:
    p = {k: v for k, v in prompt.items() if k not in ("sampler", "negative")}
    p.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": model_ref, "conditioning": ["guidance", 0]}},
        "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler",
                   "inputs": {"model": model_ref, "scheduler": "simple", "steps": STEPS, "denoise": 1.0}},
        "sampler": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
    })
    return p


def full_checkpoint_route(models):
    return {"model": {"class_type": "DCGenModelLoader", "inputs": {
        "unet_name": models.dcgen, "weight_dtype": "default", "vae": ["vae", 0]}}}, ["model", 0]


def embedding_lora_route(models):
    return {
        "base": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": models.base, "weight_dtype": "default"}},
        "embed": {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
            "model": ["base", 0], "embedding_name": models.embedding, "vae": ["vae", 0]}},
        "lora": {"class_type": "DCGenLoraLoader", "inputs": {
            "model": ["embed", 0], "lora_name": models.lora, "strength_model": 1.0}},
    }, ["lora", 0]


def lora_with_embedding_route(models):
    return {
        "base": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": models.base, "weight_dtype": "default"}},
        "lora": {"class_type": "DCGenLoraLoader", "inputs": {
            "model": ["base", 0], "lora_name": models.lora_with_embedding, "strength_model": 1.0, "vae": ["vae", 0]}},
    }, ["lora", 0]


ROUTES = {"full-checkpoint": full_checkpoint_route, "embedding+lora": embedding_lora_route,
          "lora-carrying-embedding": lora_with_embedding_route}


@pytest.mark.parametrize("route,sampler,size", [
    ("full-checkpoint", "KSampler", (384, 256)),
    ("embedding+lora", "KSampler", (384, 256)),
    ("full-checkpoint", "SamplerCustomAdvanced", (256, 320)),
    ("embedding+lora", "SamplerCustomAdvanced", (256, 320)),
    ("lora-carrying-embedding", "KSampler", (256, 256)),
])
def test_comfyui_matches_diffusers_pipeline(comfyui, comfy_models, tiny_dcgen, tiny_vae, route, sampler, size):
    width, height = size
    key = f"{route}-{sampler}"
    cond, pooled = tiny.prompt_embeddings(seed=7)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    nodes, model_ref = ROUTES[route](comfy_models)
    prompt = _ksampler_prompt(nodes, model_ref, key, width, height, comfy_models)
    if sampler == "SamplerCustomAdvanced":
        prompt = _custom_advanced(prompt, model_ref)
    comfyui.runtime.run(prompt)
    ours = comfyui.test_nodes.CAPTURED[key]["image"]

    ref, ref_latents = tiny.reference_images(tiny_dcgen.dcgen, tiny_vae, width, height, SEED, STEPS, GUIDANCE,
                                             cond, pooled)
    assert ours.shape == ref.shape == (1, height, width, 3)
    latents = comfyui.test_nodes.CAPTURED[key]["latent"]["samples"]
    assert latents.shape == (1, tiny.LATENT_CHANNELS, height // 32, width // 32)
    # the image is not saturated, so the comparison is meaningful
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    assert (ours - ref).abs().max().item() <= IMAGE_TOL
    assert (latents * tiny.SCALING - ref_latents).abs().max().item() <= 1e-3
