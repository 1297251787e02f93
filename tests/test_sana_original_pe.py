"""Original NVlabs/Sana checkpoints at 512 px, 1K, 2K and 4K, with no config.json, through DC-Gen Load SANA vs
the SanaTransformer2DModel that diffusers' ``scripts/convert_sana_to_diffusers.py`` builds from the same file.

What the files hold (NVlabs ``Sana.__init__`` / ``initialize_weights`` and configs/sana_config/*): a ``pos_embed``
buffer of shape (1, (image_size / 32)^2, hidden), all zeros at 512 px / 1K (``use_pe: false``), and at 2K / 4K the
sin-cos table of the (image_size / 32)^2 grid with base size = grid side and ``pe_interpolation`` 1.0 / 2.0. The
converter builds ``sample_size = image_size // 32`` and ``interpolation_scale`` {512: None, 1024: None, 2048: 1.0,
4096: 2.0}. Tolerances: transformer forward within 1e-5 relative, images within 1e-3 (fp32 CPU).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny

diffusers = pytest.importorskip("diffusers")

from test_sana_model import _to_original

# SANA's own head layout (32-channel self-attention heads; a released cross-attention width, 16 x 72 = 1152), so
# that the original files need no config.json, at a tiny hidden width
ARCH = {"in_channels": 32, "out_channels": 32, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2,
        "num_cross_attention_heads": 16, "cross_attention_head_dim": 72, "cross_attention_dim": 64,
        "caption_channels": tiny.SANA_CAPTION}
CONVERTER_INTERPOLATION = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}  # convert_sana_to_diffusers.py
NVLABS_PE_INTERPOLATION = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}  # NVlabs configs: None = use_pe false
SIZES = list(CONVERTER_INTERPOLATION)


def nvlabs_pos_embed(dim: int, side: int, pe_interpolation: float) -> torch.Tensor:
    """NVlabs ``get_2d_sincos_pos_embed(dim, side, pe_interpolation=..., base_size=side)`` as the buffer stores it."""
    grid_h = np.arange(side, dtype=np.float32) / (side / side) / pe_interpolation
    grid_w = np.arange(side, dtype=np.float32) / (side / side) / pe_interpolation
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, side, side])

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def original_file(folder: str, image_size: int, seed: int = 3, pe_dtype=torch.float32) -> str:
    """A tiny SANA in the original NVlabs layout as an ``image_size`` checkpoint holds it (no config.json)."""
    model = tiny._randomize(diffusers.SanaTransformer2DModel(**ARCH).eval(), seed=seed, scale=0.15)
    sd = _to_original(model.state_dict())
    hidden, side = ARCH["num_attention_heads"] * ARCH["attention_head_dim"], image_size // 32
    interp = NVLABS_PE_INTERPOLATION[image_size]
    pe = torch.zeros(1, side * side, hidden) if interp is None else nvlabs_pos_embed(hidden, side, interp)
    sd["pos_embed"] = pe.to(pe_dtype)
    null_caption = torch.randn(300, ARCH["caption_channels"], generator=torch.Generator().manual_seed(0))
    sd["y_embedder.y_embedding"] = null_caption
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"Sana_tiny_{image_size}px.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def convert_like_diffusers(path: str, image_size: int):
    """diffusers ``scripts/convert_sana_to_diffusers.py`` ``main()`` for a SanaMS checkpoint (not Sprint, no qk
    norm), with the tiny widths in place of its ``model_kwargs`` table."""
    state_dict = load_file(path)
    c = {}
    top = {"patch_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2",
           "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.linear": "t_block.1"}
    for new, old in top.items():
        for p in ("weight", "bias"):
            c[f"{new}.{p}"] = state_dict.pop(f"{old}.{p}")
    c["caption_norm.weight"] = state_dict.pop("attention_y_norm.weight")
    for d in range(ARCH["num_layers"]):
        b, o = f"transformer_blocks.{d}.", f"blocks.{d}."
        c[b + "scale_shift_table"] = state_dict.pop(o + "scale_shift_table")
        q, k, v = torch.chunk(state_dict.pop(o + "attn.qkv.weight"), 3, dim=0)
        c[b + "attn1.to_q.weight"], c[b + "attn1.to_k.weight"], c[b + "attn1.to_v.weight"] = q, k, v
        for new, old in (("attn1.to_out.0", "attn.proj"), ("ff.conv_inverted", "mlp.inverted_conv.conv"),
                         ("ff.conv_depth", "mlp.depth_conv.conv"), ("attn2.to_q", "cross_attn.q_linear"),
                         ("attn2.to_out.0", "cross_attn.proj")):
            for p in ("weight", "bias"):
                c[f"{b}{new}.{p}"] = state_dict.pop(f"{o}{old}.{p}")
        c[b + "ff.conv_point.weight"] = state_dict.pop(o + "mlp.point_conv.conv.weight")
        for p in ("weight", "bias"):
            k, v = torch.chunk(state_dict.pop(f"{o}cross_attn.kv_linear.{p}"), 2, dim=0)
            c[f"{b}attn2.to_k.{p}"], c[f"{b}attn2.to_v.{p}"] = k, v
    c["proj_out.weight"] = state_dict.pop("final_layer.linear.weight")
    c["proj_out.bias"] = state_dict.pop("final_layer.linear.bias")
    c["scale_shift_table"] = state_dict.pop("final_layer.scale_shift_table")
    transformer = diffusers.SanaTransformer2DModel(
        **ARCH, mlp_ratio=2.5, attention_bias=False, sample_size=image_size // 32, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=CONVERTER_INTERPOLATION[image_size])
    transformer.load_state_dict(c, strict=True)
    state_dict.pop("y_embedder.y_embedding")
    state_dict.pop("pos_embed")
    assert len(state_dict) == 0, f"State dict is not empty, {state_dict.keys()}"
    return transformer.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 6, 10, generator=g)  # non-square latent, batch 2
    ctx = torch.randn(2, 7, ARCH["caption_channels"], generator=g)
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    return x, torch.tensor([37.0, 912.5]), ctx, mask


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("image_size", SIZES)
def test_original_file_matches_diffusers_converter(comfyui, tmp_path, image_size):
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = original_file(str(tmp_path), image_size)
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))
    ref = convert_like_diffusers(path, image_size)
    m = load_sana_transformer(path, "fp32")
    dm = m.model.diffusion_model
    x, t, ctx, mask = _inputs()
    with torch.no_grad():
        expected = ref(x, ctx, t, encoder_attention_mask=mask).sample
        got = dm(x, t, ctx, attention_mask=mask, transformer_options={})
        # the positional embedding matters at 2K / 4K: without it the model is far off (the test can fail)
        no_pe = convert_like_diffusers(path, 1024)(x, ctx, t, encoder_attention_mask=mask).sample
    assert _rel(got, expected) < 1e-5, _rel(got, expected)
    assert (dm.config.interpolation_scale, dm.config.sample_size) == (CONVERTER_INTERPOLATION[image_size],
                                                                     image_size // 32)
    if CONVERTER_INTERPOLATION[image_size] is not None:
        assert _rel(no_pe, expected) > 1e-2


@pytest.mark.parametrize("pe_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_buffer(comfyui, tmp_path, pe_dtype):
    """NVlabs' *_BF16 files store the buffer in bf16: its rounding does not hide (or change) the scale."""
    from dcgen_core.sana.comfy_model import read_sana_checkpoint

    for image_size in (2048, 4096):
        _, cfg = read_sana_checkpoint(original_file(str(tmp_path / str(image_size)), image_size, pe_dtype=pe_dtype))
        assert (cfg.interpolation_scale, cfg.sample_size) == (CONVERTER_INTERPOLATION[image_size], image_size // 32)


@pytest.mark.parametrize("image_size", [1024, 2048, 4096])
def test_original_file_image_through_executor(comfyui, comfy_models, tiny_vae, image_size):
    """DC-Gen Load SANA on the original file -> CFGGuider + euler + DC-Gen Flow Sigmas -> VAE Decode, vs
    the converter's transformer in the diffusers pipeline pieces (test_sana_e2e.reference)."""
    from test_sana_e2e import _embeds, _prompt, reference

    name = f"sana-tiny-original-{image_size}"
    path = original_file(os.path.join(comfyui.dirs["diffusion_models"], name), image_size)
    key = f"sana-original-pe-{image_size}"
    pos, neg = _embeds(5), _embeds(6)
    comfyui.test_nodes.EMBEDDINGS[key + "+"] = pos
    comfyui.test_nodes.EMBEDDINGS[key + "-"] = neg
    comfyui.runtime.executor.reset()
    comfyui.runtime.run(_prompt(key, 256, 192, comfy_models.vae, f"{name}/{os.path.basename(path)}"))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    expected = reference(convert_like_diffusers(path, image_size), tiny_vae, 256, 192, pos, neg)
    assert ours.shape == expected.shape == (1, 192, 256, 3)
    assert ((expected > 0.01) & (expected < 0.99)).float().mean() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-3, (ours - expected).abs().max().item()


def _original(image_size, scale=None, **overrides):
    hidden, side = ARCH["num_attention_heads"] * ARCH["attention_head_dim"], image_size // 32
    pe = torch.zeros(1, side * side, hidden) if scale is None else nvlabs_pos_embed(hidden, side, scale)
    sd = {"x_embedder.proj.weight": torch.zeros(hidden, 32, 1, 1), "pos_embed": pe}
    sd.update(overrides)
    return {k: v for k, v in sd.items() if v is not None}


def test_pos_embed_config_and_what_cannot_be_inferred():
    from dcgen_core.shared.errors import DCGenError
    from dcgen_core.sana.keys import original_pos_embed_config as read

    f = "/models/Sana_2K.safetensors"
    assert read(_original(1024)) == {"sample_size": 32, "interpolation_scale": None}
    assert read(_original(2048, 1.0)) == {"sample_size": 64, "interpolation_scale": 1.0}
    assert read(_original(4096, 2.0), where=f) == {"sample_size": 128, "interpolation_scale": 2.0}
    # a config.json that agrees, or that tells a scale the converter has no entry for
    assert read(_original(2048, 1.0), {"interpolation_scale": 1.0, "sample_size": 64}) == {
        "sample_size": 64, "interpolation_scale": 1.0}
    assert read(_original(2048, 0.5), {"interpolation_scale": 0.5})["interpolation_scale"] == 0.5
    # no buffer: a config.json decides, else refused
    assert read(_original(2048, pos_embed=None), {"interpolation_scale": 1.0}) == {}
    with pytest.raises(DCGenError, match=f"{f} tensor 'pos_embed': expected the position-embedding buffer.*"
                                         "found none.*config.json"):
        read(_original(2048, pos_embed=None), where=f)
    # a sin-cos table of a scale the converter does not give at that size
    with pytest.raises(DCGenError, match=f"{f} tensor 'pos_embed': expected the sin-cos table of interpolation_scale "
                                         r"1.0 \(diffusers' converter at 2048 px\), found a table .* off it \(it reads "
                                         r"as interpolation_scale 0.5\).*config.json"):
        read(_original(2048, 0.5), where=f)
    with pytest.raises(DCGenError, match=r"expected all zeros \(interpolation_scale None, diffusers' converter at "
                                         r"1024 px\), found a sin-cos table \(it reads as interpolation_scale 2\)"):
        read(_original(1024, 2.0), where=f)
    # config.json against the buffer
    with pytest.raises(DCGenError, match=f"{f} config.json interpolation_scale: expected 1.0 \\(config.json\\), "
                                         "found pos_embed all zeros"):
        read(_original(1024), {"interpolation_scale": 1.0}, where=f)
    with pytest.raises(DCGenError, match=r"expected the sin-cos table of interpolation_scale 2.0 \(config.json\)"):
        read(_original(2048, 1.0), {"interpolation_scale": 2.0}, where=f)
    with pytest.raises(DCGenError, match=r"config.json sample_size: expected 32 \(config.json\), found 128 in the "
                                         r"weights \(pos_embed of 128 x 128 tokens, patch 1\)"):
        read(_original(4096, 2.0), {"sample_size": 32}, where=f)
    with pytest.raises(DCGenError, match=r"'pos_embed': expected shape \(1, side \* side, 64\).*found shape "
                                         r"\(1, 1000, 64\)"):
        read(_original(1024, pos_embed=torch.zeros(1, 1000, 64)), where=f)


def test_loader_names_the_file(comfyui, tmp_path):
    """The loader's error names the file when the resolution cannot be inferred."""
    from dcgen_core.shared.errors import DCGenError
    from dcgen_core.sana.comfy_model import load_sana_transformer

    path = original_file(str(tmp_path), 2048)
    sd = load_file(path)
    del sd["pos_embed"]
    save_file(sd, path)
    with pytest.raises(DCGenError, match=f"{path} tensor 'pos_embed'.*found none"):
        load_sana_transformer(path)
