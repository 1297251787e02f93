"""Mistakes between SANA and FLUX: a FLUX embedding on SANA, a SANA LoRA on FLUX (and the reverse), a FLUX text
encoder's conditioning on SANA, a SANA sampled without its negative. Each is a clear error naming what was
expected and found, and the incoming model is unchanged."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiny

from dcgen_core.shared.errors import DCGenError


@pytest.fixture(scope="module")
def sana_model(comfyui):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    folder = os.path.join(comfyui.dirs["diffusion_models"], "sana-tiny-bad-input")
    model = tiny.tiny_sana()
    model.save_pretrained(folder, safe_serialization=True)
    return load_sana_transformer(folder), model


def _snapshot(m):
    return json.dumps(m.model_options, default=str, sort_keys=True), dict(m.object_patches), dict(m.patches)


def test_flux_embedding_on_sana(comfyui, comfy_models, sana_model):
    from dcgen_core.architectures import apply_aligned_embedding
    from dcgen_core.shared.embedding import load_aligned_embedding

    m, _ = sana_model
    before = _snapshot(m)
    path = os.path.join(comfyui.dirs["dcgen_embeddings"], comfy_models.embedding)
    with pytest.raises(DCGenError) as e:
        apply_aligned_embedding(m, load_aligned_embedding(path))
    msg = str(e.value)
    assert path in msg and "hidden size 16" in msg and "found 32" in msg, msg
    assert _snapshot(m) == before


def test_sana_lora_on_flux_and_flux_lora_on_sana(comfyui, comfy_models, sana_model, tmp_path):
    from dcgen_core.flux.comfy_model import load_flux_transformer
    from dcgen_core.architectures import apply_lora

    m, sana = sana_model
    sana_lora, flux_lora = str(tmp_path / "sana-lora.safetensors"), os.path.join(comfyui.dirs["loras"],
                                                                                  comfy_models.lora)
    tiny.write_dcgen_sana(sana, str(tmp_path / "emb.safetensors"), sana_lora)
    flux = load_flux_transformer(os.path.join(comfyui.dirs["diffusion_models"], comfy_models.base))
    for model, lora, expected in ((flux, sana_lora, "FLUX transformer"), (m, flux_lora, "SANA transformer")):
        before = _snapshot(model)
        with pytest.raises(DCGenError) as e:
            apply_lora(model, lora)
        msg = str(e.value)
        assert lora in msg and f"expected a LoRA for this {expected}" in msg and "another model" in msg, msg
        assert _snapshot(model) == before


def _sample(comfyui, model, cond, negative=True):
    from dcgen_core.shared.sampling import sample

    positive = [[cond, {}]]
    return sample(model, positive, 64, 64, 1, 4.5, 0, "euler", "simple",
                  negative=[[torch.zeros_like(cond), {}]] if negative else None)


def test_flux_text_encoder_on_sana(comfyui, sana_model):
    m, _ = sana_model
    with pytest.raises(DCGenError) as e:
        _sample(comfyui, m, torch.randn(1, 7, 4096))
    msg = str(e.value)
    assert "expected text embeddings of width 24" in msg and "found 4096 (T5-XXL)" in msg, msg
    assert "DC-Gen Load Gemma-2" in msg


def test_sana_sampler_without_negative(comfyui, sana_model):
    m, _ = sana_model
    with pytest.raises(DCGenError, match="negative: expected the negative prompt for a SANA model"):
        _sample(comfyui, m, torch.randn(1, 7, tiny.SANA_CAPTION), negative=False)
    out, _ = _sample(comfyui, m, torch.randn(1, 7, tiny.SANA_CAPTION))
    assert out["samples"].shape == (1, 32, 2, 2)


def test_not_a_sana_file(comfyui, comfy_models):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = os.path.join(comfyui.dirs["diffusion_models"], comfy_models.base)
    with pytest.raises(DCGenError) as e:
        load_sana_transformer(path)
    assert path in str(e.value) and "expected a SANA transformer" in str(e.value)
