"""tests/svdquant_pack.py (the test-side WRITER of nunchaku SVDQuant FLUX files): its packers reproduce nunchaku's own
packing (the committed fixture) bit-exactly, and a written tiny FLUX file reads back through
dcgen_core.svdquant.read_svdquant_file as exactly the dense model the writer returns. Torch + diffusers only."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dcgen_core import svdquant as S
from svdquant_pack import (pack_awq_qweight, pack_awq_scales, pack_lowrank, pack_qweight, pack_vector, pack_wscales,
                           write_nunchaku_flux)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "svdquant_packing.safetensors")
SVDQ_CASES = ["int4_a", "int4_b", "fp4_a", "fp4_b"]

# tiny FLUX: every block linear dim a multiple of 128 (hidden 128 = 2 heads x 64, MLP 512, single proj_out in 640)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(8, 28, 28))


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURE)


def part(fx, case, which):
    pre = f"{case}.{which}."
    return {k[len(pre):]: v for k, v in fx.items() if k.startswith(pre)}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# packers == nunchaku's packer (fixture), bit for bit
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", SVDQ_CASES)
def test_packers_reproduce_nunchaku_fixture(fx, case):
    nat, pk = part(fx, case, "natural"), part(fx, case, "packed")
    gs = 64 if case.startswith("int4") else 16
    assert same_bits(pack_qweight(nat["codes"]), pk["qweight"])
    assert same_bits(pack_wscales(nat["wscales"], gs), pk["wscales"])
    vectors = ("bias", "smooth", "smooth_orig") + (("wcscales",) if gs == 16 else ())
    for k in vectors:
        assert same_bits(pack_vector(nat[k]), pk[k]), k
    assert same_bits(pack_lowrank(nat["lora_down"], down=True), pk["lora_down"])
    assert same_bits(pack_lowrank(nat["lora_up"], down=False), pk["lora_up"])
    # the layouts are real permutations (an identity "packer" could not pass the checks above)
    assert not torch.equal(pk["bias"], nat["bias"])
    assert not torch.equal(pk["lora_up"], nat["lora_up"])
    # and the reader undoes them
    assert torch.equal(S.unpack_lowrank(pack_lowrank(nat["lora_down"], down=True), down=True), nat["lora_down"])
    assert torch.equal(S.unpack_vector(pack_vector(nat["smooth"])), nat["smooth"])


def test_awq_packers_reproduce_nunchaku_fixture(fx):
    nat, pk = part(fx, "awq", "natural"), part(fx, "awq", "packed")
    assert same_bits(pack_awq_qweight(nat["codes"]), pk["qweight"])
    assert same_bits(pack_awq_scales(nat["scales"], 128), pk["wscales"])
    zeros = (-(7 * nat["scales"].float())).to(torch.bfloat16)   # TinyChat: zero point 7, pre-scaled, negated
    assert same_bits(pack_awq_scales(zeros, 128), pk["wzeros"])
    assert torch.equal(S.unpack_awq_qweight(pack_awq_qweight(nat["codes"])), nat["codes"])


# ---------------------------------------------------------------------------------------------------------------------
# a written FLUX file == the returned dense model, module by module
# ---------------------------------------------------------------------------------------------------------------------

def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**TINY_FLUX).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in m.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = tiny_flux()
    out = {}
    for kind in ("int4", "fp4"):
        path = tmp_path_factory.mktemp("svdq") / f"svdq-{kind}_r16-tiny-flux.safetensors"
        dense = write_nunchaku_flux(path, model, kind=kind, rank=16, seed=3)
        out[kind] = (str(path), dense)
    return model, out


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def expected_modules(cfg):
    svdq, awq = set(), set()
    for (block, name), m in S.NUNCHAKU_FLUX_MODULES.items():
        n = cfg["num_layers"] if block == "transformer_blocks" else cfg["num_single_layers"]
        for i in range(n):
            (awq if m.quant == "awq" else svdq).add(f"{block}.{i}.{name}")
    return svdq, awq


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_file_layout_is_what_the_reader_requires(written, kind):
    model, out = written
    path, _ = out[kind]
    f = S.read_svdquant_file(path)
    cfg = json.loads(model.to_json_string())
    assert f.config == cfg
    assert f.quant.kind == kind and f.quant.rank == 16 and f.quant.group_size == (64 if kind == "int4" else 16)
    assert f.quant.raw == {"method": "svdquant",
                           "weight": {"dtype": f.quant.weight_dtype,
                                      "scale_dtype": [None, "fp8_e4m3_nan"] if kind == "fp4" else None,
                                      "group_size": f.quant.group_size},
                           "activation": {"dtype": f.quant.weight_dtype,
                                          "scale_dtype": "fp8_e4m3_nan" if kind == "fp4" else None,
                                          "group_size": f.quant.group_size}, "rank": 16}
    assert f.comfy_config["model_class"] == "Flux"
    mc = f.comfy_config["model_config"]
    assert (mc["hidden_size"], mc["num_heads"], mc["depth"], mc["depth_single_blocks"], mc["in_channels"]) == \
        (128, 2, 1, 1, 16)
    assert set(f.metadata) == {"config", "quantization_config", "comfy_config", "model_class"}

    svdq, awq = expected_modules(cfg)
    assert set(f.linears) == svdq and set(f.awq) == awq
    # plain tensors: the non-block diffusers params and the q/k norms under nunchaku's names, nothing else
    sd = model.state_dict()
    plain = {k for k in sd if not k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    for (block, nname), dname in S.NUNCHAKU_FLUX_PLAIN_KEYS.items():
        n = cfg["num_layers"] if block == "transformer_blocks" else cfg["num_single_layers"]
        plain |= {f"{block}.{i}.{nname}.weight" for i in range(n)}
    assert set(f.other) == plain
    assert all(v.dtype == torch.bfloat16 for v in f.other.values())
    # every quantized module carries exactly nunchaku's tensors
    want = {"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up"}
    if kind == "fp4":
        want |= {"wcscales", "wtscale"}
    with safe_open(path, "pt") as fh:
        keys = set(fh.keys())
    for mod in svdq:
        assert {k[len(mod) + 1:] for k in keys if k.rpartition(".")[0] == mod} == want, mod
    for mod in awq:
        assert {k[len(mod) + 1:] for k in keys if k.rpartition(".")[0] == mod} == {"qweight", "wscales", "wzeros",
                                                                                 "bias"}, mod
    assert len(keys) == len(plain) + len(want) * len(svdq) + 4 * len(awq)
    for mod, w in f.linears.items():
        assert w.rank == 16 and w.kind == kind
        info = S.flux_module_info(mod)
        assert w.act_shift == (S.SHIFT_GELU_INT4 if kind == "int4" and info.shifted_input_int4 else 0.0)
        if mod.split(".")[-1].startswith("out_proj"):  # smoothing fused into V: smooth stored as ones
            assert torch.equal(w.smooth_factor(), torch.ones_like(w.smooth_factor()))
            assert not torch.equal(S.unpack_vector(w.smooth_orig), w.smooth_factor())
    # deepcompressor's ConcatLinear keeps the single-block proj_out bias on its LAST part (mlp_fc2)
    assert not f.linears["single_transformer_blocks.0.out_proj"].bias_vector().any()
    assert f.linears["single_transformer_blocks.0.mlp_fc2"].bias_vector().abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_every_module_equals_dense_model(written, kind):
    model, out = written
    path, dense = out[kind]
    f = S.read_svdquant_file(path)
    D = 128
    mods = dict(dense.named_modules())
    g = torch.Generator().manual_seed(7)
    checked = 0
    for mod, w in sorted(f.linears.items()):
        block, idx, name = mod.split(".", 2)
        info = S.flux_module_info(mod)
        lins = [mods[f"{block}.{idx}.{d}"] for d in info.diffusers]
        x = torch.randn(5, w.in_features, generator=g)
        y = w.forward(x, use_kernel=False)
        assert y.dtype == torch.float32 and y.shape == (5, w.out_features)
        if info.fuse == "in_slice":
            lin = lins[0]
            a, z = info.in_slice
            wcols = lin.weight[:, a * D:z * D]
            # the bias-free part of this slice is exactly the dense weight's columns
            y0 = w.forward(torch.zeros(1, w.in_features), use_kernel=False)
            assert rel_err(y - y0, x @ wcols.T) < 1e-5, mod
            checked += 1
            continue
        ref = torch.cat([x @ lin.weight.T + lin.bias for lin in lins], dim=-1)
        assert rel_err(y, ref) < 1e-5, mod
        checked += 1
    assert checked == len(f.linears)

    # single-block proj_out = out_proj(attn) + mlp_fc2(mlp): the split by input columns, biases summed
    op, fc2 = f.linears["single_transformer_blocks.0.out_proj"], f.linears["single_transformer_blocks.0.mlp_fc2"]
    proj = mods["single_transformer_blocks.0.proj_out"]
    xa, xm = torch.randn(4, D, generator=g), torch.randn(4, 4 * D, generator=g)
    ys = op.forward(xa, use_kernel=False) + fc2.forward(xm, use_kernel=False)
    assert rel_err(ys, proj(torch.cat([xa, xm], dim=-1))) < 1e-5

    for mod, a in f.awq.items():
        block, idx, name = mod.split(".", 2)
        lin = mods[f"{block}.{idx}.{S.flux_module_info(mod).diffusers[0]}"]
        wd, bd = a.to_diffusers()
        assert torch.equal(wd, lin.weight.detach()) and torch.equal(bd, lin.bias.detach()), mod
    for k, v in f.other.items():
        parts = k.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            k = f"{parts[0]}.{parts[1]}.{S.NUNCHAKU_FLUX_PLAIN_KEYS[(parts[0], parts[2])]}.{parts[3]}"
        assert torch.equal(dense.state_dict()[k], v.float()), k


def test_int4_shift_is_in_the_dense_bias(written):
    """The int4 fc2 biases were stored lowered by the GELU shift: the dense bias is not the stored one."""
    _, out = written
    path, dense = out["int4"]
    w = S.read_svdquant_file(path).linears["transformer_blocks.0.mlp_fc2"]
    dense_b = dict(dense.named_modules())["transformer_blocks.0.ff.net.2"].bias.detach()
    assert rel_err(w.effective_bias(), dense_b) < 1e-5
    assert (w.bias_vector().float() - dense_b).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_dense_model_is_a_plausible_4bit_copy(written, kind):
    """Round-to-nearest 4-bit of (W * smooth - low-rank): each dense weight stays close to the original (the V rows
    and out_proj columns carry the fused attention-output smoothing, so compare their product's scale only)."""
    model, out = written
    _, dense = out[kind]
    src, got = model.state_dict(), dense.state_dict()
    assert got.keys() == src.keys() and all(v.dtype == torch.float32 for v in got.values())
    for k in src:
        if k.endswith("to_v.weight") or k.endswith("add_v_proj.weight") or "to_out" in k or "to_add_out" in k \
                or k.endswith("proj_out.weight") or k.endswith("to_v.bias") or k.endswith("add_v_proj.bias"):
            continue
        err = float((got[k] - src[k]).norm() / src[k].norm().clamp_min(1e-12))
        assert err < 0.2, (k, err)
    x = torch.randn(3, 128)
    for blk in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        ref = src[f"{blk}.to_v.weight"]
        mv = got[f"{blk}.to_v.weight"]
        out_w = got["transformer_blocks.0.attn.to_out.0.weight"] if blk.startswith("transformer") \
            else got["single_transformer_blocks.0.proj_out.weight"][:, :128]
        ref_out = src["transformer_blocks.0.attn.to_out.0.weight"] if blk.startswith("transformer") \
            else src["single_transformer_blocks.0.proj_out.weight"][:, :128]
        err = float(((x @ mv.T) @ out_w.T - (x @ ref.T) @ ref_out.T).norm() / ((x @ ref.T) @ ref_out.T).norm())
        assert err < 0.3, (blk, err)
