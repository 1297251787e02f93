"""The paper's 4-bit route: a nunchaku SVDQuant FLUX file + the DC-Gen aligned embedding + the DC-Gen LoRA.

The files are written in nunchaku's real layout by tests/svdquant_pack.py (its packers reproduce nunchaku's own
packing bit-exactly), from a small FLUX whose linears meet nunchaku's 128-multiple tiles (hidden 128: 2 heads x
64). Without nunchaku (here) the layers run in pure torch, weight-only. Tolerance: images of the whole route through
ComfyUI's executor vs the authors' diffusers pipeline on the dense equivalent of the file + LoRA + embedding,
1e-3 max abs (fp32 CPU), as the bf16 parity test.
"""

from __future__ import annotations

import os

import pytest
import torch

import tiny
from svdquant_pack import write_nunchaku_flux
from test_parity_e2e import _ksampler_prompt

from dcgen_core.errors import DCGenError

SVDQ_FLUX = dict(attention_head_dim=64, num_attention_heads=2, axes_dims_rope=(8, 28, 28))
SEED, STEPS, GUIDANCE = 42, 4, 3.5


@pytest.fixture(scope="module")
def svdq(comfyui):
    """A DC-Gen pair at hidden 128 (base, embedding, LoRA) and nunchaku int4 / fp4 files of its base."""
    from types import SimpleNamespace

    dcgen = tiny.TinyDCGen(seed=6, flux_config=SVDQ_FLUX)
    d = comfyui.dirs
    dense = {}
    for kind in ("int4", "fp4"):
        name = f"svdq-{kind}_r16-flux-tiny.safetensors"
        dense[kind] = write_nunchaku_flux(os.path.join(d["diffusion_models"], name), dcgen.base, kind=kind, rank=16)
    dcgen.save_embedding(os.path.join(d["dcgen_embeddings"], "dcgen-svdq-tiny-embedding.safetensors"))
    dcgen.save_lora(os.path.join(d["loras"], "dcgen-svdq-tiny-lora.safetensors"))
    return SimpleNamespace(dcgen=dcgen, dense=dense, file=lambda kind: f"svdq-{kind}_r16-flux-tiny.safetensors",
                           path=lambda kind: os.path.join(d["diffusion_models"], f"svdq-{kind}_r16-flux-tiny.safetensors"),
                           embedding="dcgen-svdq-tiny-embedding.safetensors", lora="dcgen-svdq-tiny-lora.safetensors")


def _route(svdq, kind, backend="auto", lora=True):
    nodes = {
        "base": {"class_type": "DCGenNVFP4ModelLoader", "inputs": {"unet_name": svdq.file(kind),
                                                                 "svdquant_backend": backend}},
        "embed": {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
            "model": ["base", 0], "embedding_name": svdq.embedding, "vae": ["vae", 0]}},
    }
    if not lora:
        return nodes, ["embed", 0]
    nodes["lora"] = {"class_type": "DCGenLoraLoader", "inputs": {
        "model": ["embed", 0], "lora_name": svdq.lora, "strength_model": 1.0}}
    return nodes, ["lora", 0]


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_svdquant_base_plus_embedding_and_lora_matches_diffusers(comfyui, comfy_models, svdq, tiny_vae, kind):
    key = f"svdq-{kind}"
    cond, pooled = tiny.prompt_embeddings(seed=9)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    comfyui.runtime.executor.reset()
    nodes, ref = _route(svdq, kind)
    width, height = 256, 192
    comfyui.runtime.run(_ksampler_prompt(nodes, ref, key, width, height, comfy_models))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    reference = svdq.dcgen.merge(svdq.dense[kind])
    expected, _ = tiny.reference_images(reference, tiny_vae, width, height, SEED, STEPS, GUIDANCE, cond, pooled)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-3
    # the 4-bit file differs from the bf16 base it was made from: the comparison is with the file's own weights
    unquantized, _ = tiny.reference_images(svdq.dcgen.dcgen, tiny_vae, width, height, SEED, STEPS, GUIDANCE, cond,
                                           pooled)
    print(f"SVDQuant {kind} (rank 16) vs unquantized tiny DC-Gen: image max abs "
          f"{(ours - unquantized).abs().max().item():.4f}")


def test_svdquant_model_holds_nunchakus_packed_tensors(comfyui, svdq):
    from dcgen_core.flux_svdquant import SVDQuantLinear, load_svdquant_flux

    m = load_svdquant_flux(svdq.path("int4"), backend="torch")
    dm = m.model.diffusion_model
    four_bit = {n for n, mod in dm.named_modules() if isinstance(mod, SVDQuantLinear)}
    assert four_bit == {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
                        "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                        "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin",
                        "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.0.linear2",
                        "single_blocks.0.modulation.lin", "single_blocks.1.linear1", "single_blocks.1.linear2",
                        "single_blocks.1.modulation.lin"}
    linear1 = dm.single_blocks[0].linear1
    assert (linear1.mode, linear1.out_features, linear1.in_features) == ("rows", 3 * 128 + 512, 128)
    linear2 = dm.single_blocks[0].linear2
    assert (linear2.mode, linear2.out_features, linear2.in_features) == ("cols", 128, 128 + 512)
    assert linear1.p0_qweight.dtype == torch.int8  # nunchaku's packed codes, not a dense weight
    import comfy.model_management as mm

    bf16_bytes = (3 * 128 + 512) * 128 * 2
    # 4-bit codes (0.25x) + group scales + the rank-16 branch (large at this width: 0.14x)
    assert mm.module_size(linear1) < 0.5 * bf16_bytes
    assert m.model_options["dcgen_quantization"]["format"] == "svdquant-int4"


def test_nunchaku_backend_without_nunchaku_is_a_clear_error(comfyui, svdq):
    from dcgen_core.flux_4bit import load_4bit_flux

    with pytest.raises(DCGenError) as e:
        load_4bit_flux(svdq.path("int4"), svdquant_backend="nunchaku")
    msg = str(e.value)
    assert "nunchaku" in msg and "expected" in msg and "found" in msg, msg


def test_svdquant_bad_input(comfyui, svdq, comfy_models, tmp_path):
    from dcgen_core.flux import load_flux_transformer
    from dcgen_core.flux_svdquant import load_svdquant_flux
    from dcgen_core.lora import apply_lora

    with pytest.raises(DCGenError, match="4-bit nunchaku SVDQuant file"):
        load_flux_transformer(svdq.path("int4"))
    base = load_svdquant_flux(svdq.path("int4"), backend="torch")
    # a LoRA for a FLUX of another width (the hidden-32 tiny DC-Gen's)
    with pytest.raises(DCGenError, match="another model"):
        apply_lora(base, os.path.join(comfyui.dirs["loras"], comfy_models.lora))
    assert not base.patches and "dcgen_low_rank" not in base.model_options.get("transformer_options", {})
    # an SVDQuant file of something that is not FLUX
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(svdq.path("int4"), "pt") as f:
        meta = f.metadata()
        tensors = {k.replace("transformer_blocks.0.qkv_proj", "layers.0.attn_qkv"): f.get_tensor(k)
                   for k in f.keys() if k.startswith("transformer_blocks.0.qkv_proj.")}
    other = str(tmp_path / "svdq-int4-not-flux.safetensors")
    save_file(tensors, other, metadata=meta)
    with pytest.raises(DCGenError) as e:
        load_svdquant_flux(other, backend="torch")
    assert other in str(e.value) and "layers.0.attn_qkv" in str(e.value)
