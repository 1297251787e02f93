"""python -m dcgen_core.extract on DC-Gen-Qwen-Image-Edit: FULL (the Hub's nested release folder) and its base
Qwen-Image-Edit give an aligned embedding and a LoRA with which base + DC-Gen Add Embedding + DC-Gen Load LoRA
(and core LoraLoaderModelOnly) is FULL: every weight of the patched base within 1e-5 of FULL's (fp32, the LoRA at a
rank that holds every difference exactly; the RMSNorm scales and biases that differ carried whole)."""

import os
import subprocess
import sys

import pytest
import torch

import tiny_qwen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("lora_loader", ["DCGenLoraLoader", "LoraLoaderModelOnly"])
def test_extracted_embedding_and_lora_rebuild_full(comfyui, lora_loader):
    transformer, vae = tiny_qwen.install_models(comfyui)[:2]
    d = comfyui.dirs
    base_folder = os.path.join(d["diffusion_models"], "qwen-image-edit-base-tiny")
    with torch.no_grad():  # FULL also changes a norm scale and a bias: carried as .diff / .diff_b
        full = tiny_qwen.tiny_qwen_transformer()
        full.transformer_blocks[0].attn.norm_q.weight += 0.05
        full.transformer_blocks[1].img_mod[1].bias += 0.02
    full_root = os.path.join(d["diffusion_models"], f"DC-Qwen-Image-Edit-tiny-extract-{lora_loader}")
    tiny_qwen.save_release(full, vae, full_root)
    lora_name = f"qwen-edit-extracted-{lora_loader}.safetensors"
    emb_name = f"qwen-edit-extracted-{lora_loader}-embedding.safetensors"
    out = subprocess.run([sys.executable, "-m", "dcgen_core.extract", full_root, base_folder,
                          os.path.join(d["loras"], lora_name), "--rank", "64", "--svd", "exact",
                          "--embedding-out", os.path.join(d["dcgen_embeddings"], emb_name)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Qwen-Image:" in out.stdout and "stored whole" in out.stdout, out.stdout
    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenQwenEditModelLoader"]().load("qwen-image-edit-base-tiny", "default")[0]
    assert "dcgen" not in base.model_options  # a base Qwen-Image: no DC-AE latent space until the embedding
    m = nodes["DCGenApplyAlignedEmbedding"]().apply(base, emb_name)[0]
    m = (nodes[lora_loader]().apply(m, lora_name, 1.0) if lora_loader == "DCGenLoraLoader"
         else nodes[lora_loader]().load_lora_model_only(m, lora_name, 1.0))[0]
    assert m.model_options["dcgen"]["family"] == "DC-Gen-Qwen-Image-Edit"
    m.patch_model()
    try:
        got = dict(m.model.diffusion_model.named_parameters())
        got["img_in.weight"] = m.get_model_object("diffusion_model.img_in").weight
        got["proj_out.weight"] = m.get_model_object("diffusion_model.proj_out").weight
        want = full.state_dict()
        worst = max((got[k].float() - want[k]).abs().max().item() for k in want if k in got)
        assert set(want) <= set(got) | {"img_in.bias", "proj_out.bias"}
        assert worst <= 1e-5, worst
    finally:
        m.unpatch_model()
