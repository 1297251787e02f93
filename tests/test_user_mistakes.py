"""What users hit: wrong grids, sizes out of range, re-applied latent spaces. Each case either gives the size
asked for or a clear error, on every sampling path, and never changes the model that came in."""

import os

import pytest
import torch
from safetensors.torch import save_file

import tiny
from test_bad_input import _assert_unchanged, _fingerprint, _node


def _ksampler_prompt(models, key, latent_node, model_node=None, sampler="KSampler"):
    p = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": models.vae, "variant": "auto"}},
        "model": model_node or {"class_type": "DCGenModelLoader",
                                "inputs": {"unet_name": models.dcgen, "weight_dtype": "default"}},
        "latent": latent_node,
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "latent": ["sampler", 0]}},
    }
    if sampler == "KSampler":
        p["sampler"] = {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    else:
        p.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
            "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["text", 0]}},
            "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sigmas": {"class_type": "BasicScheduler",
                       "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 1, "denoise": 1.0}},
            "sampler": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
        })
    return p


def test_f64_empty_latent_on_the_1k_model_gives_the_size_asked_for(comfyui, comfy_models, models_4k):
    key = "f64-on-1k"
    comfyui.test_nodes.EMBEDDINGS[key] = tiny.prompt_embeddings()
    prompt = _ksampler_prompt(comfy_models, key, {"class_type": "DCGenEmptyLatent", "inputs": {
        "vae": ["vae4k", 0], "width": 384, "height": 256, "batch_size": 1}})
    prompt["vae4k"] = {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": "dc-ae-1.5-f64c128-tiny",
                                                                   "variant": "auto"}}
    comfyui.runtime.run(prompt)
    assert comfyui.test_nodes.CAPTURED[key]["latent"]["samples"].shape == (1, tiny.LATENT_CHANNELS, 256 // 32,
                                                                           384 // 32)


@pytest.mark.parametrize("sampler", ["KSampler", "SamplerCustomAdvanced"])
@pytest.mark.parametrize("latent", ["core", "dcae"])
def test_size_range_holds_on_core_samplers(comfyui, comfy_models, sampler, latent):
    """The 1K model is made for up to 2048 px per side, whichever node made the latent."""
    key = f"range-{sampler}-{latent}"
    comfyui.test_nodes.EMBEDDINGS[key] = tiny.prompt_embeddings()
    size = {"width": 3072, "height": 1024, "batch_size": 1}
    node = {"class_type": "EmptyLatentImage", "inputs": size} if latent == "core" else \
        {"class_type": "DCGenEmptyLatent", "inputs": {**size, "vae": ["vae", 0]}}
    with pytest.raises(RuntimeError) as err:
        comfyui.runtime.run(_ksampler_prompt(comfy_models, key, node, sampler=sampler))
    assert "at most 2048 px per side" in str(err.value) and "3072x1024" in str(err.value)


def test_empty_dcae_latent_that_cannot_fit_memory_is_refused_before_allocating(comfyui, comfy_models, monkeypatch):
    import sys

    tiling = sys.modules["comfyui_dc_gen.dcgen_core.shared.dcae.tiling"]  # the pack as ComfyUI loaded it
    vae = _node(comfyui, "DCGenDCAELoader").load(comfy_models.vae, "auto")[0]
    monkeypatch.setattr(tiling, "available_ram", lambda: 2 * 2**30)
    allocations = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocations.append(a) or real_zeros(*a, **k))
    with pytest.raises(comfyui.core.shared.errors.DCGenError) as err:
        _node(comfyui, "DCGenEmptyLatent").generate(vae, 4096, 4096, 64)
    assert "64 x 4096x4096" in str(err.value) and "GiB" in str(err.value) and "batch_size" in str(err.value)
    assert not allocations
    assert _node(comfyui, "DCGenEmptyLatent").generate(vae, 1024, 1024, 2)[0]["samples"].shape == (2, 32, 32, 32)


def _second_embedding(comfyui, tiny_dcgen, name, scale=1.5):
    path = os.path.join(comfyui.dirs["dcgen_embeddings"], name)
    save_file({k: (scale * v).contiguous() for k, v in tiny_dcgen.embedding.items()}, path)
    return name


def _forward_latent(model):
    """Two sampling steps on a DC-AE latent through ComfyUI's sampler."""
    import comfy.sample

    cond, pooled = tiny.prompt_embeddings()
    latent = torch.zeros(1, tiny.LATENT_CHANNELS, 4, 4)
    noise = comfy.sample.prepare_noise(latent, 0)
    positive = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
    return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, positive, latent, seed=0)


def test_reapplying_the_latent_space_replaces_it(comfyui, comfy_models, tiny_dcgen):
    """A second embedding, a LoRA that carries one, a VAE with another scaling: the last one wins (one token view,
    never two), and the result equals applying only the last one."""
    import copy
    import dataclasses

    import comfy.patcher_extension as pe

    vae = _node(comfyui, "DCGenDCAELoader").load(comfy_models.vae, "auto")[0]
    rescaled_vae = copy.copy(vae)
    rescaled_vae.dcae_config = dataclasses.replace(vae.dcae_config, scaling_factor=0.5)
    base = _node(comfyui, "DCGenModelLoader").load(comfy_models.base, "default")[0]
    other = _second_embedding(comfyui, tiny_dcgen, "dcgen-flux-tiny-embedding-x1.5.safetensors")
    apply = _node(comfyui, "DCGenApplyAlignedEmbedding").apply
    once = apply(base, other, rescaled_vae)[0]
    twice = apply(apply(base, comfy_models.embedding, vae)[0], other, rescaled_vae)[0]
    with_lora = _node(comfyui, "DCGenLoraLoader").apply(base, comfy_models.lora_with_embedding, 0.0, vae)[0]
    via_lora = apply(with_lora, other, rescaled_vae)[0]
    for m in (twice, via_lora):
        for kind in (pe.WrappersMP.DIFFUSION_MODEL, pe.WrappersMP.OUTER_SAMPLE):
            assert len(m.get_wrappers(kind, "dcgen_dcae_tokens")) == 1
        assert m.get_model_object("latent_format").scale_factor == 0.5
    ref = _forward_latent(once)
    assert ref.abs().max() > 1e-3
    for m in (twice, via_lora):
        assert (_forward_latent(m) - ref).abs().max().item() <= 1e-6


def test_128_channel_embedding_on_a_32_channel_dcgen_model_is_refused_when_applied(comfyui, comfy_models,
                                                                                  models_4k):
    dcgen = _node(comfyui, "DCGenModelLoader").load(comfy_models.dcgen, "default")[0]
    before = _fingerprint(dcgen)
    with pytest.raises(comfyui.core.shared.errors.DCGenError) as err:
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(dcgen, "dcgen-tiny-4k-embedding.safetensors")
    assert "expected an aligned embedding for 32-channel" in str(err.value) and "found one for 128" in str(err.value)
    with pytest.raises(comfyui.core.shared.errors.DCGenError):
        _node(comfyui, "DCGenLoraLoader").apply(dcgen, comfy_models.lora_with_embedding.replace(
            "dcgen-flux-tiny", "dcgen-flux-tiny"), 1.0, models_4k[2])
    _assert_unchanged(dcgen, before)


@pytest.mark.parametrize("which", ["context", "pooled"])
def test_text_encoder_of_another_width_names_the_expected_one(comfyui, comfy_models, which):
    key = f"text-width-{which}"
    cond, pooled = tiny.prompt_embeddings()
    if which == "context":
        cond = torch.zeros(1, cond.shape[1], 4096)
    else:
        pooled = torch.zeros(1, 768)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    latent = {"class_type": "DCGenEmptyLatent", "inputs": {"vae": ["vae", 0], "width": 128, "height": 128,
                                                           "batch_size": 1}}
    with pytest.raises(RuntimeError) as err:
        comfyui.runtime.run(_ksampler_prompt(comfy_models, key, latent))
    msg = str(err.value)
    expected = f"width {tiny.TEXT_DIM}" if which == "context" else f"width {tiny.POOLED_DIM}"
    found = "4096 (T5-XXL)" if which == "context" else "768 (CLIP-L)"
    assert "CONDITIONING: expected" in msg and expected in msg and found in msg and "DualCLIPLoader" in msg


def test_wrong_latent_into_core_vae_decode_names_the_channels(comfyui, comfy_models):
    vae = _node(comfyui, "DCGenDCAELoader").load(comfy_models.vae, "auto")[0]
    with pytest.raises(comfyui.core.shared.errors.DCGenError) as err:
        comfyui.runtime.node_classes["VAEDecode"]().decode(vae, {"samples": torch.zeros(1, 16, 8, 8)})
    assert "expected a DC-AE latent with 32 channels, found 16 channels" in str(err.value)


def test_pixel_space_vae_message_does_not_guess_flux(comfyui):
    import comfy.sd

    px = comfy.sd.VAE(sd={})
    px.latent_channels, px.downscale_ratio = 3, 1
    with pytest.raises(comfyui.core.shared.errors.DCGenError) as err:
        comfyui.core.shared.comfy_vae.require_dcae(px)
    assert "pixel-space VAE" in str(err.value) and "FLUX" not in str(err.value)
