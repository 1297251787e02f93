"""Time-shift rules and core ModelSamplingFlux on DC-Gen models, end to end against the authors' pipeline.

Both rules (flux2: r = sqrt(tokens * C / 4096); mu: FLUX's resolution shift) on a 32- and a 128-channel model,
chosen with DC-Gen Time Shift; core ModelSamplingFlux after a DC-Gen model gives the official DC-Gen schedule for
the size it names. Tolerance: images within 1e-3 (fp32 CPU), as the parity tests.
"""

import pytest

import tiny

IMAGE_TOL = 1e-3
SEED, STEPS, GUIDANCE = 5, 4, 3.5
RULE_LABELS = {"linear": "flux2: r = sqrt(tokens * C / 4096) (1K models)",
               "exponential": "mu: FLUX resolution shift, linear in tokens (4K models)"}


@pytest.fixture(scope="module")
def models(comfy_models, models_4k):
    """channels -> (model name, VAE name, diffusers transformer, diffusers VAE, sampled width, height)."""
    dcgen_4k, vae_4k = models_4k[0], models_4k[1]
    return {32: (comfy_models.dcgen, comfy_models.vae, None, None, 256, 320),
            128: ("DC-Gen-FLUX-tiny-Res4K", "dc-ae-1.5-f64c128-tiny", dcgen_4k.dcgen, vae_4k, 192, 128)}


def _prompt(key, model_name, vae_name, width, height, schedule_node):
    p = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": vae_name, "variant": "auto"}},
        "loaded": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default",
                                                                "vae": ["vae", 0]}},
        "model": {**schedule_node, "inputs": {**schedule_node["inputs"], "model": ["loaded", 0]}},
        "latent": {"class_type": "DCGenEmptyLatent",
                   "inputs": {"vae": ["vae", 0], "width": width, "height": height, "batch_size": 1}},
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": GUIDANCE}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["guidance", 0], "negative": ["guidance", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["decode", 0]}},
    }
    return p


def _compare(comfyui, models, tiny_dcgen, tiny_vae, c, key, schedule_node, rule=None, shift_size=None):
    name, vae_name, transformer, vae, width, height = models[c]
    transformer, vae = (transformer or tiny_dcgen.dcgen), (vae or tiny_vae)
    cond, pooled = tiny.prompt_embeddings(seed=9)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    comfyui.runtime.run(_prompt(key, name, vae_name, width, height, schedule_node))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    ref, _ = tiny.reference_images(transformer, vae, width, height, SEED, STEPS, GUIDANCE, cond, pooled,
                                   rule=rule, shift_size=shift_size)
    assert ours.shape == ref.shape
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("rule", ["linear", "exponential"])
@pytest.mark.parametrize("channels", [32, 128])
def test_each_rule_reproduces_the_pipeline(comfyui, models, tiny_dcgen, tiny_vae, channels, rule):
    node = {"class_type": "DCGenTimeShift", "inputs": {"rule": RULE_LABELS[rule], "width": 0, "height": 0}}
    diff = _compare(comfyui, models, tiny_dcgen, tiny_vae, channels, f"rule-{channels}-{rule}", node, rule=rule)
    assert diff <= IMAGE_TOL
    # the other rule gives another image: the choice is not ignored
    other = "exponential" if rule == "linear" else "linear"
    name, vae_name, transformer, vae, width, height = models[channels]
    cond, pooled = comfyui.test_nodes.EMBEDDINGS[f"rule-{channels}-{rule}"]
    ref_other, _ = tiny.reference_images(transformer or tiny_dcgen.dcgen, vae or tiny_vae, width, height, SEED,
                                         STEPS, GUIDANCE, cond, pooled, rule=other)
    assert (comfyui.test_nodes.CAPTURED[f"rule-{channels}-{rule}"]["image"] - ref_other).abs().max() > 10 * IMAGE_TOL


@pytest.mark.parametrize("channels", [32, 128])
def test_model_sampling_flux_gives_the_dcgen_schedule_for_its_size(comfyui, models, tiny_dcgen, tiny_vae, channels):
    named = (512, 512) if channels == 32 else (1024, 512)
    node = {"class_type": "ModelSamplingFlux",
            "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": named[0], "height": named[1]}}
    diff = _compare(comfyui, models, tiny_dcgen, tiny_vae, channels, f"msf-{channels}", node, shift_size=named)
    assert diff <= IMAGE_TOL


def test_model_sampling_flux_with_other_shifts_is_refused(comfyui, models):
    node = {"class_type": "ModelSamplingFlux",
            "inputs": {"max_shift": 2.0, "base_shift": 0.5, "width": 1024, "height": 1024}}
    name, vae_name, *_ = models[32]
    comfyui.test_nodes.EMBEDDINGS["msf-refused"] = tiny.prompt_embeddings(seed=9)
    with pytest.raises(RuntimeError) as err:
        comfyui.runtime.run(_prompt("msf-refused", name, vae_name, 256, 256, node))
    assert "ModelSamplingFlux" in str(err.value) and "DC-Gen Time Shift" in str(err.value)
