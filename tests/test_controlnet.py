"""FLUX ControlNet + DC-Gen: a FLUX ControlNet applied with the core nodes to a DC-Gen model stops with a clear
error when sampling starts (before anything runs), and the incoming model is unchanged.

The ControlNet is a diffusers FluxControlNetModel of full FLUX width (ComfyUI's FLUX detection assumes it) with one
double block and random weights (tiny.full_width_flux_controlnet), loaded by the core ControlNetLoader."""

import os

import pytest
import torch

import tiny


@pytest.fixture(scope="module")
def controlnet_name(comfyui, flux_controlnet_file):
    name = "flux-controlnet-depth1.safetensors"
    tiny.link_or_copy(flux_controlnet_file, os.path.join(comfyui.dirs["controlnet"], name))
    return name


def test_flux_controlnet_on_dcgen_stops_with_a_clear_error(comfyui, comfy_models, controlnet_name):
    comfyui.test_nodes.EMBEDDINGS["controlnet"] = tiny.prompt_embeddings()
    comfyui.test_nodes.IMAGES["controlnet"] = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    prompt = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": comfy_models.vae, "variant": "auto"}},
        "model": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": comfy_models.dcgen,
                                                               "weight_dtype": "default"}},
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": "controlnet"}},
        "hint": {"class_type": "TestImage", "inputs": {"key": "controlnet"}},
        "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet_name}},
        "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["text", 0], "negative": ["text", 0], "control_net": ["cn", 0], "image": ["hint", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}},
        "latent": {"class_type": "DCGenEmptyLatent", "inputs": {"vae": ["vae", 0], "width": 256, "height": 256,
                                                                "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["apply", 0], "negative": ["apply", 1], "latent_image": ["latent", 0], "denoise": 1.0}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": "controlnet", "latent": ["sample", 0]}},
    }
    with pytest.raises(RuntimeError, match=r"ControlNet: expected no ControlNet on a DC-Gen model, found ControlNet\. "
                                           r"FLUX ControlNets read FLUX's 16-channel latent"):
        comfyui.runtime.run(prompt)
