"""tests/svdquant_pack.py (the test-side WRITER of nunchaku SVDQuant FLUX files): its packers reproduce nunchaku's own
packing bit-exactly (tests/fixtures/svdquant_packing.safetensors), its converter and merge reproduce what
deepcompressor's converter and nunchaku's merge_safetensors wrote for the same inputs, tensor for tensor
(tests/fixtures/svdquant_converter.json), its files meet nunchaku's loader's shape rules, and a written tiny FLUX
reads back through dcgen_core.shared.quant.svdquant.read_svdquant_file as exactly the dense model the writer returns.
Torch + diffusers only."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import svdquant_pack as P
from dcgen_core.shared.quant import svdquant as S
from svdquant_pack import (pack_awq_qweight, pack_awq_scales, pack_lowrank, pack_qweight, pack_vector, pack_wscales,
                           write_nunchaku_flux)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "svdquant_packing.safetensors")
CONVERTER = os.path.join(os.path.dirname(__file__), "fixtures", "svdquant_converter.json")
SVDQ_CASES = ["int4_a", "int4_b", "fp4_a", "fp4_b"]
CASES = list(P.CASES)  # int4 r32, fp4 r32 per-channel scale, fp4 r128 per-tensor scale, schnell int4 r32

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
# converter + merge == deepcompressor's + nunchaku's (fixture), tensor for tensor
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converter():
    with open(CONVERTER, encoding="utf-8") as fh:
        return json.load(fh)


def test_converter_fixture_provenance(converter):
    assert re.fullmatch(r"[0-9a-f]{40}", converter["deepcompressor_commit"])
    assert re.fullmatch(r"[0-9a-f]{40}", converter["nunchaku_commit"])
    assert "backend/nunchaku/convert.py" in converter["deepcompressor_files"]
    assert "merge_safetensors.py" in converter["nunchaku_files"]
    assert set(converter["cases"]) == set(P.CASES)
    for case, c in converter["cases"].items():
        assert c["spec"] == P.CASES[case] and c["config"] == P.case_config(case)
    assert os.path.getsize(CONVERTER) < 200 * 1024


@pytest.mark.parametrize("case", CASES)
def test_writer_converts_and_merges_as_deepcompressor_and_nunchaku(converter, case):
    """The fixture's inputs through this writer: the same two files, every tensor bit for bit, the same header."""
    c = converter["cases"][case]
    spec, cfg = P.CASES[case], P.case_config(case)
    ckpt = P.deepcompressor_checkpoint(P.synthetic_weights(cfg, c["seed"]), cfg, spec["kind"], spec["rank"],
                                       spec["scales"], c["seed"])
    blocks, unquantized, _ = P.convert(ckpt, float_point=spec["kind"] == "fp4")
    assert sorted(blocks) == c["files"]["transformer_blocks.safetensors"]
    assert sorted(unquantized) == c["files"]["unquantized_layers.safetensors"]
    merged = {**unquantized, **blocks}
    differ = {k: (P.manifest_entry(merged[k]), want) for k, want in c["tensors"].items()
              if P.manifest_entry(merged[k]) != want}
    assert not differ, f"{len(differ)} tensors differ from the converter's, e.g. {list(differ.items())[:3]}"
    assert P.merge_metadata(blocks, unquantized, P.folder_texts(cfg)) == c["metadata"]
    # the one deliberate difference: TinyChat pads the AdaLN scales at this width; nunchaku loads ceil(in/64) rows
    assert c["converter_padded_shapes"]
    for k, padded in c["converter_padded_shapes"].items():
        in_features = merged[k.rsplit(".", 1)[0] + ".qweight"].shape[1] * 2
        assert padded == [P.awq_num_groups(in_features), merged[k].shape[1]] and merged[k].shape[0] == in_features // 64
    assert P.awq_num_groups(3072) == 3072 // 64  # FLUX.1's width: the converter writes no padding there


# ---------------------------------------------------------------------------------------------------------------------
# written FLUX files: nunchaku's loader rules, the reader, the dense model
# ---------------------------------------------------------------------------------------------------------------------

def tiny_flux(case, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**P.case_config(case)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in m.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = {}
    for case, spec in P.CASES.items():
        model = tiny_flux(case)
        path = tmp_path_factory.mktemp("svdq") / f"svdq-{case}-tiny-flux.safetensors"
        dense = write_nunchaku_flux(path, model, kind=spec["kind"], rank=spec["rank"], seed=3, scales=spec["scales"])
        out[case] = (model, str(path), dense)
    return out


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


def modules_of(keys):
    mods = {}
    for k in keys:
        mod, _, param = k.rpartition(".")
        mods.setdefault(mod, set()).add(param)
    return mods


@pytest.mark.parametrize("case", CASES)
def test_written_file_is_what_nunchaku_writes_and_loads(written, converter, case):
    """The tensor set, dtypes and shapes of the converter's file for this case, and nunchaku's loader rules: AdaLN
    scales of ceil(in/64) rows (src/Linear.cpp GEMV_AWQ, models/linear.py AWQW4A16Linear), fp4 layers with ONE of
    wcscales / wtscale (deepcompressor writes the outer scale under one key), int4 layers with neither."""
    _, path, _ = written[case]
    spec = P.CASES[case]
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    want = {k: e.split(" ")[:2] for k, e in converter["cases"][case]["tensors"].items()}
    got = {k: P.manifest_entry(v).split(" ")[:2] for k, v in tensors.items()}
    assert got == want
    assert set(meta) == {"config", "comfy_config", "model_class", "quantization_config"}
    assert json.loads(meta["quantization_config"]) == P.quantization_config_for(spec["kind"], spec["rank"])
    assert meta["model_class"] == "NunchakuFluxTransformer2dModel"
    outer_keys = set()
    for mod, params in modules_of(tensors).items():
        if "qweight" not in params:
            continue
        qw = tensors[f"{mod}.qweight"]
        if qw.dtype == torch.int32:  # AWQ W4A16 AdaLN
            out, inn = qw.shape[0] * 4, qw.shape[1] * 2
            assert params == {"qweight", "wscales", "wzeros", "bias"}, mod
            for k in ("wscales", "wzeros"):
                assert list(tensors[f"{mod}.{k}"].shape) == [-(-inn // 64), out], (mod, k)
            continue
        out, inn = qw.shape[0], qw.shape[1] * 2
        outer = params & {"wcscales", "wtscale"}
        assert params - outer == {"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up"}, mod
        assert len(outer) == (1 if spec["kind"] == "fp4" else 0), (mod, outer)
        outer_keys |= {(mod.split(".", 2)[2], o) for o in outer}
        if "wcscales" in outer:
            assert tensors[f"{mod}.wcscales"].dtype == torch.bfloat16 and tensors[f"{mod}.wcscales"].shape == (out,)
        if "wtscale" in outer:
            assert tensors[f"{mod}.wtscale"].dtype == torch.bfloat16 and tensors[f"{mod}.wtscale"].shape == (1,)
        g = 16 if spec["kind"] == "fp4" else 64
        assert tensors[f"{mod}.wscales"].shape == (inn // g, out)
        assert tensors[f"{mod}.wscales"].dtype == (torch.float8_e4m3fn if g == 16 else torch.bfloat16)
        assert tensors[f"{mod}.lora_down"].shape == (inn, spec["rank"]) and tensors[f"{mod}.lora_up"].shape == (
            out, spec["rank"])
    if spec["scales"] == "channel":
        assert {o for _, o in outer_keys} == {"wcscales"}
    elif spec["scales"] == "tensor":  # per-tensor scales of the fused q/k/v become one per-channel scale
        assert {m for m, o in outer_keys if o == "wcscales"} == {"qkv_proj", "qkv_proj_context"}
        assert ("out_proj", "wtscale") in outer_keys and ("mlp_fc2", "wtscale") in outer_keys
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in tensors)
    assert guidance == spec["guidance"] == json.loads(meta["config"])["guidance_embeds"]


@pytest.mark.parametrize("case", ["int4_r32", "fp4_r128_tensor"])
def test_folder_layout_is_the_merged_file_split_in_two(tmp_path, case):
    """nunchaku's pre-v1 folder: transformer_blocks.safetensors (the block tensors) + unquantized_layers.safetensors
    (the rest) + config.json + comfy_config.json, no header metadata: what merge_safetensors merges. The reader
    reads the folder as the merged file: the same tensors and the header merge_safetensors writes."""
    spec = P.CASES[case]
    model = tiny_flux(case)
    merged_path, folder = tmp_path / "merged.safetensors", tmp_path / f"svdq-{case}-flux"
    kw = {"kind": spec["kind"], "rank": spec["rank"], "scales": spec["scales"], "seed": 5}
    d1 = write_nunchaku_flux(merged_path, model, **kw)
    d2 = write_nunchaku_flux(folder, model, layout="folder", **kw)
    assert sorted(os.listdir(folder)) == ["comfy_config.json", "config.json", "transformer_blocks.safetensors",
                                          "unquantized_layers.safetensors"]
    with safe_open(str(merged_path), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    blocks, unq = (load_file(str(folder / n)) for n in ("transformer_blocks.safetensors",
                                                       "unquantized_layers.safetensors"))
    for n in ("transformer_blocks.safetensors", "unquantized_layers.safetensors"):
        with safe_open(str(folder / n), "pt") as f:
            assert not f.metadata()
    assert all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in blocks)
    assert not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in unq)
    assert set(blocks) | set(unq) == set(merged) and not set(blocks) & set(unq)
    assert all(torch.equal(v.view(torch.uint8), merged[k].view(torch.uint8)) for k, v in {**blocks, **unq}.items())
    assert (folder / "config.json").read_text() == meta["config"]
    assert (folder / "comfy_config.json").read_text() == meta["comfy_config"]
    assert all(torch.equal(a, b) for a, b in zip(d1.state_dict().values(), d2.state_dict().values()))

    from_file, from_folder = S.read_svdquant_file(str(merged_path)), S.read_svdquant_file(str(folder))
    assert from_folder.metadata == from_file.metadata == meta
    assert (from_folder.quant.kind, from_folder.quant.rank, from_folder.config, from_folder.comfy_config) == (
        spec["kind"], spec["rank"], from_file.config, from_file.comfy_config)
    assert set(from_folder.linears) == set(from_file.linears) and set(from_folder.awq) == set(from_file.awq)
    for mod, w in from_folder.linears.items():
        assert torch.equal(w.dequantize(), from_file.linears[mod].dequantize()), mod
    assert all(torch.equal(v, from_file.other[k]) for k, v in from_folder.other.items())
    assert from_folder.path == str(folder)


@pytest.mark.parametrize("case", CASES)
def test_file_layout_is_what_the_reader_requires(written, case):
    model, path, _ = written[case]
    spec = P.CASES[case]
    kind = spec["kind"]
    f = S.read_svdquant_file(path)
    cfg = json.loads(model.to_json_string())
    assert f.config == cfg
    assert f.quant.kind == kind and f.quant.rank == spec["rank"] and f.quant.group_size == (64 if kind == "int4"
                                                                                          else 16)
    assert f.quant.raw == P.quantization_config_for(kind, spec["rank"])
    assert f.comfy_config["model_class"] == "Flux"
    mc = f.comfy_config["model_config"]
    assert (mc["hidden_size"], mc["num_heads"], mc["depth"], mc["depth_single_blocks"], mc["in_channels"],
            mc["guidance_embed"]) == (128, 2, 1, 1, 16, spec["guidance"])

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
    for mod, w in f.linears.items():
        assert w.rank == spec["rank"] and w.kind == kind
        info = S.flux_module_info(mod)
        assert w.act_shift == (S.SHIFT_GELU_INT4 if kind == "int4" and info.shifted_input_int4 else 0.0)
        # the shipped smoothing (fuse_when_possible: false): every layer divides by its own factor
        assert torch.equal(S.unpack_vector(w.smooth_orig), w.smooth_factor()), mod
        assert not torch.equal(w.smooth_factor(), torch.ones_like(w.smooth_factor())), mod
    # deepcompressor's ConcatLinear keeps the single-block proj_out bias on its LAST part (mlp_fc2)
    assert not f.linears["single_transformer_blocks.0.out_proj"].bias_vector().any()
    assert f.linears["single_transformer_blocks.0.mlp_fc2"].bias_vector().abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_every_module_equals_dense_model(written, case):
    _, path, dense = written[case]
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
    """The int4 fc2 biases were stored lowered by the GELU shift (ShiftedLinear, then the converter's low-rank
    term): the dense bias is not the stored one."""
    _, path, dense = written["int4_r32"]
    w = S.read_svdquant_file(path).linears["transformer_blocks.0.mlp_fc2"]
    dense_b = dict(dense.named_modules())["transformer_blocks.0.ff.net.2"].bias.detach()
    assert rel_err(w.effective_bias(), dense_b) < 1e-5
    assert (w.bias_vector().float() - dense_b).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_dense_model_is_a_plausible_4bit_copy(written, case):
    """Round-to-nearest 4-bit of (W * smooth - low-rank): each dense weight stays close to the original. The int4
    MLP down projections' biases carry what the GELU shift folding leaves: deepcompressor's ShiftedLinear lowers the
    bias by W @ shift with the ORIGINAL W, nunchaku's kernel adds it back with the quantized one, so the dense bias
    is b - shift * (W - W_dense).sum(1)."""
    model, _, dense = written[case]
    src, got = model.state_dict(), dense.state_dict()
    assert got.keys() == src.keys() and all(v.dtype == torch.float32 for v in got.values())
    shifted = {"transformer_blocks.0.ff.net.2": slice(None), "transformer_blocks.0.ff_context.net.2": slice(None),
               "single_transformer_blocks.0.proj_out": slice(128, None)}
    for k in src:
        module = k.rsplit(".", 1)[0]
        if P.CASES[case]["kind"] == "int4" and k.endswith(".bias") and module in shifted:
            cols = shifted[module]
            w_src = src[f"{module}.weight"].to(torch.bfloat16).float()[:, cols]
            expect = src[k] - S.SHIFT_GELU_INT4 * (w_src - got[f"{module}.weight"][:, cols]).sum(1)
            assert rel_err(got[k], expect) < 2e-2, k
            assert rel_err(got[k], src[k]) > 0.05, k  # the effect is real at this width
            continue
        err = float((got[k] - src[k]).norm() / src[k].norm().clamp_min(1e-12))
        assert err < 0.2, (k, err)
