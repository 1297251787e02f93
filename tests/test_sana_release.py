"""DC-Gen Load SANA and what a release tells beside the weights.

Flow shift: the release's ``scheduler/scheduler_config.json`` (diffusers pipeline layout <pipeline>/transformer +
<pipeline>/scheduler), else diffusers' ``scripts/convert_sana_to_diffusers.py`` rule by image size (6.0 at 4096 px,
3.0 below; sample_size = image size / 32). The model's sampling (KSampler, the DC-Gen Sampler) follows it; the
DC-Gen-SANA route keeps the base model's shift.

Resolution: a diffusers-layout SANA file without config.json cannot tell 1K from 2K / 4K (diffusers does not save
the position-embedding buffer); it is refused when its name or a 4K scheduler shift says 2K / 4K, else loaded as
1K with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import tiny

diffusers = pytest.importorskip("diffusers")

from dcgen_core.shared.errors import DCGenError  # noqa: E402
from test_sana_original_pe import ARCH, original_file  # noqa: E402

SIGMA_TOL = 1e-6


def _tiny(**overrides):
    return tiny._randomize(diffusers.SanaTransformer2DModel(**{**tiny.SANA_TINY, **overrides}).eval(), seed=4,
                           scale=0.15)


def _pipeline(comfyui, name, scheduler=None, **overrides) -> str:
    """A tiny SANA as a diffusers pipeline folder in models/diffusion_models; the widget name of its transformer."""
    root = os.path.join(comfyui.dirs["diffusion_models"], name)
    _tiny(**overrides).save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
    if scheduler is not None:
        scheduler.save_config(os.path.join(root, "scheduler"))
    return f"{name}/transformer"


def _load(comfyui, name):
    return comfyui.runtime.node_classes["DCGenSanaModelLoader"]().load(name, "fp32")[0]


def _sana_dpm(shift):
    return diffusers.DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True,
                                                 prediction_type="flow_prediction")


def _simple_sigmas(model, steps):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).double()


def _shifted(shift, steps):
    t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    return torch.cat([shift * t / (1 + (shift - 1) * t), torch.zeros(1, dtype=torch.float64)])


def test_scheduler_config_sets_the_shift(comfyui, caplog):
    from dcgen_core.shared.schedules import dpm_flow_sigmas

    caplog.set_level(logging.INFO)
    name = _pipeline(comfyui, "sana-tiny-pipeline-shift6", _sana_dpm(6.0))
    model = _load(comfyui, name)
    assert model.get_model_object("model_sampling").shift == 6.0
    config = os.path.join(comfyui.dirs["diffusion_models"], "sana-tiny-pipeline-shift6", "scheduler",
                          "scheduler_config.json")
    assert model.model_options["dcgen"]["shift"] == f"flow shift 6.0 (flow_shift of {config})"
    assert f"flow shift 6.0 (flow_shift of {config})" in caplog.text
    # KSampler / the DC-Gen Sampler: the model's sigma table, shift 6 (1000-entry table: exact at 4 steps)
    sigmas = _simple_sigmas(model, 4)
    assert (sigmas - _shifted(6.0, 4)).abs().max().item() < SIGMA_TOL
    assert (sigmas - _shifted(3.0, 4)).abs().max().item() > 0.05
    # the official DPM-Solver++ route at the model's shift is the shipped scheduler's schedule
    shipped = diffusers.DPMSolverMultistepScheduler.from_pretrained(
        os.path.join(comfyui.dirs["diffusion_models"], "sana-tiny-pipeline-shift6"), subfolder="scheduler")
    shipped.set_timesteps(20)
    ours = dpm_flow_sigmas(20, model.get_model_object("model_sampling").shift)
    assert (ours.double() - shipped.sigmas.double()).abs().max().item() < SIGMA_TOL


def test_flow_match_euler_config_and_bad_values(comfyui):
    name = _pipeline(comfyui, "sana-tiny-pipeline-euler", diffusers.FlowMatchEulerDiscreteScheduler(shift=6.0))
    assert _load(comfyui, name).get_model_object("model_sampling").shift == 6.0
    name = _pipeline(comfyui, "sana-tiny-pipeline-bad-shift", _sana_dpm(3.0))
    config = os.path.join(comfyui.dirs["diffusion_models"], "sana-tiny-pipeline-bad-shift", "scheduler",
                          "scheduler_config.json")
    with open(config) as f:
        data = json.load(f)
    with open(config, "w") as f:
        json.dump({**data, "flow_shift": "six"}, f)
    with pytest.raises(Exception, match=re.escape(f"{config}: expected flow_shift to be a positive number, found "
                                                  "'six'")):  # the node's DCGenError (the pack's module copy)
        _load(comfyui, name)


@pytest.mark.parametrize("sample_size,interpolation_scale,shift", [(128, 2.0, 6.0), (64, 1.0, 3.0), (32, None, 3.0)])
def test_default_shift_by_sample_size(comfyui, caplog, sample_size, interpolation_scale, shift):
    """No scheduler config: the converter's choice for the image size the config.json gives."""
    caplog.set_level(logging.INFO)
    name = _pipeline(comfyui, f"sana-tiny-no-scheduler-{sample_size}", sample_size=sample_size,
                     interpolation_scale=interpolation_scale)
    model = _load(comfyui, name)
    assert model.get_model_object("model_sampling").shift == shift
    assert model.model.diffusion_model.config.sample_size == sample_size
    why = f"sample size {sample_size} = {sample_size * 32} px, diffusers' SANA converter uses {shift}"
    assert why in model.model_options["dcgen"]["shift"] and why in caplog.text
    assert (_simple_sigmas(model, 4) - _shifted(shift, 4)).abs().max().item() < SIGMA_TOL


@pytest.mark.parametrize("image_size,shift", [(4096, 6.0), (1024, 3.0)])
def test_original_file_shift_by_its_pos_embed(comfyui, tmp_path, image_size, shift):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    model = load_sana_transformer(original_file(str(tmp_path / "original"), image_size), "fp32")
    assert model.get_model_object("model_sampling").shift == shift


def test_dcgen_route_keeps_the_base_shift(comfyui, tmp_path):
    name = _pipeline(comfyui, "sana-tiny-pipeline-dcgen-shift6", _sana_dpm(6.0))
    base = _load(comfyui, name)
    emb = "dcgen-sana-tiny-shift6-embedding.safetensors"
    tiny.write_dcgen_sana(_tiny(), os.path.join(comfyui.dirs["dcgen_embeddings"], emb),
                          str(tmp_path / "lora.safetensors"))
    dcgen = comfyui.runtime.node_classes["DCGenApplyAlignedEmbedding"]().apply(base, emb)[0]
    assert dcgen.model_options["dcgen"]["latent_channels"] == 128
    assert dcgen.get_model_object("model_sampling").shift == 6.0
    assert dcgen.model_options["dcgen"]["shift"] == base.model_options["dcgen"]["shift"]
    assert dcgen.model_options["dcgen"]["shift"].startswith("flow shift 6.0 (flow_shift of ")


# --- a diffusers-layout file without config.json -------------------------------------------------------------------

def _diffusers_file(path: str, config: dict | None = None) -> str:
    """SANA's own head layout (no config.json needed for the architecture), diffusers keys, one file."""
    model = tiny._randomize(diffusers.SanaTransformer2DModel(**ARCH, **(config or {})).eval(), seed=6, scale=0.15)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    if config is not None:
        with open(os.path.join(os.path.dirname(path), "config.json"), "w") as f:
            json.dump(dict(model.config), f)
    return path


@pytest.mark.parametrize("file_name", ["Sana_1600M_4Kpx_BF16.safetensors", "sana-2k.safetensors",
                                       "sana_2048px.safetensors"])
def test_named_resolution_without_config_is_refused(comfyui, tmp_path, file_name):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = _diffusers_file(str(tmp_path / "named" / file_name))
    with pytest.raises(DCGenError) as e:
        load_sana_transformer(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: expected the transformer's config.json (sample_size, interpolation_scale)"), msg
    assert "found none" in msg and "says" in msg and "load the diffusers folder" in msg, msg


def test_folder_name_or_4k_scheduler_without_config_is_refused(comfyui, tmp_path):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = _diffusers_file(str(tmp_path / "Sana_1600M_4Kpx_BF16_diffusers" / "transformer" / "weights.safetensors"))
    with pytest.raises(DCGenError, match="the name 'Sana_1600M_4Kpx_BF16_diffusers' says 4K"):
        load_sana_transformer(path)
    path = _diffusers_file(str(tmp_path / "release" / "transformer" / "weights.safetensors"))
    _sana_dpm(6.0).save_config(str(tmp_path / "release" / "scheduler"))
    with pytest.raises(DCGenError, match="scheduler config's flow shift 6.0 is the 4K models' one"):
        load_sana_transformer(path)


def test_unnamed_file_without_config_loads_as_1k_with_a_warning(comfyui, tmp_path, caplog):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    caplog.set_level(logging.INFO)
    path = _diffusers_file(str(tmp_path / "plain" / "sana_tiny.safetensors"))
    model = load_sana_transformer(path)
    cfg = model.model.diffusion_model.config
    assert (cfg.sample_size, cfg.interpolation_scale) == (32, None)
    assert model.get_model_object("model_sampling").shift == 3.0
    assert f"{path}: no config.json beside this diffusers-layout SANA; loaded as a 512 px / 1K model" in caplog.text


def test_named_4k_file_with_its_config_loads_with_position_embedding(comfyui, tmp_path):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = _diffusers_file(str(tmp_path / "with-config" / "Sana_1600M_4Kpx_BF16.safetensors"),
                           {"sample_size": 128, "interpolation_scale": 2.0})
    model = load_sana_transformer(path, "fp32")
    cfg = model.model.diffusion_model.config
    assert (cfg.sample_size, cfg.interpolation_scale) == (128, 2.0)
    assert model.get_model_object("model_sampling").shift == 6.0


def test_training_refuses_the_same_unknown_resolution(tmp_path):
    """`python -m dcgen_core.train` reads a base SANA through the same release reader: a 4K file without its
    config.json is refused there too (it would train a 1K model without its position embedding)."""
    from dcgen_core.tools.train.sana_model import load_base_transformer

    path = _diffusers_file(str(tmp_path / "named" / "Sana_1600M_4Kpx_BF16.safetensors"))
    with pytest.raises(DCGenError, match="expected the transformer's config.json"):
        load_base_transformer(path)


@pytest.mark.parametrize("weight_dtype,fast", [("fp8_e4m3fn_fast", True), ("fp8_e4m3fn", False)])
def test_fp8_fast_turns_on_cores_fp8_matmuls(comfyui, tmp_path, weight_dtype, fast):
    """The weight_dtype choice "fp8_e4m3fn_fast" sets core's fp8 optimization as core's loaders (and the pack's FLUX,
    Qwen-Image and Wan loaders) do; SANA's loader used to drop it."""
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = _diffusers_file(str(tmp_path / "fp8" / "sana.safetensors"), {})
    model = load_sana_transformer(path, weight_dtype)
    assert model.model.diffusion_model.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.model.model_config.optimizations.get("fp8", False) is fast
