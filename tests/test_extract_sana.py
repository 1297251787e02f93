"""python -m dcgen_core.extract on SANA: a full DC-Gen-SANA (tiny SANA + 128-channel embedding + LoRA, with a
changed bias, depthwise conv, scale_shift_table and caption linear on top) and its base -> embedding + LoRA that,
through the pack's SANA nodes (and core's LoRA loader), patch the base into exactly FULL's weights (atol 1e-5, fp32)
and FULL's forward."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import tiny
from dcgen_core.shared.errors import DCGenError
from dcgen_core.tools.extract import extract

CHANGED = {"transformer_blocks.1.ff.conv_depth.weight": "diff",
           "transformer_blocks.0.attn1.to_out.0.bias": "diff_b", "time_embed.linear.bias": "diff_b",
           "caption_projection.linear_1.weight": "lora"}


@pytest.fixture(scope="module")
def sana_files(comfyui, tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-sana")
    base = tiny.tiny_sana()
    base_dir = os.path.join(comfyui.dirs["diffusion_models"], "sana-extract-base")
    base.save_pretrained(base_dir, safe_serialization=True)
    full = tiny.write_dcgen_sana(base, str(root / "true-emb.safetensors"), str(root / "true-lora.safetensors"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        params = dict(full.named_parameters())
        for k in CHANGED:
            params[k].add_(0.05 * torch.randn(params[k].shape, generator=g))
    full.save_pretrained(str(root / "DC-Gen-SANA-tiny"), safe_serialization=True)
    return base_dir, str(root / "DC-Gen-SANA-tiny"), full


def test_sana_extract_patches_the_base_into_full(comfyui, sana_files, caplog):
    import comfy.lora

    base_dir, full_dir, full = sana_files
    lora_name, emb_name = "sana-extracted-lora.safetensors", "sana-extracted-embedding.safetensors"
    lines = []
    report = extract(full_dir, base_dir, os.path.join(comfyui.dirs["loras"], lora_name), 64, overwrite=True,
                     embedding_out=os.path.join(comfyui.dirs["dcgen_embeddings"], emb_name), log=lines.append)
    assert report["architecture"] == "SANA" and report["latent_channels"] == 128
    assert report["total_relative_error"] <= 1e-5
    kinds = {e["module"]: e["kind"] for e in report["layers"]}
    for k, kind in CHANGED.items():
        assert kinds[k if kind != "lora" else k[: -len(".weight")]] == kind, k
    for t in tiny.SANA_LORA_TARGETS:  # linears and 1x1 convs of the true LoRA
        assert kinds[f"transformer_blocks.0.{t}"] == "lora"
    assert any("exact SVD's >=" in x for x in lines) and any("total relative error" in x for x in lines)
    emb = load_file(report["embedding"])
    want = full.state_dict()
    assert set(emb) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "proj_out.weight", "proj_out.bias"}
    assert all(torch.equal(emb[k], want[k]) for k in emb)

    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenSanaModelLoader"]().load("sana-extract-base", "default")[0]
    embedded = nodes["DCGenApplyAlignedEmbedding"]().apply(base, emb_name)[0]
    models = {"pack": nodes["DCGenLoraLoader"]().apply(embedded, lora_name, 1.0)[0]}
    with caplog.at_level("WARNING"):
        models["core"] = nodes["LoraLoaderModelOnly"]().load_lora_model_only(embedded, lora_name, 1.0)[0]
    assert "not loaded" not in caplog.text  # core reads every entry (.alpha, .diff, .diff_b included)
    for loader, model in models.items():
        checked = 0
        for k, w in model.model_state_dict().items():
            if not k.startswith("diffusion_model."):
                continue
            name = k[len("diffusion_model."):]
            if name not in want or name in emb:
                continue  # the base's own embedder/head: the embedding replaces them (checked by the forward)
            got = comfy.lora.calculate_weight(model.patches[k], w.detach().clone().float(), k) \
                if k in model.patches else w.float()
            assert torch.allclose(got.reshape(want[name].shape), want[name], atol=1e-5), (loader, name)
            checked += 1
        assert checked == len(want) - len(emb), (loader, checked, len(want))

    # the patched model's forward is FULL's (diffusers), on DC-AE-1.5 f64c128 latents
    model = models["pack"]
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 128, 4, 3, generator=g)
    ctx = torch.randn(1, 5, tiny.SANA_CAPTION, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        ref = full(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=torch.tensor([500.0])).sample
        ours = model.model.diffusion_model(x, torch.tensor([500.0]), ctx, attention_mask=mask)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5


def test_sana_scale_shift_table_is_named_and_counted(sana_files, tmp_path):
    """A changed scale_shift_table (a parameter of a block, which ComfyUI never patches) is left out, named, and its
    whole difference counted in the printed error."""
    base_dir, _, full = sana_files
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    sd["transformer_blocks.0.scale_shift_table"] += 0.05
    from diffusers import SanaTransformer2DModel

    other = SanaTransformer2DModel.from_config(full.config)
    other.load_state_dict(sd)
    other.save_pretrained(str(tmp_path / "full-sst"), safe_serialization=True)
    lines = []
    report = extract(str(tmp_path / "full-sst"), base_dir, str(tmp_path / "sst-lora.safetensors"), 64,
                     log=lines.append)
    assert [s["module"] for s in report["skipped"]] == ["transformer_blocks.0.scale_shift_table"]
    assert any("left out transformer_blocks.0.scale_shift_table" in x for x in lines)
    assert report["total_relative_error"] > 1e-3


def test_sana_extract_refuses_a_base_as_full(sana_files, tmp_path):
    base_dir, _, _ = sana_files
    with pytest.raises(DCGenError, match="nothing to extract"):
        extract(base_dir, base_dir + "/", str(tmp_path / "x-lora.safetensors"), 4, log=None)
