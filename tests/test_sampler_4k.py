"""DC-Gen Sampler 4K: the official 4K schedule (FLUX resolution shift) on a DC-AE-1.5 f64c128 model,
text-to-image and img2img, against the authors' pipeline in diffusers; sizes and bad input."""


import pytest
import torch

import tiny

IMAGE_TOL = 1e-3
SEED, STEPS, GUIDANCE = 11, 4, 3.5


def _full_checkpoint():
    return {"model": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": "DC-Gen-FLUX-tiny-Res4K",
                                                                   "weight_dtype": "default", "vae": ["vae", 0]}}}


def _base_embedding_lora():
    """Base 16-channel FLUX + 128-channel aligned embedding + LoRA: the merge is the Res4K model's weights."""
    return {
        "base": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": "flux-tiny-base-for-4k.safetensors",
                                                              "weight_dtype": "default"}},
        "embed": {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
            "model": ["base", 0], "embedding_name": "dcgen-tiny-4k-embedding.safetensors", "vae": ["vae", 0]}},
        "model": {"class_type": "DCGenLoraLoader", "inputs": {
            "model": ["embed", 0], "lora_name": "dcgen-tiny-4k-lora.safetensors", "strength_model": 1.0}},
    }


def _prompt(key, width, height, denoise=1.0, latent=None, route=_full_checkpoint, batch_size=1):
    p = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": "dc-ae-1.5-f64c128-tiny", "variant": "auto"}},
        **route(),
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "sample": {"class_type": "DCGenSampler", "inputs": {
            "model": ["model", 0], "positive": ["text", 0], "width": width, "height": height, "batch_size": batch_size,
            "steps": STEPS, "guidance": GUIDANCE, "seed": SEED, "sampler_name": "euler", "scheduler": "simple",
            "denoise": denoise, "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["sample", 1],
                                                           "latent": ["sample", 0]}},
    }
    if latent is not None:
        p.update(latent)
        p["sample"]["inputs"]["latent"] = ["encode", 0]
    return p


@pytest.mark.parametrize("route", [_full_checkpoint, _base_embedding_lora], ids=["full-checkpoint", "embedding+lora"])
def test_text_to_image_matches_the_4k_pipeline(comfyui, models_4k, route):
    dcgen, vae, _, _ = models_4k
    cond, pooled = tiny.prompt_embeddings(seed=21)
    comfyui.test_nodes.EMBEDDINGS["4k-t2i"] = (cond, pooled)
    comfyui.runtime.run(_prompt("4k-t2i", 512, 384, route=route))
    ours = comfyui.test_nodes.CAPTURED["4k-t2i"]
    ref, ref_latents = tiny.reference_images(dcgen.dcgen, vae, 512, 384, SEED, STEPS, GUIDANCE, cond, pooled)
    assert ours["latent"]["samples"].shape == (1, 128, 6, 8)
    assert ours["image"].shape == ref.shape == (1, 384, 512, 3)
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    assert (ours["image"] - ref).abs().max().item() <= IMAGE_TOL


def test_img2img_matches_the_pipeline(comfyui, models_4k):
    """VAE Encode (DC-AE-1.5) -> DC-Gen Sampler with denoise 0.5."""
    import torch.nn.functional as F

    dcgen, vae, comfy_vae, _ = models_4k
    cond, pooled = tiny.prompt_embeddings(seed=22)
    comfyui.test_nodes.EMBEDDINGS["4k-i2i"] = (cond, pooled)
    g = torch.Generator().manual_seed(5)
    pixels = F.interpolate(torch.rand(1, 3, 3, 3, generator=g), size=(256, 384), mode="bilinear").permute(0, 2, 3, 1)
    comfyui.test_nodes.IMAGES["4k-i2i"] = pixels
    latent_nodes = {
        "image": {"class_type": "TestImage", "inputs": {"key": "4k-i2i"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
    }
    comfyui.runtime.run(_prompt("4k-i2i", 0, 0, denoise=0.5, latent=latent_nodes))
    ours = comfyui.test_nodes.CAPTURED["4k-i2i"]
    with torch.no_grad():
        init = vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent * vae.config.scaling_factor
    ref, _ = tiny.reference_images(dcgen.dcgen, vae, 384, 256, SEED, STEPS, GUIDANCE, cond, pooled,
                                   init_latents=init, denoise=0.5)
    assert ours["image"].shape == ref.shape == (1, 256, 384, 3)  # width/height 0: the latent's size
    assert (ours["image"] - ref).abs().max().item() <= IMAGE_TOL


def test_bad_requests(comfyui, models_4k, comfy_models):
    err = comfyui.core.shared.errors.DCGenError
    nodes = comfyui.runtime.node_classes
    _, _, vae15, model4k = models_4k
    cond = [[torch.zeros(1, tiny.TEXT_TOKENS, tiny.TEXT_DIM), {"pooled_output": torch.zeros(1, tiny.POOLED_DIM)}]]
    sampler = nodes["DCGenSampler"]()
    vae1k = nodes["DCGenDCAELoader"]().load(comfy_models.vae, "auto")[0]
    model1k = nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0]
    before = dict(model1k.model_options["dcgen"])
    with pytest.raises(err, match=r"at most 2048 px per side for the DC-Gen 1K model .* found 4096x4096\. Use the DC-Gen Res4K"):
        sampler.run(model1k, cond, 4096, 4096, 1, 2, 3.5, 0, "euler", "simple", 1.0)
    with pytest.raises(err, match=r"at most 4096 px per side for the DC-Gen 4K model .* found 8192x4096"):
        sampler.run(model4k, cond, 8192, 4096, 1, 2, 3.5, 0, "euler", "simple", 1.0)
    with pytest.raises(err, match=r"multiples of 64 .* found 1000x1024"):
        sampler.run(model4k, cond, 1000, 1024, 1, 2, 3.5, 0, "euler", "simple", 1.0)
    latent_1k = {"samples": torch.randn(1, 32, 8, 8)}
    with pytest.raises(err, match=r"expected a DC-AE latent with 128 channels .* found 32 channels"):
        sampler.run(model4k, cond, 0, 0, 1, 2, 3.5, 0, "euler", "simple", 0.5, latent=latent_1k)
    with pytest.raises(err, match=r"expected the 128-channel DC-AE of this model, found .* 32 channels"):
        sampler.run(model4k, cond, 256, 256, 1, 1, 3.5, 0, "euler", "simple", 1.0, vae=vae1k)
    assert model1k.model_options["dcgen"] == before
    latent_4k = {"samples": torch.zeros(2, 128, 4, 4)}
    with pytest.raises(err, match=r"expected 0 x 0 \(the connected LATENT's size\) or its 256x256, found 512x512"):
        sampler.run(model4k, cond, 512, 512, 1, 2, 3.5, 0, "euler", "simple", 0.5, latent=latent_4k)
    with pytest.raises(err, match=r"batch_size: expected 1 or the connected LATENT's batch 2, found 3"):
        sampler.run(model4k, cond, 0, 0, 3, 2, 3.5, 0, "euler", "simple", 0.5, latent=latent_4k)
    with pytest.raises(err, match=r"expected both 0"):
        sampler.run(model4k, cond, 0, 512, 1, 2, 3.5, 0, "euler", "simple", 1.0)


def test_defaults_are_the_native_size_and_every_widget_counts(comfyui, models_4k, comfy_models):
    """0 x 0 (the default) samples the connected model's native size; batch_size gives a batch."""
    nodes = comfyui.runtime.node_classes
    spec = nodes["DCGenSampler"].INPUT_TYPES()["required"]
    assert spec["width"][1]["default"] == spec["height"][1]["default"] == 0 and spec["width"][1]["step"] == 32
    sampling = comfyui.core.shared.sampling
    model1k = nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0]
    assert sampling.resolve_size(model1k.model_options["dcgen"], 0, 0, None) == (1024, 1024)
    assert sampling.resolve_size(models_4k[3].model_options["dcgen"], 0, 0, None) == (4096, 4096)
    key = "4k-batch"
    comfyui.test_nodes.EMBEDDINGS[key] = tiny.prompt_embeddings(seed=3)
    comfyui.runtime.run(_prompt(key, 128, 192, batch_size=2))
    assert comfyui.test_nodes.CAPTURED[key]["image"].shape == (2, 192, 128, 3)
