"""SANA transformer built with ComfyUI operations vs diffusers' SanaTransformer2DModel; SANA key conversion.

Needs ComfyUI ($COMFYUI_PATH, default ~/ComfyUI; skipped otherwise) and diffusers (the numerical oracle).
"""

import pytest
import torch

from dcgen_core.shared.errors import DCGenError
from dcgen_core.sana import keys
from dcgen_core.sana.keys import (
    is_diffusers_sana,
    is_original_sana,
    original_to_diffusers,
    sana_config_from_state_dict,
)
from dcgen_core.sana.model import SanaConfig, SanaTransformer

diffusers = pytest.importorskip("diffusers")

TINY = {
    "in_channels": 8, "out_channels": 6, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
    "num_cross_attention_heads": 2, "cross_attention_head_dim": 12, "cross_attention_dim": 16,
    "caption_channels": 20, "mlp_ratio": 2.5, "sample_size": 8,
}
VARIANTS = {
    "sana": {},
    "sana1.5-qknorm": {"qk_norm": "rms_norm_across_heads"},
    "4k-pos-embed-patch2": {"interpolation_scale": 2.0, "patch_size": 2, "qk_norm": "rms_norm_across_heads"},
    "sprint-guidance": {"guidance_embeds": True, "qk_norm": "rms_norm_across_heads"},
    "affine-norm2-qkv-bias": {"norm_elementwise_affine": True, "attention_bias": True},
}


def _diffusers_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.SanaTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # nothing trivially zero or one: norms, tables and biases are random too
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 6, 10, generator=g)  # non-square latent, batch 2
    t = torch.tensor([37.0, 912.5])
    ctx = torch.randn(2, 7, cfg.caption_channels, generator=g)
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0  # padding at the end
    mask[1, 1:3] = 0  # dropped in the middle
    guidance = torch.tensor([4.5, 2.0]) if cfg.guidance_embeds else None
    return x, t, ctx, mask, guidance


def _reference(model, x, t, ctx, mask, guidance):
    with torch.no_grad():
        return model(x, ctx, t, guidance=guidance, encoder_attention_mask=mask).sample


def _ours(sd, cfg, ops, dtype=None):
    model = SanaTransformer(cfg, dtype=dtype, operations=ops)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def refs():
    return {name: _diffusers_model(seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ops_name", ["disable_weight_init", "manual_cast"])
def test_matches_diffusers(comfyui, refs, variant, ops_name):
    import comfy.ops

    ref = refs[variant]
    cfg = SanaConfig.from_diffusers_config(dict(ref.config))
    assert cfg == SanaConfig(**{**TINY, **VARIANTS[variant]})
    ours = _ours(ref.state_dict(), cfg, getattr(comfy.ops, ops_name))
    args = _inputs(cfg)
    expected = _reference(ref, *args)
    x, t, ctx, mask, guidance = args
    with torch.no_grad():
        got = ours(x, t, ctx, attention_mask=mask, transformer_options={}, guidance=guidance)
        assert got.shape == expected.shape == (2, cfg.out_channels, 6, 10)
        assert _rel(got, expected) < 1e-5
        # the mask matters (so it is really applied), and no mask = diffusers without a mask
        unmasked = ours(x, t, ctx, guidance=guidance)
        assert _rel(unmasked, expected) > 1e-4
        assert _rel(unmasked, _reference(ref, x, t, ctx, None, guidance)) < 1e-5


def test_bf16_weights_manual_cast_fp32_compute(comfyui, refs):
    """Weights stored in bf16 and cast per layer to fp32 (ComfyUI's usual CPU / offload path)."""
    import comfy.ops

    ref = refs["sana1.5-qknorm"]
    cfg = SanaConfig.from_diffusers_config(dict(ref.config))
    sd16 = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    ours = _ours(sd16, cfg, comfy.ops.manual_cast, dtype=torch.bfloat16)
    assert ours.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    rounded = _diffusers_model(**VARIANTS["sana1.5-qknorm"])
    rounded.load_state_dict({k: v.float() for k, v in sd16.items()})
    args = _inputs(cfg)
    with torch.no_grad():
        got = ours(args[0], args[1], args[2], attention_mask=args[3])
    assert got.dtype == torch.float32
    assert _rel(got, _reference(rounded, *args)) < 1e-5


def test_comfy_attention_used(comfyui, refs, monkeypatch):
    """Cross-attention goes through comfy's optimized_attention, so transformer_options overrides reach it."""
    import comfy.ops

    ref = refs["sana"]
    cfg = SanaConfig.from_diffusers_config(dict(ref.config))
    ours = _ours(ref.state_dict(), cfg, comfy.ops.disable_weight_init)
    calls = []

    def override(func, *args, **kwargs):
        calls.append(kwargs.get("mask"))
        return func(*args, **kwargs)

    x, t, ctx, mask, _ = _inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, ctx, attention_mask=mask, transformer_options={"optimized_attention_override": override})
    assert len(calls) == cfg.num_layers and calls[0].shape == (2, 1, 7)
    assert _rel(got, _reference(ref, x, t, ctx, mask, None)) < 1e-5


# ----------------------------------------------------------------------------------------
# original NVlabs/Sana keys
# ----------------------------------------------------------------------------------------

def _to_original(sd: dict) -> dict:
    """Inverse of keys.original_to_diffusers (diffusers scripts/convert_sana_to_diffusers.py, reversed)."""
    sd = dict(sd)
    out = {"pos_embed": torch.zeros(1, 64, 16), "y_embedder.y_embedding": torch.zeros(7, 20)}  # dropped on load
    top = {"patch_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2", "time_embed.linear": "t_block.1",
           "caption_norm": "attention_y_norm", "proj_out": "final_layer.linear",
           "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_embed.guidance_embedder.linear_1": "cfg_embedder.mlp.0",
           "time_embed.guidance_embedder.linear_2": "cfg_embedder.mlp.2"}
    block = {"attn1.to_out.0": "attn.proj", "attn1.norm_q": "attn.q_norm", "attn1.norm_k": "attn.k_norm",
             "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
             "attn2.norm_q": "cross_attn.q_norm", "attn2.norm_k": "cross_attn.k_norm",
             "ff.conv_inverted": "mlp.inverted_conv.conv", "ff.conv_depth": "mlp.depth_conv.conv",
             "ff.conv_point": "mlp.point_conv.conv", "norm2": "norm2"}
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    n = 0
    while f"transformer_blocks.{n}.scale_shift_table" in sd:
        b = f"transformer_blocks.{n}."
        out[f"blocks.{n}.scale_shift_table"] = sd.pop(b + "scale_shift_table")
        for param in ("weight", "bias"):
            if b + f"attn1.to_q.{param}" in sd:
                out[f"blocks.{n}.attn.qkv.{param}"] = torch.cat([sd.pop(b + f"attn1.to_{x}.{param}") for x in "qkv"])
            out[f"blocks.{n}.cross_attn.kv_linear.{param}"] = torch.cat(
                [sd.pop(b + f"attn2.to_{x}.{param}") for x in "kv"])
        for key in [k for k in sd if k.startswith(b)]:
            module, param = key[len(b):].rsplit(".", 1)
            out[f"blocks.{n}.{block[module]}.{param}"] = sd.pop(key)
        n += 1
    for key in list(sd):
        module, param = key.rsplit(".", 1)
        out[f"{top[module]}.{param}"] = sd.pop(key)
    return out


@pytest.mark.parametrize("variant", ["sana", "sana1.5-qknorm", "sprint-guidance", "affine-norm2-qkv-bias"])
def test_original_keys_roundtrip(comfyui, refs, variant):
    import comfy.ops

    ref = refs[variant]
    sd = ref.state_dict()
    original = {"state_dict": _to_original(sd)}  # NVlabs .pth files wrap the tensors
    assert is_original_sana(original) and not is_diffusers_sana(original)
    converted = original_to_diffusers(original)
    assert is_diffusers_sana(converted) and not is_original_sana(converted)
    assert set(converted) == set(sd)
    for k in sd:
        assert torch.equal(converted[k], sd[k]), k
    cfg = sana_config_from_state_dict(converted, dict(ref.config))
    ours = _ours(converted, cfg, comfy.ops.manual_cast)
    args = _inputs(cfg)
    with torch.no_grad():
        got = ours(args[0], args[1], args[2], attention_mask=args[3], guidance=args[4])
    assert _rel(got, _reference(ref, *args)) < 1e-5


def test_original_unknown_keys_and_hints():
    sd = _to_original(_diffusers_model().state_dict())
    # an all-zero pos_embed buffer: trained without a position embedding (SANA 512 px / 1K)
    assert keys.original_pos_embed_config(sd) == {"sample_size": 8, "interpolation_scale": None}
    with pytest.raises(DCGenError, match="unknown.*blocks.0.attn.rope"):
        original_to_diffusers({**sd, "blocks.0.attn.rope.weight": torch.zeros(1)})
    with pytest.raises(DCGenError, match="expected the tensors"):
        original_to_diffusers({"img_in.weight": torch.zeros(2, 2)})


# ----------------------------------------------------------------------------------------
# config inference and bad input
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_state_dict_with_config_json(refs, variant):
    ref = refs[variant]
    cfg = sana_config_from_state_dict({f"model.diffusion_model.{k}": v for k, v in ref.state_dict().items()},
                                      dict(ref.config))
    assert cfg == SanaConfig.from_diffusers_config(dict(ref.config))
    rebuilt = diffusers.SanaTransformer2DModel.from_config(cfg.to_diffusers_config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert public(rebuilt.config) == public(ref.config)


def test_config_from_shapes_alone():
    """A released-SANA-like head layout (32-channel self heads, 16 x 72 cross heads) needs no config.json."""
    kw = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 1,
          "num_cross_attention_heads": 16, "cross_attention_head_dim": 72, "cross_attention_dim": 64,
          "caption_channels": 12, "mlp_ratio": 2.5, "qk_norm": "rms_norm_across_heads"}
    ref = diffusers.SanaTransformer2DModel(**kw)
    cfg = sana_config_from_state_dict(ref.state_dict())
    assert cfg == SanaConfig(**kw)


def test_config_errors(refs):
    sd = refs["sana"].state_dict()
    # tiny widths are not a released SANA: the cross-attention head count needs config.json
    with pytest.raises(DCGenError, match="config.json"):
        sana_config_from_state_dict(sd)
    cfg_json = dict(refs["sana"].config)
    with pytest.raises(DCGenError, match=r"num_layers: expected 3 \(config.json\), found 2 in the weights"):
        sana_config_from_state_dict(sd, {**cfg_json, "num_layers": 3})
    with pytest.raises(DCGenError, match="expected the tensors.*found no"):
        sana_config_from_state_dict({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(DCGenError, match="expected the tensors"):
        sana_config_from_state_dict({})
    with pytest.raises(DCGenError, match="original NVlabs"):
        sana_config_from_state_dict(_to_original(sd))
    bad = dict(sd)
    bad["transformer_blocks.1.ff.conv_point.weight"] = torch.zeros(16, 39, 1, 1)
    with pytest.raises(DCGenError, match=r"conv_point.weight': expected shape \(16, 40, 1, 1\), found shape "
                                         r"\(16, 39, 1, 1\)"):
        sana_config_from_state_dict(bad, cfg_json)
    bad = dict(sd)
    bad["patch_embed.proj.weight"] = torch.zeros(16, 8)
    with pytest.raises(DCGenError, match=r"expected 4 dimensions, found shape \(16, 8\)"):
        sana_config_from_state_dict(bad, cfg_json)
    bad = dict(sd)
    del bad["transformer_blocks.1.attn2.to_v.bias"]
    with pytest.raises(DCGenError, match=r"missing \['transformer_blocks.1.attn2.to_v.bias'\]"):
        sana_config_from_state_dict(bad, cfg_json)
    with pytest.raises(DCGenError, match="qk_norm"):
        SanaConfig(qk_norm="layer_norm")
    with pytest.raises(DCGenError, match="_class_name"):
        SanaConfig.from_diffusers_config({"_class_name": "PixArtTransformer2DModel"})


def test_sprint_needs_guidance(comfyui, refs):
    import comfy.ops

    ref = refs["sprint-guidance"]
    cfg = SanaConfig.from_diffusers_config(dict(ref.config))
    ours = _ours(ref.state_dict(), cfg, comfy.ops.disable_weight_init)
    x, t, ctx, mask, _ = _inputs(cfg)
    with pytest.raises(DCGenError, match="guidance"):
        ours(x, t, ctx, attention_mask=mask)
