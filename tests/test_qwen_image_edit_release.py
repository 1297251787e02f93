"""DC-Gen Load Qwen and the release folder: the schedule comes from its ``scheduler/scheduler_config.json`` (else
Qwen-Image-Edit's values), and the loader lists a release once (not its shards or components).

Schedule oracle: diffusers' FlowMatchEulerDiscreteScheduler configured from the same file, ``set_timesteps(sigmas=
linspace(1, 1/steps, steps), mu=calculate_shift(noise tokens, ...))`` with calculate_shift's parameters read from
the scheduler's config as the authors' pipeline reads them. Compared: the sigmas a core sampler receives on the
loaded MODEL (core's "simple" scheduler, then the pack's OUTER_SAMPLE wrapper), tolerance 1e-6.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import tiny
import tiny_qwen

diffusers = pytest.importorskip("diffusers")

SIGMA_TOL = 1e-6
STEPS = 5  # core "simple" samples the 10000-entry sigma table: exact linspace when steps divides 10000
GRID = (5, 7)  # noise tokens 35: an odd grid, far from the native 1024x1024 (1024 tokens)

CONFIGS = {
    "dynamic-exponential": {"base_image_seq_len": 16, "max_image_seq_len": 1024, "base_shift": 0.2, "max_shift": 1.6,
                            "shift_terminal": 0.1, "use_dynamic_shifting": True, "time_shift_type": "exponential"},
    "dynamic-linear": {"base_image_seq_len": 64, "max_image_seq_len": 4096, "base_shift": 1.5, "max_shift": 3.0,
                       "shift_terminal": None, "use_dynamic_shifting": True, "time_shift_type": "linear"},
    "static-shift": {"shift": 3.0, "use_dynamic_shifting": False, "shift_terminal": 0.05},
    # keys left out take FlowMatchEulerDiscreteScheduler's defaults (max_shift 1.15, max_image_seq_len 4096)
    "partial": {"use_dynamic_shifting": True, "base_shift": 0.7},
}


def _release(comfyui, name: str, scheduler: dict | None) -> str:
    """A tiny release folder (model_index.json, transformer/ in shards, scheduler/ when given)."""
    root = os.path.join(comfyui.dirs["diffusion_models"], name)
    tiny_qwen.tiny_qwen_transformer(seed=9).save_pretrained(os.path.join(root, "transformer"),
                                                            safe_serialization=True, max_shard_size="200KB")
    if scheduler is not None:
        os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
        with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **scheduler}, f)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DCQwenImageEditPipeline"}, f)
    return root


def _sampled_sigmas(comfyui, name: str, steps: int = STEPS) -> torch.Tensor:
    """The sigmas a core sampler gets on the loaded MODEL (core 'simple' scheduler, the pack's wrappers)."""
    import comfy.sample
    import comfy.samplers

    model = comfyui.runtime.node_classes["DCGenQwenEditModelLoader"]().load(name, "fp32")[0]
    got = []

    def record(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        got.append(sigmas.detach().to("cpu", torch.float64))
        return x

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    latent = torch.zeros(1, 32, *GRID)
    cond = [[torch.randn(1, 4, tiny_qwen.TEXT_DIM, generator=torch.Generator().manual_seed(0)), {}]]
    comfy.sample.sample_custom(model, torch.zeros_like(latent), 3.5, comfy.samplers.KSAMPLER(record), sigmas, cond,
                               cond, latent, seed=0)
    assert len(got) == 1
    return got[0]


def _diffusers_sigmas(scheduler_folder: str, steps: int = STEPS) -> torch.Tensor:
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_folder)
    c = sched.config
    m = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (c.get("max_image_seq_len", 4096)
                                                                 - c.get("base_image_seq_len", 256))
    mu = GRID[0] * GRID[1] * m + c.get("base_shift", 0.5) - m * c.get("base_image_seq_len", 256)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.double()


@pytest.mark.parametrize("case", list(CONFIGS))
def test_scheduler_config_sets_the_schedule(comfyui, case):
    name = f"qwen-edit-tiny-scheduler-{case}"
    root = _release(comfyui, name, CONFIGS[case])
    ours = _sampled_sigmas(comfyui, name)
    expected = _diffusers_sigmas(os.path.join(root, "scheduler"))
    assert ours.shape == expected.shape == (STEPS + 1,)
    diff = (ours - expected).abs().max().item()
    print(f"Qwen schedule {case}: max |pack - diffusers| {diff:.2e}")
    assert diff < SIGMA_TOL, (ours, expected)
    # the test can fail: the shipped Qwen-Image-Edit values give another schedule for this latent
    default_root = os.path.join(comfyui.dirs["diffusion_models"], "qwen-edit-tiny-scheduler-default-oracle")
    os.makedirs(os.path.join(default_root, "scheduler"), exist_ok=True)
    with open(os.path.join(default_root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **tiny_qwen.SCHEDULER_CONFIG}, f)
    assert (ours - _diffusers_sigmas(os.path.join(default_root, "scheduler"))).abs().max().item() > 1e-3


def test_nested_release_reads_its_scheduler(comfyui):
    root = os.path.join(comfyui.dirs["diffusion_models"], "qwen-edit-tiny-nested-scheduler")
    folder = tiny_qwen.save_release(tiny_qwen.tiny_qwen_transformer(seed=9), tiny.tiny_dcae(), root, nested=True)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path, "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **CONFIGS["dynamic-exponential"]}, f)
    ours = _sampled_sigmas(comfyui, "qwen-edit-tiny-nested-scheduler")
    assert (ours - _diffusers_sigmas(os.path.dirname(path))).abs().max().item() < SIGMA_TOL


def test_without_scheduler_config_the_qwen_image_edit_values(comfyui):
    root = _release(comfyui, "qwen-edit-tiny-no-scheduler", None)
    ours = _sampled_sigmas(comfyui, "qwen-edit-tiny-no-scheduler")
    oracle = os.path.join(root + "-oracle", "scheduler")
    os.makedirs(oracle, exist_ok=True)
    with open(os.path.join(oracle, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **tiny_qwen.SCHEDULER_CONFIG}, f)
    assert (ours - _diffusers_sigmas(oracle)).abs().max().item() < SIGMA_TOL


@pytest.mark.parametrize("bad,message", [
    ({"_class_name": "DPMSolverMultistepScheduler"}, "expected a FlowMatchEulerDiscreteScheduler config"),
    ({"use_karras_sigmas": True}, "expected use_karras_sigmas false"),
    ({"max_shift": "high"}, "expected max_shift to be a number, found 'high'"),
    ({"time_shift_type": "cosine"}, "expected time_shift_type 'exponential' or 'linear', found 'cosine'"),
])
def test_bad_scheduler_config(comfyui, bad, message):
    name = f"qwen-edit-tiny-bad-scheduler-{next(iter(bad))}"
    root = _release(comfyui, name, {**tiny_qwen.SCHEDULER_CONFIG, **bad})
    with pytest.raises(Exception) as e:  # the node's DCGenError (the pack's module copy)
        comfyui.runtime.node_classes["DCGenQwenEditModelLoader"]().load(name, "default")
    assert f"{os.path.join(root, 'scheduler', 'scheduler_config.json')}: {message}" in str(e.value), str(e.value)


def test_loader_lists_a_release_once(comfyui):
    d = comfyui.dirs["diffusion_models"]
    transformer, vae = tiny_qwen.tiny_qwen_transformer(seed=9), tiny.tiny_dcae()
    tiny_qwen.save_release(transformer, vae, os.path.join(d, "qwen-edit-tiny-listed-nested"), nested=True)
    tiny_qwen.save_release(transformer, vae, os.path.join(d, "qwen-edit-tiny-listed-flat"), nested=False)
    shards = os.listdir(os.path.join(d, "qwen-edit-tiny-listed-nested", tiny_qwen.NESTED, "transformer"))
    assert sum(n.startswith("diffusion_pytorch_model-0") for n in shards) > 1  # the test has shards to hide
    listed = comfyui.runtime.node_classes["DCGenQwenEditModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    for top in ("qwen-edit-tiny-listed-nested", "qwen-edit-tiny-listed-flat"):
        assert listed.count(top) == 1, listed
        assert not [n for n in listed if n.startswith(top + "/")], listed
    assert not [n for n in listed if "diffusion_pytorch_model-0" in n], listed
    # the other loaders list the nested transformer as a folder, not shard by shard
    flux = comfyui.runtime.node_classes["DCGenModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    nested = f"qwen-edit-tiny-listed-nested/{tiny_qwen.NESTED.replace(os.sep, '/')}/transformer"
    assert nested in flux and not [n for n in flux if "diffusion_pytorch_model-0" in n], flux
