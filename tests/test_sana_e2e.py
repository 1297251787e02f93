"""SANA through ComfyUI's executor vs the authors' diffusers pipeline pieces, on the same weights, noise and text.

A tiny random SANA (diffusers folder; and the original NVlabs/Sana key layout) with a tiny DC-AE f32c32. Ours:
DC-Gen Load SANA -> CFGGuider (cfg 4.5) + euler + DC-Gen Flow Sigmas (shift 3.0) + RandomNoise ->
SamplerCustomAdvanced -> core VAE Decode. Reference: SanaTransformer2DModel + FlowMatchEulerDiscreteScheduler(shift
3.0) with classifier-free guidance on (negative, positive) embeddings and masks, AutoencoderDC.decode(latents /
scaling). Tolerance: images (in [0, 1]) within 1e-3 max abs, fp32 CPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiny

SEED, STEPS, CFG = 7, 4, 4.5
CAPTION, TOKENS = tiny.SANA_CAPTION, 9


@pytest.fixture(scope="module")
def sana(comfyui):
    model = tiny.tiny_sana()
    model.save_pretrained(os.path.join(comfyui.dirs["diffusion_models"], "sana-tiny"), safe_serialization=True)
    return model


def _embeds(seed):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, TOKENS, CAPTION, generator=g)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    mask[:, -3:] = 0
    return cond, mask


@torch.no_grad()
def reference(model, vae, width, height, pos, neg):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(STEPS)
    c, f = model.config.in_channels, 2 ** (len(vae.config.decoder_block_out_channels) - 1)
    latents = torch.randn((1, c, height // f, width // f), generator=torch.manual_seed(SEED))
    context = torch.cat([neg[0], pos[0]])
    mask = torch.cat([neg[1], pos[1]])
    for t in sched.timesteps:
        v = model(torch.cat([latents] * 2), encoder_hidden_states=context, encoder_attention_mask=mask,
                  timestep=t.expand(2)).sample
        v_uncond, v_cond = v.chunk(2)
        latents = sched.step(v_uncond + CFG * (v_cond - v_uncond), t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


EULER = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}


def _prompt(key, width, height, vae_name, model_name, sampler=EULER, schedule="flow-match euler (diffusers)",
            steps=STEPS):
    """SANA through SamplerCustomAdvanced with CFGGuider and DC-Gen Flow Sigmas: ``sampler`` is the SAMPLER node."""
    return {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": vae_name, "variant": "auto"}},
        "model": {"class_type": "DCGenSanaModelLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default",
                                                                  "vae": ["vae", 0]}},
        "pos": {"class_type": "TestMaskedEmbeds", "inputs": {"key": key + "+"}},
        "neg": {"class_type": "TestMaskedEmbeds", "inputs": {"key": key + "-"}},
        "latent": {"class_type": "DCGenEmptyLatent", "inputs": {"vae": ["vae", 0], "width": width, "height": height,
                                                                "batch_size": 1}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": CFG}},
        "sampler": sampler,
        "sigmas": {"class_type": "DCGenFlowSigmas", "inputs": {"steps": steps, "shift": 3.0,
                                                               "schedule": schedule}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["decode", 0],
                                                            "model": ["model", 0]}},
    }


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_sana_matches_diffusers_pipeline(comfyui, comfy_models, sana, tiny_vae, layout):
    name = "sana-tiny"
    if layout == "original":
        from safetensors.torch import save_file
        from test_sana_model import _to_original as to_original

        # original keys carry no head counts; at widths other than SANA's own they come from a config.json beside
        name = "sana-tiny-original"
        folder = os.path.join(comfyui.dirs["diffusion_models"], name)
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in to_original(sana.state_dict()).items()},
                  os.path.join(folder, "sana_tiny.safetensors"))
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sana.config), f)
    key = f"sana-{layout}"
    pos, neg = _embeds(1), _embeds(2)
    comfyui.test_nodes.EMBEDDINGS[key + "+"] = pos
    comfyui.test_nodes.EMBEDDINGS[key + "-"] = neg
    width, height = 256, 192
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(_prompt(key, width, height, comfy_models.vae, name))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    expected = reference(sana, tiny_vae, width, height, pos, neg)
    assert ours.shape == expected.shape == (1, height, width, 3)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-3
    model = comfyui.test_nodes.CAPTURED[key]["model"]
    assert model.model_options["dcgen"]["architecture"] == "sana"
    import comfy.model_sampling

    sampling = model.model.model_sampling
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and sampling.shift == 3.0


# --- DC-Gen-SANA: SANA + 128-channel aligned embedding + LoRA, in DC-AE-1.5 f64c128 ----------------------------

@pytest.fixture(scope="module")
def dcgen_sana(comfyui, sana):
    """The tiny SANA's aligned embedding (128 channels) and LoRA files, and the merged DC-Gen-SANA (diffusers)."""
    return tiny.write_dcgen_sana(
        sana, os.path.join(comfyui.dirs["dcgen_embeddings"], "dcgen-sana-tiny-4k-embedding.safetensors"),
        os.path.join(comfyui.dirs["loras"], "dcgen-sana-tiny-4k-lora.safetensors"))


def test_dcgen_sana_matches_diffusers(comfyui, comfy_models, sana, dcgen_sana, models_4k):
    """SANA (f32c32) + 128-channel embedding + LoRA through the pack's nodes = the merged DC-Gen-SANA in diffusers,
    sampled in DC-AE-1.5 f64c128 latents and decoded by the 4K DC-AE."""
    _, vae15, _, _ = models_4k
    key = "dcgen-sana"
    pos, neg = _embeds(3), _embeds(4)
    comfyui.test_nodes.EMBEDDINGS[key + "+"] = pos
    comfyui.test_nodes.EMBEDDINGS[key + "-"] = neg
    prompt = _prompt(key, 256, 192, "dc-ae-1.5-f64c128-tiny", "sana-tiny")
    prompt["model"]["inputs"].pop("vae")  # the base SANA samples f32c32; the embedding moves it to the 4K DC-AE
    prompt["embed"] = {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
        "model": ["model", 0], "embedding_name": "dcgen-sana-tiny-4k-embedding.safetensors", "vae": ["vae", 0]}}
    prompt["lora"] = {"class_type": "DCGenLoraLoader", "inputs": {
        "model": ["embed", 0], "lora_name": "dcgen-sana-tiny-4k-lora.safetensors", "strength_model": 1.0}}
    prompt["guider"]["inputs"]["model"] = ["lora", 0]
    prompt["capture"]["inputs"]["model"] = ["lora", 0]
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(prompt)
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    expected = reference(dcgen_sana, vae15, 256, 192, pos, neg)
    assert ours.shape == expected.shape == (1, 192, 256, 3)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-3
    info = comfyui.test_nodes.CAPTURED[key]["model"].model_options["dcgen"]
    assert (info["latent_channels"], info["spatial_compression"]) == (128, 64)
