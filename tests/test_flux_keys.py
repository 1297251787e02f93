"""diffusers <-> BFL/ComfyUI FLUX key conversion, config recovery, LoRA module offsets.

The ComfyUI tests need a ComfyUI checkout at $COMFYUI_PATH (default ~/ComfyUI) and
are skipped otherwise.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from dcgen_core.flux.comfy_model import flux_params_kwargs
from dcgen_core.shared.comfy_compat import norm_param_in
from dcgen_core.shared.errors import DCGenError
from dcgen_core.flux.keys import (FluxConfig, diffusers_flux_module_names, diffusers_flux_module_to_bfl,
                                  diffusers_to_bfl, flux_config_from_state_dict, is_bfl_flux, is_diffusers_flux,
                                  swap_scale_shift)
from dcgen_core.shared.keys import strip_prefix

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    patch_size=1,
    in_channels=32,
    out_channels=32,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(TINY, **over)
    model = diffusers.FluxTransformer2DModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # RMSNorm scales
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model, cfg


@pytest.fixture(scope="module")
def tiny():
    model, cfg = _tiny_model()
    return model, cfg, dict(model.state_dict())


def _expected_bfl_shapes(c: FluxConfig) -> dict:
    """BFL shapes written out independently of the converter and of ComfyUI."""
    H, M = c.hidden_size, c.mlp_hidden_dim
    s = {
        "img_in.weight": (H, c.img_in_features), "img_in.bias": (H,),
        "txt_in.weight": (H, c.context_in_dim), "txt_in.bias": (H,),
        "time_in.in_layer.weight": (H, 256), "time_in.in_layer.bias": (H,),
        "time_in.out_layer.weight": (H, H), "time_in.out_layer.bias": (H,),
        "vector_in.in_layer.weight": (H, c.vec_in_dim), "vector_in.in_layer.bias": (H,),
        "vector_in.out_layer.weight": (H, H), "vector_in.out_layer.bias": (H,),
        "final_layer.linear.weight": (c.out_features, H), "final_layer.linear.bias": (c.out_features,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    if c.guidance_embed:
        s.update({"guidance_in.in_layer.weight": (H, 256), "guidance_in.in_layer.bias": (H,),
                  "guidance_in.out_layer.weight": (H, H), "guidance_in.out_layer.bias": (H,)})
    for i in range(c.depth):
        p = f"double_blocks.{i}."
        for st in ("img", "txt"):
            s.update({
                p + f"{st}_mod.lin.weight": (6 * H, H), p + f"{st}_mod.lin.bias": (6 * H,),
                p + f"{st}_attn.qkv.weight": (3 * H, H), p + f"{st}_attn.qkv.bias": (3 * H,),
                p + f"{st}_attn.norm.query_norm.scale": (c.head_dim,),
                p + f"{st}_attn.norm.key_norm.scale": (c.head_dim,),
                p + f"{st}_attn.proj.weight": (H, H), p + f"{st}_attn.proj.bias": (H,),
                p + f"{st}_mlp.0.weight": (M, H), p + f"{st}_mlp.0.bias": (M,),
                p + f"{st}_mlp.2.weight": (H, M), p + f"{st}_mlp.2.bias": (H,),
            })
    for i in range(c.depth_single_blocks):
        p = f"single_blocks.{i}."
        s.update({
            p + "linear1.weight": (3 * H + M, H), p + "linear1.bias": (3 * H + M,),
            p + "linear2.weight": (H, H + M), p + "linear2.bias": (H,),
            p + "norm.query_norm.scale": (c.head_dim,), p + "norm.key_norm.scale": (c.head_dim,),
            p + "modulation.lin.weight": (3 * H, H), p + "modulation.lin.bias": (3 * H,),
        })
    return s


# --------------------------------------------------------------------------------------
# Torch-only
# --------------------------------------------------------------------------------------


def test_detection_and_prefixes(tiny):
    _, _, sd = tiny
    bfl = diffusers_to_bfl(sd)
    assert is_diffusers_flux(sd) and not is_bfl_flux(sd)
    assert is_bfl_flux(bfl) and not is_diffusers_flux(bfl)
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.",
                   "base_model.model.transformer."):
        wrapped = {prefix + k: v for k, v in sd.items()}
        stripped = strip_prefix(wrapped)
        assert set(stripped) == set(sd)
        assert all(stripped[k] is sd[k] for k in sd)
        assert is_diffusers_flux(wrapped)
        conv = diffusers_to_bfl(wrapped)
        assert set(conv) == set(bfl)
    # A prefix carried by only some keys is left alone; no prefix -> same dict back.
    mixed = {"transformer.a": 1, "b": 2}
    assert strip_prefix(mixed) == mixed
    assert strip_prefix(sd) is sd
    # "transformer_blocks." must not be mistaken for the "transformer." prefix.
    assert "transformer_blocks.0.attn.to_q.weight" in strip_prefix(sd)
    assert not is_diffusers_flux({}) and not is_bfl_flux({})


def test_convert_shapes_identity_and_fusion(tiny):
    model, cfg, sd = tiny
    bfl = diffusers_to_bfl(sd)
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    expected = _expected_bfl_shapes(conf)
    assert set(bfl) == set(expected)
    for k, shape in expected.items():
        assert tuple(bfl[k].shape) == shape, k
    # Nothing lost or duplicated.
    assert sum(t.numel() for t in bfl.values()) == sum(t.numel() for t in sd.values())
    # Unfused tensors are passed through as the same objects (no copies of a mmap).
    assert bfl["img_in.weight"] is sd["x_embedder.weight"]
    assert bfl["final_layer.linear.weight"] is sd["proj_out.weight"]
    assert bfl["double_blocks.1.txt_mlp.2.weight"] is sd["transformer_blocks.1.ff_context.net.2.weight"]
    assert bfl["single_blocks.0.norm.key_norm.scale"] is sd["single_transformer_blocks.0.attn.norm_k.weight"]
    assert bfl["single_blocks.1.linear2.weight"] is sd["single_transformer_blocks.1.proj_out.weight"]
    H, M = conf.hidden_size, conf.mlp_hidden_dim
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}.attn."
        for end in ("weight", "bias"):
            img = bfl[f"double_blocks.{i}.img_attn.qkv.{end}"]
            txt = bfl[f"double_blocks.{i}.txt_attn.qkv.{end}"]
            for j, (a, b) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
                assert torch.equal(img[j * H:(j + 1) * H], sd[p + f"{a}.{end}"])
                assert torch.equal(txt[j * H:(j + 1) * H], sd[p + f"{b}.{end}"])
    for i in range(cfg["num_single_layers"]):
        p = f"single_transformer_blocks.{i}."
        for end in ("weight", "bias"):
            lin1 = bfl[f"single_blocks.{i}.linear1.{end}"]
            assert torch.equal(lin1[:H], sd[p + f"attn.to_q.{end}"])
            assert torch.equal(lin1[H:2 * H], sd[p + f"attn.to_k.{end}"])
            assert torch.equal(lin1[2 * H:3 * H], sd[p + f"attn.to_v.{end}"])
            assert torch.equal(lin1[3 * H:], sd[p + f"proj_mlp.{end}"])
            assert lin1.shape[0] == 3 * H + M
    for end in ("weight", "bias"):  # diffusers [scale, shift] -> BFL [shift, scale]
        src, dst = sd[f"norm_out.linear.{end}"], bfl[f"final_layer.adaLN_modulation.1.{end}"]
        assert torch.equal(dst[:H], src[H:]) and torch.equal(dst[H:], src[:H])
        assert torch.equal(swap_scale_shift(dst), src)


@pytest.mark.parametrize("channels", [128])
def test_other_channel_counts_and_no_guidance(channels):
    model, cfg = _tiny_model(seed=1, in_channels=channels, out_channels=channels, num_layers=1,
                             num_single_layers=1, guidance_embeds=False)
    bfl = diffusers_to_bfl(model.state_dict())
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    assert conf.img_in_features == channels and conf.out_features == channels
    assert not conf.guidance_embed and "guidance_in.in_layer.weight" not in bfl
    assert set(bfl) == set(_expected_bfl_shapes(conf))


def test_unknown_and_incomplete_keys(tiny):
    _, _, sd = tiny
    bad = dict(sd)
    bad["transformer_blocks.0.attn.something.weight"] = torch.zeros(1)
    with pytest.raises(DCGenError, match="unknown.*something"):
        diffusers_to_bfl(bad)
    loose = diffusers_to_bfl(bad, strict=False)
    assert "transformer_blocks.0.attn.something.weight" in loose
    partial = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.proj_mlp.bias"}
    with pytest.raises(DCGenError, match="single_blocks.1.linear1.bias.*expected all 4 parts"):
        diffusers_to_bfl(partial)


def test_config_recovery(tiny):
    model, cfg, sd = tiny
    bfl = diffusers_to_bfl(sd)
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    assert conf == FluxConfig(
        hidden_size=32, num_heads=2, head_dim=16, depth=2, depth_single_blocks=2, context_in_dim=32,
        vec_in_dim=24, img_in_features=32, out_features=32, guidance_embed=True, axes_dim=[4, 6, 6],
        theta=10000, mlp_ratio=4.0, qkv_bias=True)
    assert conf.mlp_hidden_dim == 128
    # Prefixed BFL state dict (as in a ComfyUI checkpoint) works too.
    assert flux_config_from_state_dict({"model.diffusion_model." + k: v for k, v in bfl.items()},
                                       dict(model.config)) == conf
    # No config.json and head_dim != 128: the RoPE axes cannot be inferred.
    with pytest.raises(DCGenError, match="config.json"):
        flux_config_from_state_dict(bfl)
    # A config.json of another model is caught.
    with pytest.raises(DCGenError, match="num_attention_heads.*expected 24"):
        flux_config_from_state_dict(bfl, dict(model.config, num_attention_heads=24))
    with pytest.raises(DCGenError, match="axes_dims_rope"):
        flux_config_from_state_dict(bfl, dict(model.config, axes_dims_rope=[16, 56, 56]))
    with pytest.raises(DCGenError, match="img_in.weight"):
        flux_config_from_state_dict({k: v for k, v in bfl.items() if not k.startswith("img_in")},
                                    dict(model.config))
    kw = conf.comfy_flux_kwargs(patch_size=2)
    assert kw["in_channels"] == 8 and kw["out_channels"] == 8 and kw["patch_size"] == 2
    assert conf.comfy_flux_kwargs(patch_size=1)["in_channels"] == 32


def test_config_full_size_flux_defaults_axes():
    """FLUX.1 shapes (hidden 3072, head dim 128) with DC-Gen's 128-channel embedder, on meta tensors."""
    H, M = 3072, 12288
    conf = FluxConfig(hidden_size=H, num_heads=24, head_dim=128, depth=19, depth_single_blocks=38,
                      context_in_dim=4096, vec_in_dim=768, img_in_features=128, out_features=128,
                      guidance_embed=True, axes_dim=[16, 56, 56], mlp_ratio=4.0, qkv_bias=True)
    sd = {k: torch.empty(s, device="meta") for k, s in _expected_bfl_shapes(conf).items()}
    got = flux_config_from_state_dict(sd)
    assert got == conf and got.mlp_hidden_dim == M


def test_module_offsets_match_conversion(tiny):
    model, cfg, sd = tiny
    bfl = diffusers_to_bfl(sd)
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 10 + 14 * 2 + 6 * 2  # top-level + double + single
    seen = set()
    for name in linears:
        mod = model.get_submodule(name)
        key, off = diffusers_flux_module_to_bfl(name, conf.hidden_size, conf.mlp_hidden_dim)
        assert (key, off) == diffusers_flux_module_to_bfl("transformer." + name, config=conf)
        target = bfl[key]
        if off is not None:
            target = target.narrow(*off)
        if name == "norm_out.linear":
            target = swap_scale_shift(target)
        assert torch.equal(target, mod.weight), name
        bkey, boff = diffusers_flux_module_to_bfl(name + ".bias", config=conf)
        assert bkey == key[: -len("weight")] + "bias" and boff == off
        btarget = bfl[bkey] if boff is None else bfl[bkey].narrow(*boff)
        if name == "norm_out.linear":
            btarget = swap_scale_shift(btarget)
        assert torch.equal(btarget, mod.bias), name
        seen.add((key, off))
    assert len(seen) == len(linears)
    # The name list covers exactly the model's linears plus its RMSNorms.
    norms = [n for n, _ in model.named_modules() if n.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k"))]
    assert sorted(diffusers_flux_module_names(conf)) == sorted(linears + norms)
    assert diffusers_flux_module_to_bfl("transformer_blocks.0.attn.norm_added_k") == \
        ("double_blocks.0.txt_attn.norm.key_norm.scale", None)
    # FLUX.1 numbers (ComfyUI's own map uses the same offsets).
    assert diffusers_flux_module_to_bfl("single_transformer_blocks.5.proj_mlp", 3072) == \
        ("single_blocks.5.linear1.weight", (0, 9216, 12288))
    assert diffusers_flux_module_to_bfl("transformer_blocks.3.attn.add_v_proj", 3072) == \
        ("double_blocks.3.txt_attn.qkv.weight", (0, 6144, 3072))
    assert diffusers_flux_module_to_bfl("x_embedder") == ("img_in.weight", None)
    with pytest.raises(DCGenError, match="hidden_size"):
        diffusers_flux_module_to_bfl("transformer_blocks.3.attn.to_k")
    with pytest.raises(DCGenError, match="unknown"):
        diffusers_flux_module_to_bfl("transformer_blocks.3.attn.to_z", 32)


# --------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------


def _comfy(comfyui):
    """ComfyUI's modules, from the checkout the ``comfyui`` fixture booted (it skips or fails when absent)."""
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.utils

    return comfy


COMFY_KW = dict(in_channels=8, out_channels=8, vec_in_dim=24, context_in_dim=32, hidden_size=32,
                mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def test_comfy_flux_shapes_and_forward(tiny, comfyui):
    comfy = _comfy(comfyui)
    model, cfg, sd = tiny
    bfl = diffusers_to_bfl(sd)
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    assert conf.comfy_flux_kwargs(patch_size=2) == COMFY_KW
    cm = comfy.ldm.flux.model.Flux(image_model=None, operations=comfy.ops.disable_weight_init,
                                   **flux_params_kwargs(COMFY_KW))
    ref = cm.state_dict()
    # BFL names RMSNorm parameters ".scale"; ComfyUI v0.33 names them ".weight"
    bfl = {norm_param_in(k, ref) or k: v for k, v in bfl.items()}
    assert set(ref) == set(bfl)
    for k, v in ref.items():
        assert v.shape == bfl[k].shape, k
    cm.load_state_dict(bfl, strict=True)
    cm.eval()

    torch.manual_seed(3)
    B, C, h, w, L = 2, 32, 3, 4, 5
    z = torch.randn(B, C, h, w)
    ctx = torch.randn(B, L, 32)
    pooled = torch.randn(B, 24)
    sigma = torch.full((B,), 0.7)
    guidance = torch.full((B,), 3.5)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    with torch.no_grad():
        packed = z.permute(0, 2, 3, 1).reshape(B, h * w, C)
        d_out = model(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=sigma, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(L, 3),
                      guidance=guidance, return_dict=False)[0]
        d_out = d_out.reshape(B, h, w, C).permute(0, 3, 1, 2)
        x = F.pixel_shuffle(z, 2)
        assert x.shape == (B, 8, 2 * h, 2 * w)
        c_out = cm(x, sigma, ctx, y=pooled, guidance=guidance)
        c_out = F.pixel_unshuffle(c_out, 2)
    assert c_out.shape == d_out.shape == z.shape
    assert d_out.abs().max() > 1e-3  # a meaningful comparison
    assert (c_out - d_out).abs().max().item() <= 1e-5


def test_keys_match_comfy_flux_to_diffusers(tiny, comfyui):
    comfy = _comfy(comfyui)
    model, cfg, sd = tiny
    bfl = diffusers_to_bfl(sd)
    conf = flux_config_from_state_dict(bfl, dict(model.config))
    key_map = comfy.utils.flux_to_diffusers(conf.to_dict(), output_prefix="")
    key_map = {k: v for k, v in key_map.items() if not k.startswith("controlnet_")}
    if not conf.guidance_embed:
        key_map = {k: v for k, v in key_map.items() if "guidance_embedder" not in k}
    # newer ComfyUI adds aliases of other layouts (LyCoris LoKr ff.linear_in/out, Flux 2 fused names): FLUX.1
    # diffusers files never carry them
    alias = re.compile(r"\.(linear_in|linear_out|to_qkv_mlp_proj)\.|single_transformer_blocks\.\d+\.attn\.to_out\.")
    aliases = {k for k in key_map if alias.search(k)}
    assert set(key_map) - aliases == set(sd)
    for dkey, to in key_map.items():
        if dkey in aliases:
            continue
        key, off = diffusers_flux_module_to_bfl(dkey, config=conf)
        if isinstance(to, str) and to.endswith("_norm.weight"):  # ComfyUI v0.33 renames BFL's ".scale"
            key = key[: -len(".scale")] + ".weight"
        if isinstance(to, str):
            assert (key, off) == (to, None), dkey
        elif len(to) == 3:  # (key, None, swap function)
            assert key == to[0] and off is None and dkey.startswith("norm_out.linear")
            assert torch.equal(to[2](sd[dkey]), bfl[key])
        else:
            assert (key, off) == to, dkey
