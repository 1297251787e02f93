"""SANA's official scheduler through ComfyUI's executor vs diffusers' SanaPipeline, on a SANA transformer.

Reference: diffusers ``SanaPipeline`` as shipped, with its default ``DPMSolverMultistepScheduler`` (SANA's
scheduler_config: flow sigmas, flow shift 3.0, dpmsolver++, order 2, midpoint, final sigma 0), 20 steps, cfg 4.5,
fixed Gemma-width prompt embeddings (300 tokens, padded and masked) and a negative prompt, a tiny random
``SanaTransformer2DModel`` (2 layers, caption 2304) and the tiny DC-AE f32c32. The pipeline starts from the noise
itself and feeds the transformer the scheduler's integer timesteps.

Ours: DC-Gen Load SANA -> CFGGuider (cfg 4.5) + DC-Gen Flow Sigmas ('dpm-solver++ flow') + DC-Gen
DPM-Solver++ Flow (SANA) + RandomNoise -> SamplerCustomAdvanced -> core VAE Decode. Images in [0, 1] within 1e-3
max abs, fp32 CPU. The core SamplerDPMPP_2M_SDE (eta 0, midpoint) route is kept as a measured contrast: the same
solver steps, but the model sees 1000 * sigma and the start is sigma0 * noise.
"""

from __future__ import annotations

import os

import pytest
import torch

import tiny
from test_sana_e2e import _prompt
from test_sana_schedules import SANA_DPM_CONFIG

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore:Should have:UserWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SEED, STEPS, CFG, TOKENS, CAPTION = 7, 20, 4.5, 300, 2304
SIZES = [(256, 256), (384, 256)]  # (width, height)
TOLERANCE = 1e-3
MODEL_NAME = "sana-tiny-gemma-width"

OFFICIAL = {"class_type": "DCGenDPMSolverFlowSampler", "inputs": {"solver_type": "midpoint"}}
CORE_2M_SDE = {"class_type": "SamplerDPMPP_2M_SDE", "inputs": {"solver_type": "midpoint", "eta": 0.0, "s_noise": 1.0,
                                                                 "noise_device": "cpu"}}


@pytest.fixture(scope="module")
def sana(comfyui):
    """The failing case's transformer: SANA's tiny test widths, 2 layers, reading Gemma-2-2B's 2304 channels."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(**dict(tiny.SANA_TINY, caption_channels=CAPTION)).eval()
    model = tiny._randomize(model, seed=13, scale=0.15)
    model.save_pretrained(os.path.join(comfyui.dirs["diffusion_models"], MODEL_NAME), safe_serialization=True)
    return model


def _embeds(seed, valid):
    """(embeddings [1, 300, 2304], mask [1, 300]): ``valid`` tokens, the rest padding, as the pipeline's tokenizer
    pads to 300."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, TOKENS, dtype=torch.long)
    mask[:, :valid] = 1
    return torch.randn(1, TOKENS, CAPTION, generator=g), mask


POSITIVE, NEGATIVE = _embeds(1, 41), _embeds(2, 6)


def _noise(width, height):
    return torch.randn((1, tiny.LATENT_CHANNELS, height // 32, width // 32), generator=torch.manual_seed(SEED))


@torch.no_grad()
def sana_pipeline(transformer, vae, width, height):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(**SANA_DPM_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(negative_prompt=None, prompt_embeds=POSITIVE[0], prompt_attention_mask=POSITIVE[1],
                 negative_prompt_embeds=NEGATIVE[0],
                 negative_prompt_attention_mask=NEGATIVE[1], guidance_scale=CFG, num_inference_steps=STEPS,
                 width=width, height=height, latents=_noise(width, height), use_resolution_binning=False,
                 output_type="pt").images
    return image.permute(0, 2, 3, 1)


def ours(comfyui, vae_name, width, height, sampler):
    key = f"sana-dpm-{sampler['class_type']}-{width}x{height}"
    comfyui.test_nodes.EMBEDDINGS[key + "+"] = POSITIVE
    comfyui.test_nodes.EMBEDDINGS[key + "-"] = NEGATIVE
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(_prompt(key, width, height, vae_name, MODEL_NAME, sampler, "dpm-solver++ flow (diffusers)",
                                STEPS))
    return comfyui.test_nodes.CAPTURED[key]["image"]


@pytest.fixture(scope="module")
def references(sana, tiny_vae):
    return {size: sana_pipeline(sana, tiny_vae, *size) for size in SIZES}


@pytest.mark.parametrize("width,height", SIZES)
def test_official_scheduler_matches_sana_pipeline(comfyui, comfy_models, references, width, height):
    expected = references[(width, height)]
    image = ours(comfyui, comfy_models.vae, width, height, OFFICIAL)
    assert image.shape == expected.shape == (1, height, width, 3)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    diff = (image - expected).abs().max().item()
    print(f"official route vs SanaPipeline {width}x{height}: max diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("width,height", SIZES)
def test_core_dpmpp_2m_sde_route_is_not_the_pipeline(comfyui, comfy_models, references, width, height):
    """The core route solves the same steps on other model inputs: far outside the tolerance on a transformer."""
    diff = (ours(comfyui, comfy_models.vae, width, height, CORE_2M_SDE) - references[(width, height)]).abs().max()
    print(f"core SamplerDPMPP_2M_SDE route vs SanaPipeline {width}x{height}: max diff {diff.item():.3g}")
    assert diff.item() > 10 * TOLERANCE
