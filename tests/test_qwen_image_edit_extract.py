"""python -m dcgen_core.extract on DC-Gen-Qwen-Image-Edit: FULL (the Hub's nested release folder) and its base
Qwen-Image-Edit give an aligned embedding and a LoRA with which base + DC-Gen Add Embedding + DC-Gen Load LoRA
(and core LoraLoaderModelOnly) is FULL: every weight of the patched base within 1e-5 of FULL's (fp32, the LoRA at a
rank that holds every difference exactly; the RMSNorm scales and biases that differ carried whole)."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_qwen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"total relative error ([0-9.e+-]+) \(exact SVD's >= ([0-9.e+-]+)\)")
LAYER = re.compile(r"^  (\S+) \[\d+, \d+\] rank 2: relative error ([0-9.e+-]+) \(randomized SVD; exact SVD's >= "
                   r"([0-9.e+-]+)\)", re.M)


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
    # like FLUX and SANA: the achieved error and the bound on the exact SVD's, per layer and in total
    assert "(exact SVD; exact SVD's >= " in out.stdout, out.stdout
    total = SUMMARY.search(out.stdout)
    assert total and float(total.group(2)) <= float(total.group(1)) <= 1e-5, out.stdout
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


def test_extract_prints_the_exact_svd_bound(tmp_path, capsys):
    """The CLI at a truncated rank (randomized SVD) prints, per low-rank layer and in total, the achieved error and a
    lower bound on the exact SVD's: bound <= the Eckart-Young error (from torch.linalg.svdvals of FULL - BASE) <=
    achieved, within the printed 4 significant digits (rel 1e-3)."""
    from dcgen_core.tools.extract import main

    full = tiny_qwen.tiny_qwen_transformer()
    base = str(tmp_path / "base")
    tiny_qwen.save_base_and_adapters(full, base, str(tmp_path / "emb.safetensors"), str(tmp_path / "true.safetensors"))
    full.save_pretrained(str(tmp_path / "full"), safe_serialization=True)
    assert main([str(tmp_path / "full"), base, str(tmp_path / "out-lora.safetensors"), "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    layers = LAYER.findall(printed)
    assert len(layers) == 12, printed  # the rank-4 LoRA's 6 modules in each of the 2 blocks
    want, base_sd = full.state_dict(), load_file(os.path.join(base, "diffusion_pytorch_model.safetensors"))
    for module, achieved, bound in layers:
        s = torch.linalg.svdvals((want[f"{module}.weight"] - base_sd[f"{module}.weight"]).double())
        exact = (s[2:].norm() / s.norm()).item()
        assert float(bound) <= exact * (1 + 1e-3) and exact <= float(achieved) * (1 + 1e-3), (module, printed)
    total = SUMMARY.search(printed)
    assert total and 0.01 < float(total.group(2)) <= float(total.group(1)), printed
