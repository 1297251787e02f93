"""Core empty latents with DC-Gen models: the image size the user asked for, on every ComfyUI version.

Core Empty Latent Image (4 channels) and EmptySD3LatentImage (16) make latents at 1/8 scale; a DC-Gen model
samples on the DC-AE grid (1/32 for the 1K model). ComfyUI v0.33 resizes empty latents by
``downscale_ratio_spacial`` and the latent format's ``spacial_downscale_ratio``; v0.3.64 does not; the pack
maps them on both and refuses sizes off the grid.
"""

import pytest

import tiny

SEED, STEPS = 3, 2


def _prompt(models, key, latent_node: dict) -> dict:
    return {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": models.vae, "variant": "auto"}},
        "model": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": models.dcgen, "weight_dtype": "default"}},
        "latent": latent_node,
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["decode", 0], "latent": ["sampler", 0]}},
    }


@pytest.mark.parametrize("node", ["EmptyLatentImage", "EmptySD3LatentImage", "DCGenEmptyLatent"])
def test_empty_latents_give_the_size_asked_for(comfyui, comfy_models, node):
    width, height = 256, 384
    key = f"core-latent-{node}"
    comfyui.test_nodes.EMBEDDINGS[key] = tiny.prompt_embeddings(seed=1)
    inputs = {"width": width, "height": height, "batch_size": 2}
    if node == "DCGenEmptyLatent":
        inputs["vae"] = ["vae", 0]
    comfyui.runtime.run(_prompt(comfy_models, key, {"class_type": node, "inputs": inputs}))
    captured = comfyui.test_nodes.CAPTURED[key]
    assert captured["latent"]["samples"].shape == (2, tiny.LATENT_CHANNELS, height // 32, width // 32)
    assert captured["image"].shape == (2, height, width, 3)


def test_core_empty_latent_off_the_dcae_grid_is_refused(comfyui, comfy_models):
    key = "core-latent-off-grid"
    comfyui.test_nodes.EMBEDDINGS[key] = tiny.prompt_embeddings(seed=1)
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 1000, "height": 512, "batch_size": 1}}
    with pytest.raises(RuntimeError) as err:
        comfyui.runtime.run(_prompt(comfy_models, key, latent))
    message = str(err.value)
    assert "multiple of 32" in message and "1000x512" in message and "DC-Gen Empty Latent" in message


def test_dcae_latent_format_declares_its_grid(comfyui, comfy_models):
    model = comfyui.runtime.node_classes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0]
    assert model.get_model_object("latent_format").spacial_downscale_ratio == 32
