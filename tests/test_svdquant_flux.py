"""The paper's 4-bit route: a nunchaku SVDQuant FLUX file + the DC-Gen aligned embedding + the DC-Gen LoRA.

The files are written as deepcompressor's converter and nunchaku's merge_safetensors write them
(tests/svdquant_pack.py, checked against both tools' own code), for the public variants: int4 r32, fp4 r32 with
per-channel wcscales, fp4 r128 with per-tensor wtscale, FLUX.1-schnell (int4 r32, no guidance embedder), and
nunchaku's pre-v1 folder layout (the int4 file's tensors in transformer_blocks.safetensors +
unquantized_layers.safetensors, config.json). A small FLUX whose linears meet nunchaku's 128-multiple tiles
(hidden 128: 2 heads x 64). Without nunchaku (here) the layers run in pure torch, weight-only. Tolerance: images of
the whole route through ComfyUI's executor vs the authors' diffusers pipeline on the dense equivalent of the file +
LoRA + embedding, 1e-3 max abs (fp32 CPU), as the bf16 parity test.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import svdquant_pack as P
import tiny
from svdquant_pack import write_nunchaku_flux
from test_parity_e2e import _ksampler_prompt

from dcgen_core.shared.errors import DCGenError

SVDQ_FLUX = dict(attention_head_dim=64, num_attention_heads=2, axes_dims_rope=(8, 28, 28))
SEED, STEPS, GUIDANCE = 42, 4, 3.5
FOLDER = "svdq-int4_r32-flux-tiny"  # the pre-v1 folder layout of the int4_r32 file
ROUTES = [*P.CASES, "folder"]


@pytest.fixture(scope="module")
def svdq(comfyui):
    """DC-Gen pairs at hidden 128 (base, embedding, LoRA; one without guidance embedder for schnell) and nunchaku
    files of their bases, one per public variant, plus the int4 r32 one as a pre-v1 folder."""
    from types import SimpleNamespace

    d = comfyui.dirs
    dcgen = {True: tiny.TinyDCGen(seed=6, flux_config=SVDQ_FLUX),
             False: tiny.TinyDCGen(seed=6, flux_config=dict(SVDQ_FLUX, guidance_embeds=False))}
    dense, files = {}, {}
    for case, spec in P.CASES.items():
        files[case] = f"svdq-{case}-flux-tiny.safetensors"
        dense[case] = write_nunchaku_flux(os.path.join(d["diffusion_models"], files[case]),
                                          dcgen[spec["guidance"]].base, kind=spec["kind"], rank=spec["rank"],
                                          scales=spec["scales"])
    files["folder"] = FOLDER
    dense["folder"] = write_nunchaku_flux(os.path.join(d["diffusion_models"], FOLDER), dcgen[True].base,
                                          kind="int4", rank=32, layout="folder")
    for guidance, pair in dcgen.items():
        tag = "" if guidance else "-schnell"
        pair.save_embedding(os.path.join(d["dcgen_embeddings"], f"dcgen-svdq-tiny{tag}-embedding.safetensors"))
        pair.save_lora(os.path.join(d["loras"], f"dcgen-svdq-tiny{tag}-lora.safetensors"))

    def guidance_of(route):
        return route == "folder" or P.CASES[route]["guidance"]

    return SimpleNamespace(
        dcgen=lambda route: dcgen[guidance_of(route)], dense=dense, file=lambda route: files[route],
        path=lambda route: os.path.join(d["diffusion_models"], files[route]),
        embedding=lambda route: f"dcgen-svdq-tiny{'' if guidance_of(route) else '-schnell'}-embedding.safetensors",
        lora=lambda route: f"dcgen-svdq-tiny{'' if guidance_of(route) else '-schnell'}-lora.safetensors",
        guidance=guidance_of)


def _route(svdq, route, backend="auto", lora=True):
    nodes = {
        "base": {"class_type": "DCGenNVFP4ModelLoader", "inputs": {"unet_name": svdq.file(route),
                                                                 "svdquant_backend": backend}},
        "embed": {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
            "model": ["base", 0], "embedding_name": svdq.embedding(route), "vae": ["vae", 0]}},
    }
    if not lora:
        return nodes, ["embed", 0]
    nodes["lora"] = {"class_type": "DCGenLoraLoader", "inputs": {
        "model": ["embed", 0], "lora_name": svdq.lora(route), "strength_model": 1.0}}
    return nodes, ["lora", 0]


@pytest.mark.parametrize("route", ROUTES)
def test_svdquant_base_plus_embedding_and_lora_matches_diffusers(comfyui, comfy_models, svdq, tiny_vae, route):
    key = f"svdq-{route}"
    cond, pooled = tiny.prompt_embeddings(seed=9)
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    comfyui.runtime.executor.reset()
    nodes, ref = _route(svdq, route)
    width, height = 256, 192
    comfyui.runtime.run(_ksampler_prompt(nodes, ref, key, width, height, comfy_models))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    pair = svdq.dcgen(route)
    guidance = GUIDANCE if svdq.guidance(route) else None  # schnell: no guidance embedder, FluxGuidance is inert
    reference = pair.merge(svdq.dense[route])
    expected, _ = tiny.reference_images(reference, tiny_vae, width, height, SEED, STEPS, guidance, cond, pooled)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    err = (ours - expected).abs().max().item()
    unquantized, _ = tiny.reference_images(pair.dcgen, tiny_vae, width, height, SEED, STEPS, guidance, cond, pooled)
    print(f"SVDQuant {route}: image max abs vs the dense equivalent {err:.2e}; vs the unquantized tiny DC-Gen "
          f"{(ours - unquantized).abs().max().item():.4f} (the 4-bit file differs from the bf16 base it was made from)")
    assert err <= 1e-3


def test_svdquant_folder_is_offered_once_and_loads_through_the_4bit_loader_only(comfyui, svdq):
    """nunchaku's pre-v1 folder: listed once in diffusion_models (not its two halves); DC-Gen Load Model
    sends it to the NVFP4 loader, which loads it (no loop of loaders pointing at each other)."""
    from dcgen_core.flux.comfy_model import load_flux_transformer
    from dcgen_core.flux.four_bit import load_4bit_flux

    nodes = comfyui.pack.NODE_CLASS_MAPPINGS
    offered = nodes["DCGenNVFP4ModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    assert FOLDER in offered and not any(n.startswith(FOLDER + "/") for n in offered)
    assert FOLDER in nodes["DCGenModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    with pytest.raises(DCGenError, match=r"DC-Gen Load 4-bit"):
        load_flux_transformer(svdq.path("folder"))
    m = load_4bit_flux(svdq.path("folder"), svdquant_backend="torch")
    info = m.model_options["dcgen_quantization"]
    assert (info["format"], info["rank"], info["layers"]) == ("svdquant-int4", 32, 16)


def test_svdquant_folder_halves_and_gaps_name_the_fix(comfyui, svdq, tmp_path):
    """Without config.json the folder is not offered but its two files are: either one, in either loader, gives one
    message that names the folder and nunchaku's merge command."""
    from dcgen_core.flux.comfy_model import load_flux_transformer
    from dcgen_core.flux.four_bit import load_4bit_flux

    src = svdq.path("folder")
    half = tmp_path / "svdq-no-config"
    shutil.copytree(src, half)
    os.remove(half / "config.json")
    for name in ("transformer_blocks.safetensors", "unquantized_layers.safetensors"):
        for load in (lambda p: load_4bit_flux(p, svdquant_backend="torch"), load_flux_transformer):
            with pytest.raises(DCGenError) as e:
                load(str(half / name))
            msg = str(e.value)
            assert str(half / name) in msg and "pre-v1 folder" in msg and f"load the folder {half}" in msg, msg
            assert f"python -m nunchaku.merge_safetensors -i {half} -m NunchakuFluxTransformer2dModel" in msg, msg
            assert "DC-Gen Load Model" not in msg, msg  # no pointer to another loader
    # the folder itself, missing a file: the files it has and the one it lacks
    with pytest.raises(DCGenError, match=r"found comfy_config.json, transformer_blocks.safetensors, "
                                         r"unquantized_layers.safetensors; missing config.json"):
        load_4bit_flux(str(half), svdquant_backend="torch")
    gap = tmp_path / "svdq-no-unquantized"
    shutil.copytree(src, gap)
    os.remove(gap / "unquantized_layers.safetensors")
    with pytest.raises(DCGenError, match="missing unquantized_layers.safetensors"):
        load_4bit_flux(str(gap), svdquant_backend="torch")


def test_svdquant_model_holds_nunchakus_packed_tensors(comfyui, svdq):
    from dcgen_core.flux.svdquant import SVDQuantLinear, load_svdquant_flux

    m = load_svdquant_flux(svdq.path("int4_r32"), backend="torch")
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
    # 4-bit codes (0.25x) + group scales and vectors; the rank-32 branch comes on top (large at this width: 0.29x)
    low_rank = sum(b.numel() * b.element_size() for n, b in linear1.named_buffers() if "_lora_" in n)
    assert low_rank == (2 * 128 + 3 * 128 + 512) * 32 * 2  # qkv_proj and mlp_fc1: each its own down and up
    assert mm.module_size(linear1) - low_rank < 0.3 * bf16_bytes
    assert m.model_options["dcgen_quantization"]["format"] == "svdquant-int4"


def test_nunchaku_backend_without_nunchaku_is_a_clear_error(comfyui, svdq):
    from dcgen_core.flux.four_bit import load_4bit_flux

    with pytest.raises(DCGenError) as e:
        load_4bit_flux(svdq.path("int4_r32"), svdquant_backend="nunchaku")
    msg = str(e.value)
    assert "nunchaku" in msg and "expected" in msg and "found" in msg, msg


def test_svdquant_bad_input(comfyui, svdq, comfy_models, tmp_path):
    from dcgen_core.flux.comfy_model import load_flux_transformer
    from dcgen_core.flux.svdquant import load_svdquant_flux
    from dcgen_core.architectures import apply_lora

    with pytest.raises(DCGenError, match="4-bit nunchaku SVDQuant file"):
        load_flux_transformer(svdq.path("int4_r32"))
    base = load_svdquant_flux(svdq.path("int4_r32"), backend="torch")
    # a LoRA for a FLUX of another width (the hidden-32 tiny DC-Gen's)
    with pytest.raises(DCGenError, match="another model"):
        apply_lora(base, os.path.join(comfyui.dirs["loras"], comfy_models.lora))
    assert not base.patches and "dcgen_low_rank" not in base.model_options.get("transformer_options", {})
    # an SVDQuant file of something that is not FLUX
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(svdq.path("int4_r32"), "pt") as f:
        meta = f.metadata()
        tensors = {k.replace("transformer_blocks.0.qkv_proj", "layers.0.attn_qkv"): f.get_tensor(k)
                   for k in f.keys() if k.startswith("transformer_blocks.0.qkv_proj.")}
    other = str(tmp_path / "svdq-int4-not-flux.safetensors")
    save_file(tensors, other, metadata=meta)
    with pytest.raises(DCGenError) as e:
        load_svdquant_flux(other, backend="torch")
    assert other in str(e.value) and "layers.0.attn_qkv" in str(e.value)
