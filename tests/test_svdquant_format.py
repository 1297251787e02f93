"""nunchaku SVDQuant format: unpacking checked against nunchaku's own packer (fixture made by
scripts/make_svdquant_fixture.py from a nunchaku checkout), dense semantics, GPU gating, the file reader.

Torch only; no ComfyUI, no nunchaku needed."""

from __future__ import annotations

import json
import os
import re
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dcgen_core.shared.quant import svdquant as S
from dcgen_core.shared.errors import DCGenError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "svdquant_packing.safetensors")
SVDQ_CASES = ["int4_a", "int4_b", "fp4_a", "fp4_b"]
# e2m1, written out independently of dcgen_core: sign bit 3, exponent bits 2..1, mantissa bit 0
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
SHIFT = 0.171875  # nunchaku src/kernels/zgemm/gemm_w4a4_launch_impl.cuh SHIFT_GELU


@pytest.fixture(scope="module")
def fx():
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    return tensors, meta


def part(fx, case, which):
    tensors, _ = fx
    pre = f"{case}.{which}."
    return {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}


def weight_from(fx, case, act_shift=0.0):
    pk = part(fx, case, "packed")
    kind = "int4" if case.startswith("int4") else "fp4"
    return S.SVDQuantWeight(qweight=pk["qweight"], wscales=pk["wscales"], smooth=pk["smooth"],
                            lora_down=pk["lora_down"], lora_up=pk["lora_up"], bias=pk["bias"],
                            wcscales=pk.get("wcscales"), wtscale=pk.get("wtscale"), smooth_orig=pk["smooth_orig"],
                            kind=kind, group_size=64 if kind == "int4" else 16, act_shift=act_shift)


def stored_weight_reference(nat, kind, outer=("wcscales", "wtscale")):
    """dequant(qweight) * wcscales * wtscale from the natural tensors: the weight of the SMOOTHED input. ``outer``:
    the fp4 outer scales the layer carries (deepcompressor's files carry one of the two)."""
    codes = nat["codes"]
    vals = codes.float() if kind == "int4" else torch.tensor(E2M1)[codes.long()]
    gs = 64 if kind == "int4" else 16
    w = vals * nat["wscales"].float().repeat_interleave(gs, dim=1)
    if kind == "fp4" and "wcscales" in outer:
        w = w * nat["wcscales"].float()[:, None]
    if kind == "fp4" and "wtscale" in outer:
        w = w * nat["wtscale"].float()
    return w


# ---------------------------------------------------------------------------------------------------------------------
# fixture provenance
# ---------------------------------------------------------------------------------------------------------------------

def test_fixture_made_by_nunchaku_packer(fx):
    _, meta = fx
    assert re.fullmatch(r"[0-9a-f]{40}", meta["nunchaku_commit"])
    assert "packer.py" in meta["nunchaku_files"]
    cases = json.loads(meta["cases"])
    assert set(cases) == set(SVDQ_CASES) | {"awq"}
    assert os.path.getsize(FIXTURE) < 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# unpacking == inverse of nunchaku's packing, exactly
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", SVDQ_CASES)
def test_unpack_recovers_natural_tensors(fx, case):
    nat, pk = part(fx, case, "natural"), part(fx, case, "packed")
    kind = "int4" if case.startswith("int4") else "fp4"
    out, inn = nat["codes"].shape
    # the packed layouts really are permutations (a no-op unpacker could not pass)
    assert not torch.equal(pk["bias"], nat["bias"])
    assert not torch.equal(pk["wscales"].float(), nat["wscales"].float().t().contiguous())
    assert not torch.equal(pk["lora_down"], nat["lora_down"].t().contiguous())
    assert not torch.equal(pk["lora_up"], nat["lora_up"])

    nib = S.unpack_qweight(pk["qweight"])
    assert nib.shape == (out, inn) and int(nib.max()) <= 15
    codes = S.int4_from_nibbles(nib) if kind == "int4" else nib
    assert torch.equal(codes.to(torch.int16), nat["codes"].to(torch.int16))
    scales = S.unpack_wscales(pk["wscales"], 64 if kind == "int4" else 16)
    assert scales.dtype == nat["wscales"].dtype
    assert torch.equal(scales.view(torch.uint8) if kind == "fp4" else scales,
                       nat["wscales"].view(torch.uint8) if kind == "fp4" else nat["wscales"])
    for k in ("bias", "smooth", "smooth_orig") + (("wcscales",) if kind == "fp4" else ()):
        assert torch.equal(S.unpack_vector(pk[k]), nat[k]), k
    assert torch.equal(S.unpack_lowrank(pk["lora_down"], down=True), nat["lora_down"])
    assert torch.equal(S.unpack_lowrank(pk["lora_up"], down=False), nat["lora_up"])

    w = weight_from(fx, case)
    down, up = w.low_rank()
    assert down.shape == (nat["lora_down"].shape[0], inn) and up.shape == (out, nat["lora_up"].shape[1])
    assert torch.equal(down, nat["lora_down"]) and torch.equal(up, nat["lora_up"])
    assert (w.in_features, w.out_features, w.rank) == (inn, out, nat["lora_up"].shape[1])


def test_awq_unpack_and_diffusers_order(fx):
    nat, pk = part(fx, "awq", "natural"), part(fx, "awq", "packed")
    a = S.AWQW4A16Weight(pk["qweight"], pk["wscales"], pk["wzeros"], pk["bias"], adanorm_splits=6)
    assert (a.out_features, a.in_features) == tuple(nat["codes"].shape)
    assert torch.equal(a.codes(), nat["codes"])
    dense = nat["codes"].float() * nat["scales"].float().repeat_interleave(64, dim=1) \
        - 7 * nat["scales"].float().repeat_interleave(64, dim=1)
    torch.testing.assert_close(a.dequantize(), dense, rtol=0, atol=0)
    w, b = a.to_diffusers()
    torch.testing.assert_close(w, nat["weight_diffusers"].float(), rtol=0, atol=0)
    torch.testing.assert_close(b, nat["bias_diffusers"].float(), rtol=0, atol=0)
    assert not torch.equal(pk["bias"].float(), nat["bias_diffusers"].float())  # interleaved and +1


# ---------------------------------------------------------------------------------------------------------------------
# dense semantics
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", SVDQ_CASES)
def test_dequantize_matches_hand_built_reference(fx, case):
    nat = part(fx, case, "natural")
    kind = "int4" if case.startswith("int4") else "fp4"
    ref = stored_weight_reference(nat, kind) / nat["smooth"].float()[None, :]
    got = weight_from(fx, case).dequantize()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert weight_from(fx, case).dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("case", SVDQ_CASES)
@pytest.mark.parametrize("shifted", [False, True])
def test_forward_cpu_matches_formulas(fx, case, shifted):
    nat = part(fx, case, "natural")
    kind = "int4" if case.startswith("int4") else "fp4"
    shift = SHIFT if shifted else 0.0
    w = weight_from(fx, case, act_shift=shift)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, w.in_features, generator=g)
    y = w.forward(x)
    assert y.shape == (2, 5, w.out_features) and y.dtype == torch.float32

    # 1) the dense form from the object's own views
    w_eff = w.dequantize()
    down, up = w.low_rank()
    dense = x @ w_eff.T + (x @ down.float().T) @ up.float().T + w.effective_bias()
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)

    # 2) nunchaku's formula from the natural tensors: quantized branch on (x + shift) / smooth, low-rank on raw x
    stored = stored_weight_reference(nat, kind)
    ref = ((x + shift) / nat["smooth"].float()) @ stored.T \
        + (x @ nat["lora_down"].float().T) @ nat["lora_up"].float().T + nat["bias"].float()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if shifted:  # the shift matters: ignoring it would be visibly wrong
        assert (y - weight_from(fx, case).forward(x)).abs().max() > 1e-2

    yb = w.forward(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_forward_rejects_wrong_width_and_kernel_on_cpu(fx):
    w = weight_from(fx, "int4_a")
    with pytest.raises(DCGenError, match="128 features"):
        w.forward(torch.zeros(1, 64))
    with pytest.raises(DCGenError, match="nunchaku"):
        w.forward(torch.zeros(1, 128), use_kernel=True)


def test_group_size_checked(fx):
    pk = part(fx, "int4_a", "packed")
    with pytest.raises(DCGenError, match="expected group size 64"):
        S.SVDQuantWeight(qweight=pk["qweight"], wscales=pk["wscales"], smooth=pk["smooth"],
                         lora_down=pk["lora_down"], lora_up=pk["lora_up"], kind="int4", group_size=128)


# ---------------------------------------------------------------------------------------------------------------------
# GPU gating
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sm", [75, 80, 86, 89, (8, 9), "sm_86"])
def test_supports_int4(sm):
    assert S.nunchaku_supports("int4", sm)
    assert not S.nunchaku_supports("fp4", sm)


@pytest.mark.parametrize("sm", [120, 121, (12, 0)])
def test_supports_fp4(sm):
    assert S.nunchaku_supports("fp4", sm) and S.nunchaku_supports("fp4_e2m1_all", sm)
    assert S.nunchaku_supports("nvfp4", sm)
    assert not S.nunchaku_supports("int4", sm)


@pytest.mark.parametrize("sm", [61, 70, 87, 90, 100, 103, (9, 0)])
def test_unsupported_gpus(sm):
    assert not S.nunchaku_supports("int4", sm)
    assert not S.nunchaku_supports("fp4", sm)


def test_supports_unknown_kind():
    with pytest.raises(DCGenError, match="int8"):
        S.nunchaku_supports("int8", 89)


@pytest.fixture
def no_nunchaku(monkeypatch):
    real = S.kernels.importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name == "nunchaku" or name.startswith("nunchaku."):
            return None
        return real(name, *a, **k)

    monkeypatch.setattr(S.kernels.importlib.util, "find_spec", find_spec)


def test_require_nunchaku_not_installed_and_cpu(no_nunchaku):
    with pytest.raises(DCGenError) as e:
        S.require_nunchaku("cpu")
    msg = str(e.value)
    assert "not installed" in msg and "github.com/nunchaku-tech/nunchaku/releases" in msg
    assert "unrelated" in msg  # warns off the PyPI project of the same name
    assert "'cpu'" in msg


def test_require_nunchaku_really_absent_here():
    try:
        import nunchaku  # noqa: F401
        pytest.skip("a nunchaku package is installed here")
    except ImportError:
        pass
    with pytest.raises(DCGenError, match="not installed"):
        S.require_nunchaku("cpu", "int4")


def test_require_nunchaku_detects_impostor(tmp_path, monkeypatch):
    pkg = tmp_path / "nunchaku"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '0.0.1'  # some other project\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m == "nunchaku" or m.startswith("nunchaku.")]:
        monkeypatch.delitem(sys.modules, m)
    with pytest.raises(DCGenError) as e:
        S.require_nunchaku("cpu")
    msg = str(e.value)
    assert "not nunchaku's SVDQuant engine" in msg and str(pkg) in msg and "nunchaku.ops" in msg


@pytest.fixture
def fake_nunchaku(monkeypatch):
    ops = types.SimpleNamespace(gemm_w4a4=None, quantize_w4a4_act_fuse_lora=None, location="fake")
    monkeypatch.setattr(S.kernels, "_import_nunchaku", lambda: (ops, None))
    return ops


def fake_gpu(monkeypatch, cap, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_require_nunchaku_cpu_only(fake_nunchaku):
    with pytest.raises(DCGenError) as e:
        S.require_nunchaku("cpu", "fp4")
    msg = str(e.value)
    assert "'cpu'" in msg and "not installed" not in msg


def test_require_nunchaku_unsupported_gpu(fake_nunchaku, monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    with pytest.raises(DCGenError) as e:
        S.require_nunchaku("cuda:0", "int4")
    msg = str(e.value)
    assert "sm 90" in msg and "75/80/86/89" in msg and "H200" in msg
    fake_gpu(monkeypatch, (10, 0), "NVIDIA B200")
    with pytest.raises(DCGenError, match=r"120/121 for fp4.*sm 100"):
        S.require_nunchaku("cuda", "fp4")
    fake_gpu(monkeypatch, (8, 9), "NVIDIA RTX 4090")
    assert S.require_nunchaku("cuda", "int4") is fake_nunchaku
    with pytest.raises(DCGenError, match="sm 89"):  # an int4 GPU cannot run an fp4 file
        S.require_nunchaku("cuda", "fp4")


# ---------------------------------------------------------------------------------------------------------------------
# the file reader
# ---------------------------------------------------------------------------------------------------------------------

FLUX_CONFIG = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.35.0", "attention_head_dim": 128,
               "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
               "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
               "pooled_projection_dim": 768}


def quant_config(kind):
    fp4 = kind == "fp4"
    d = "fp4_e2m1_all" if fp4 else "int4"
    gs = 16 if fp4 else 64
    return {"method": "svdquant", "weight": {"dtype": d, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                                              "group_size": gs},
            "activation": {"dtype": d, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": gs}, "rank": 32}


def write_nunchaku_file(path, fx, kind="int4", drop=(), qc=None, metadata_extra=None):
    """The packing fixture's layers in a file as deepcompressor's converter lays them out: fp4 layers with ONE outer
    scale (as its per-tensor mode writes them: the fused qkv_proj wcscales, the others wtscale), the AdaLN scales
    with the ceil(in/64) rows nunchaku's loader reads (the fixture holds TinyChat's padded 16)."""
    a, b = f"{kind}_a", f"{kind}_b"
    sd = {}
    for module, case in (("transformer_blocks.0.qkv_proj", a), ("transformer_blocks.0.mlp_context_fc2", b),
                         ("single_transformer_blocks.0.mlp_fc2", b), ("single_transformer_blocks.0.out_proj", a)):
        unused = "wtscale" if module.endswith("qkv_proj") else "wcscales"
        for k, v in part(fx, case, "packed").items():
            if f"{module}.{k}" not in drop and k != unused:
                sd[f"{module}.{k}"] = v
    for k, v in part(fx, "awq", "packed").items():
        sd[f"transformer_blocks.0.norm1.linear.{k}"] = v[:128 // 64] if k in ("wscales", "wzeros") else v
    plain = {"x_embedder.weight": torch.randn(128, 64).to(torch.bfloat16),
             "x_embedder.bias": torch.zeros(128, dtype=torch.bfloat16),
             "transformer_blocks.0.norm_q.weight": torch.ones(128, dtype=torch.bfloat16),
             "single_transformer_blocks.0.norm_k.weight": torch.ones(128, dtype=torch.bfloat16),
             "norm_out.linear.weight": torch.randn(256, 128).to(torch.bfloat16),
             "proj_out.weight": torch.randn(64, 128).to(torch.bfloat16)}
    sd.update(plain)
    meta = {"config": json.dumps(FLUX_CONFIG), "comfy_config": json.dumps({"model_class": "Flux"}),
            "model_class": "NunchakuFluxTransformer2dModel",
            "quantization_config": json.dumps(quant_config(kind) if qc is None else qc)}
    meta.update(metadata_extra or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return plain


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_read_svdquant_file(fx, tmp_path, kind):
    path = tmp_path / f"svdq-{kind}_r32-flux.safetensors"
    plain = write_nunchaku_file(path, fx, kind)
    f = S.read_svdquant_file(str(path))
    assert f.config == FLUX_CONFIG and f.comfy_config == {"model_class": "Flux"}
    assert (f.quant.kind, f.quant.group_size, f.quant.rank) == (kind, 64 if kind == "int4" else 16, 32)
    assert f.quant.weight_dtype == ("int4" if kind == "int4" else "fp4_e2m1_all")
    assert set(f.linears) == {"transformer_blocks.0.qkv_proj", "transformer_blocks.0.mlp_context_fc2",
                              "single_transformer_blocks.0.mlp_fc2", "single_transformer_blocks.0.out_proj"}
    assert set(f.awq) == {"transformer_blocks.0.norm1.linear"}
    assert f.awq["transformer_blocks.0.norm1.linear"].adanorm_splits == 6
    assert set(f.other) == set(plain)
    for k, v in plain.items():
        assert torch.equal(f.other[k], v)

    qkv = f.linears["transformer_blocks.0.qkv_proj"]
    assert (qkv.kind, qkv.in_features, qkv.out_features, qkv.rank) == (kind, 128, 256, 32)
    assert qkv.act_shift == 0.0 and qkv.smooth_orig is not None
    nat = part(fx, f"{kind}_a", "natural")
    ref = stored_weight_reference(nat, kind, outer=("wcscales",)) / nat["smooth"].float()[None, :]
    torch.testing.assert_close(qkv.dequantize(), ref, rtol=1e-6, atol=0)
    out_proj = f.linears["single_transformer_blocks.0.out_proj"]
    ref = stored_weight_reference(nat, kind, outer=("wtscale",)) / nat["smooth"].float()[None, :]
    torch.testing.assert_close(out_proj.dequantize(), ref, rtol=1e-6, atol=0)
    assert f.awq["transformer_blocks.0.norm1.linear"].wscales.shape == (2, 192)
    fc2 = f.linears["transformer_blocks.0.mlp_context_fc2"]
    single_fc2 = f.linears["single_transformer_blocks.0.mlp_fc2"]
    expected_shift = SHIFT if kind == "int4" else 0.0  # only int4 fc2 inputs are shifted GELU outputs
    assert fc2.act_shift == expected_shift and single_fc2.act_shift == expected_shift
    assert f.linears["single_transformer_blocks.0.out_proj"].act_shift == 0.0
    if kind == "fp4":
        assert qkv.wcscales is not None and qkv.wtscale is None and qkv.tensor_scale() == 1.0
        assert out_proj.wcscales is None and out_proj.tensor_scale() == pytest.approx(0.0123, rel=1e-2)


def test_module_table():
    m = S.NUNCHAKU_FLUX_MODULES
    assert m[("transformer_blocks", "qkv_proj")].diffusers == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert m[("transformer_blocks", "qkv_proj_context")].diffusers == (
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
    assert m[("transformer_blocks", "out_proj_context")].diffusers == ("attn.to_add_out",)
    assert m[("transformer_blocks", "mlp_context_fc2")].diffusers == ("ff_context.net.2",)
    out_proj, fc2 = m[("single_transformer_blocks", "out_proj")], m[("single_transformer_blocks", "mlp_fc2")]
    assert out_proj.diffusers == fc2.diffusers == ("proj_out",)
    assert (out_proj.fuse, out_proj.in_slice, fc2.in_slice) == ("in_slice", (0, 1), (1, 5))
    assert m[("single_transformer_blocks", "mlp_fc1")].diffusers == ("proj_mlp",)
    assert S.flux_module_info("single_transformer_blocks.37.norm.linear").adanorm_splits == 3
    assert S.flux_module_info("x_embedder") is None


def test_plain_flux_file_is_refused(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(128, 128, dtype=torch.bfloat16),
               "x_embedder.weight": torch.zeros(128, 64, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(DCGenError) as e:
        S.read_svdquant_file(str(path))
    msg = str(e.value)
    assert str(path) in msg and "expected a nunchaku SVDQuant file" in msg and "no qweight" in msg


def test_missing_wscales_is_refused(fx, tmp_path):
    path = tmp_path / "broken.safetensors"
    write_nunchaku_file(path, fx, "int4", drop=("transformer_blocks.0.qkv_proj.wscales",))
    with pytest.raises(DCGenError) as e:
        S.read_svdquant_file(str(path))
    msg = str(e.value)
    assert str(path) in msg and "transformer_blocks.0.qkv_proj" in msg and "missing wscales" in msg


def test_missing_lora_up_is_refused(fx, tmp_path):
    path = tmp_path / "broken.safetensors"
    write_nunchaku_file(path, fx, "int4", drop=("single_transformer_blocks.0.out_proj.lora_up",))
    with pytest.raises(DCGenError, match="has lora_down but no lora_up"):
        S.read_svdquant_file(str(path))


def test_no_quantization_config_is_refused(fx, tmp_path):
    path = tmp_path / "transformer_blocks.safetensors"
    write_nunchaku_file(path, fx, "int4", metadata_extra={"quantization_config": None})
    with pytest.raises(DCGenError) as e:
        S.read_svdquant_file(str(path))
    assert str(path) in str(e.value) and "quantization_config" in str(e.value)


def test_unsupported_weight_dtype_is_refused(fx, tmp_path):
    path = tmp_path / "w8.safetensors"
    qc = quant_config("int4")
    qc["weight"]["dtype"] = "int8"
    write_nunchaku_file(path, fx, "int4", qc=qc)
    with pytest.raises(DCGenError, match=r"expected quantization_config weight dtype .*found 'int8'"):
        S.read_svdquant_file(str(path))


def test_config_that_contradicts_tensors_is_refused(fx, tmp_path):
    path = tmp_path / "mislabelled.safetensors"
    write_nunchaku_file(path, fx, "int4", qc=quant_config("fp4"))  # int4 tensors, fp4 label
    with pytest.raises(DCGenError, match="float8_e4m3fn"):
        S.read_svdquant_file(str(path))


def test_module_without_lowrank_branch(fx, tmp_path):
    path = tmp_path / "nolora.safetensors"
    write_nunchaku_file(path, fx, "int4", drop=("transformer_blocks.0.qkv_proj.lora_down",
                                                "transformer_blocks.0.qkv_proj.lora_up"))
    w = S.read_svdquant_file(str(path)).linears["transformer_blocks.0.qkv_proj"]
    assert w.rank == 0
    down, up = w.low_rank()
    assert down.shape == (0, 128) and up.shape == (256, 0)
    x = torch.randn(3, 128)
    torch.testing.assert_close(w.forward(x), x @ w.dequantize().T + w.effective_bias(), rtol=1e-5, atol=1e-5)
