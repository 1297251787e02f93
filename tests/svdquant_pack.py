"""Pure-torch WRITER of nunchaku SVDQuant FLUX files, for tests: what deepcompressor's converter and nunchaku's
merge_safetensors write, re-done in torch (neither is importable here: deepcompressor is not packaged, nunchaku
imports its CUDA extension).

The chain, as the real tools run it (deepcompressor 69f3473 backend/nunchaku/convert.py + utils.py +
backend/tinychat/utils.py; nunchaku 3a3cc3d merge_safetensors.py):

1. :func:`deepcompressor_checkpoint`: a diffusers FLUX -> what deepcompressor's PTQ saves (``model.pt`` with
   fake-quantized weights in the smoothed domain, ``scale.pt``, ``smooth.pt``, ``branch.pt``), by round-to-nearest
   with random smoothing and a random low-rank branch (a stand-in for calibration). Names as deepcompressor's
   patched model has them: single-block ``proj_out`` split into ``proj_out.linears.0/1`` (ConcatLinear, bias on
   the last), and for int4 (svdquant/int4.yaml: shift_activations) the MLP down projections wrapped in
   ShiftedLinear (``.linear`` + ``.shift`` = 0.171875). Smoothing as the shipped config (__default__.yaml
   fuse_when_possible: false): out_proj keeps its own smooth. Scales: int4 group 64 (int4.yaml); fp4
   (nvfp4.yaml) e2m1 with fp8 group-16 scales under a per-channel (``scales="channel"``) or per-tensor
   (``scales="tensor"``, nvfp4.yaml's [-1, -1]) scale; the AdaLN linears int4 group 64 (extra_wgts).
2. :func:`convert`: convert_to_nunchaku_flux_state_dicts -> ``transformer_blocks.safetensors`` tensors and
   ``unquantized_layers.safetensors`` tensors. Per W4A4 linear: qweight, wscales, bias, smooth, smooth_orig,
   lora_down, lora_up, and for fp4 exactly one of wcscales (per-channel scale, or per-tensor scales of a fused
   qkv concatenated) / wtscale (per-tensor scale of a single linear). Per AdaLN linear: qweight, wscales,
   wzeros, bias. One deliberate difference: TinyChat pads the AdaLN scales to ``ceil_num_groups`` rows, while
   nunchaku's loaders (src/Linear.cpp GEMV_AWQ, models/linear.py AWQW4A16Linear) allocate ceil(in/64) rows and
   refuse other shapes; the two agree for every in_features that is a multiple of 1024 (FLUX.1: 3072), not at
   the tests' width 128, where this writer writes the loader's ceil(in/64) rows.
3. :func:`merge_metadata` / :func:`write_nunchaku_flux`: nunchaku's merge_safetensors (one file: the two parts'
   tensors + header metadata config, comfy_config, model_class, quantization_config), or the pre-v1 folder
   (``layout="folder"``: the two files, config.json, comfy_config.json) the merge reads.

tests/fixtures/svdquant_converter.json holds what the REAL converter + merge wrote (scripts/
make_svdquant_converter_fixture.py) for :func:`synthetic_weights` inputs: tests/test_svdquant_pack.py checks
this writer against it tensor by tensor. Those inputs come from an integer hash, not torch's RNG, so that they are
the same bits on any machine; the only BLAS calls on the way are two float64 matmuls (low-rank residual, shift
term), whose last-bit differences between BLAS builds practically never survive the bf16 / 4-bit rounding after.
The packers below are checked bit-exactly against nunchaku's own packer (tests/fixtures/svdquant_packing
.safetensors).

:func:`write_nunchaku_flux` returns the EXACT dense equivalent of what it wrote (weight-only math).
torch + safetensors + diffusers only (plus dcgen_core.shared.quant.svdquant's constants).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import torch
from safetensors.torch import save_file

from dcgen_core.shared.quant.svdquant import SHIFT_GELU_INT4

__all__ = [
    "CASES",
    "E2M1",
    "GROUP",
    "TINY_FLUX",
    "awq_num_groups",
    "case_config",
    "comfy_config_for",
    "convert",
    "deepcompressor_checkpoint",
    "dense_state_dict",
    "folder_texts",
    "manifest_entry",
    "merge_metadata",
    "pack_awq_qweight",
    "pack_awq_scales",
    "pack_lowrank",
    "pack_qweight",
    "pack_vector",
    "pack_wscales",
    "quantization_config_for",
    "synthetic_weights",
    "write_nunchaku_flux",
]

#: e2m1 code -> value (bit 3 sign, bits 2..1 exponent, bit 0 mantissa)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = {"int4": 64, "fp4": 16}
_FP8_MAX = 448.0
_BF = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# packers (NunchakuWeightPacker(bits=4, warp_n=128) layouts, written forwards: natural -> tiled)
# ---------------------------------------------------------------------------------------------------------------------

def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[out, in]`` (int4 -8..7 two's complement, or e2m1 / nibble codes 0..15) -> int8 ``[out, in/2]``.

    out splits as (n_tiles, num_n_packs 8, n_pack 2, n_lanes 8, reg_n 1), in as (k_tiles, num_k_packs 1, k_pack 2,
    k_lanes 4, reg_k 8); tiles are reordered (n_tiles, k_tiles, k_packs, n_packs, n_lanes, k_lanes, n_pack, k_pack,
    reg_n, reg_k) and consecutive elements share a byte, the first in the low nibble."""
    n, k = codes.shape
    assert n % 128 == 0 and k % 128 == 0, f"qweight: out must be a multiple of 128 and in of 128, got {n} x {k}"
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    t = nib.reshape(n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8).permute(0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
    flat = t.contiguous().reshape(-1, 2)
    return (flat[:, 0] | (flat[:, 1] << 4)).view(torch.int8).reshape(n, k // 2)


def pack_wscales(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group scales ``[out, in/G]`` -> packed ``[in/G, out]`` (same dtype). ``group_size`` 16 = fp8 micro-scale layout
    (pack_micro_scale), anything else (64, or -1 for per-channel vectors) = pack_scale's 16-bit layout."""
    n, ng = scales.shape
    assert n % 128 == 0, f"wscales: out must be a multiple of 128, got {n}"
    if group_size == 16:
        assert ng % 4 == 0
        # out = (n_tiles, packs 1, s_pack 4, 4, 8), groups = (k_tiles, 4 per mma k-step)
        t = scales.reshape(n // 128, 1, 4, 4, 8, ng // 4, 4).permute(0, 5, 1, 4, 3, 2, 6)
    else:
        # out = (n_tiles, packs 1, lanes/4 8, s_pack/2 2, 4, 2), then the groups
        t = scales.reshape(n // 128, 1, 8, 2, 4, 2, ng).permute(0, 6, 1, 2, 4, 3, 5)
    return t.contiguous().reshape(ng, n)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """Per-channel vector ``[n]`` (bias, smooth, smooth_orig, wcscales) -> packed ``[n]``."""
    return pack_wscales(v.reshape(-1, 1), group_size=-1).reshape(-1)


def pack_lowrank(m: torch.Tensor, down: bool) -> torch.Tensor:
    """``lora_down [rank, in]`` -> ``[in, rank]`` (down=True); ``lora_up [out, rank]`` -> ``[out, rank]``: 16 x 16
    fragments, each in (n_lanes 8, k_lanes 4, n_pack 2, k_pack 2, 2) register order."""
    if down:
        r, c = m.shape
        frags = m.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)   # (c_frags, r_frags, 16, 16)
    else:
        c, r = m.shape
        frags = m.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    t = frags.reshape(c // 16, r // 16, 2, 8, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return t.contiguous().reshape(c, r)


def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """AWQ codes ``[out, in]`` (0..15, zero point 7) -> int32 ``[out/4, in/2]``: each int16 word holds elements
    t, t+8, t+16, t+24 of a run of 32 (low nibble first), and rows are interleaved by 4 in steps of 16 words."""
    oc, ic = codes.shape
    assert oc % 4 == 0 and ic % 64 == 0, f"AWQ: out must be a multiple of 4 and in of 64, got {oc} x {ic}"
    w = codes.to(torch.int32).reshape(-1, 4, 8)
    words = w[:, 0] | (w[:, 1] << 4) | (w[:, 2] << 8) | (w[:, 3] << 12)          # [oc*ic/32, 8], 0..65535
    words = words.reshape(oc // 4, 4, ic // 64, 16).permute(0, 2, 1, 3).reshape(oc // 4, ic)
    words = torch.where(words >= 32768, words - 65536, words).to(torch.int16)
    return words.contiguous().view(torch.int32)


def awq_num_groups(in_features: int, group_size: int = 64) -> int:
    """TinyChat ceil_num_groups for 4-bit weights: groups padded to a whole number of int32 packs (8 groups),
    that number rounded up to a multiple of 2 for group 64."""
    ng = in_features // group_size
    packs = -(-ng // 8)
    factor = {64: 2, 32: 4}.get(group_size, 1)
    return -(-packs // factor) * factor * 8


def pack_awq_scales(scales: torch.Tensor, in_features: int, group_size: int = 64) -> torch.Tensor:
    """AWQ per-group ``wscales`` / ``wzeros`` ``[out, in/G]`` -> ``[awq_num_groups, out]``, zero padded."""
    oc, ng = scales.shape
    out = torch.zeros(awq_num_groups(in_features, group_size), oc, dtype=scales.dtype)
    out[:ng] = scales.t()
    return out


# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# deterministic inputs
# ---------------------------------------------------------------------------------------------------------------------

_BF = torch.bfloat16
_DB, _SB = "transformer_blocks", "single_transformer_blocks"
_M32 = 0xFFFFFFFF

#: the public nunchaku FLUX variants the tests cover (``scales``: the fp4 scale under the fp8 group scales)
CASES = {
    "int4_r32": {"kind": "int4", "rank": 32, "scales": None, "guidance": True},
    "fp4_r32_channel": {"kind": "fp4", "rank": 32, "scales": "channel", "guidance": True},
    "fp4_r128_tensor": {"kind": "fp4", "rank": 128, "scales": "tensor", "guidance": True},
    "int4_r32_schnell": {"kind": "int4", "rank": 32, "scales": None, "guidance": False},
}


#: the converter fixture's FLUX: every block linear a multiple of nunchaku's 128-wide tiles (hidden 128 = 2 heads x
#: 64, MLP 512, single-block proj_out input 640), one block of each kind
TINY_FLUX = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64,
             "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32, "guidance_embeds": True,
             "axes_dims_rope": [8, 28, 28]}


def case_config(case: str) -> dict:
    return {**TINY_FLUX, "guidance_embeds": CASES[case]["guidance"]}


def manifest_entry(t: torch.Tensor) -> str:
    """"dtype shape sha256[:32]" of a tensor as safetensors stores it, e.g. "bfloat16 384x128 9f2c..."."""
    digest = hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{str(t.dtype).removeprefix('torch.')} {'x'.join(map(str, t.shape))} {digest.hexdigest()[:32]}"


def _uniform(shape, name: str, seed: int) -> torch.Tensor:
    """float32 in [0, 1) from an integer hash of (seed, name, index): the same bits on every machine and torch
    version (integer ops and one exact division only), so that the converter fixture can be checked bit for bit."""
    salt = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")
    x = (torch.arange(math.prod(shape), dtype=torch.int64) * 0x9E3779B1 + salt) & _M32
    for mult, shift in ((0x7FEB352D, 15), (0x5BD1E995, 13)):  # constants < 2**31: products stay below 2**63
        x = ((x ^ (x >> 16)) * mult) & _M32
        x = x ^ (x >> shift)
    return (x.to(torch.float64) / 2.0 ** 32).to(torch.float32).reshape(shape)


def _signed(shape, name, seed, scale: float) -> torch.Tensor:
    return (_uniform(shape, name, seed) * 2 - 1) * scale


def synthetic_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights for every parameter of a diffusers FluxTransformer2DModel(**config), from :func:`_uniform`."""
    from diffusers import FluxTransformer2DModel

    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer2DModel(**keys).state_dict().items()}
    out = {}
    for k, shape in sorted(shapes.items()):
        if len(shape) == 1 and ".norm" in f".{k}":
            out[k] = 0.8 + 0.4 * _uniform(shape, k, seed)
        else:
            out[k] = _signed(shape, k, seed, 0.1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# deepcompressor's block tables (backend/nunchaku/convert.py)
# ---------------------------------------------------------------------------------------------------------------------

def _block_map(block: str, shifted: bool) -> dict[str, tuple]:
    """nunchaku module -> (deepcompressor module names, conversion, smooth key, branch key): local_name_map,
    convert_map, smooth_name_map and branch_name_map of convert_to_nunchaku_flux_(single_)transformer_block_
    state_dict. ``shifted``: the MLP down projection is a ShiftedLinear (``<name>.linear``)."""
    def lin(names, smooth, branch=None):
        return (names, "linear", smooth, branch or smooth)

    if block == _DB:
        down = "ff.net.2.linear" if shifted else "ff.net.2"
        cdown = "ff_context.net.2.linear" if shifted else "ff_context.net.2"
        return {
            "norm1.linear": (["norm1.linear"], "adanorm_zero", None, None),
            "norm1_context.linear": (["norm1_context.linear"], "adanorm_zero", None, None),
            "qkv_proj": lin(["attn.to_q", "attn.to_k", "attn.to_v"], "attn.to_q"),
            "qkv_proj_context": lin(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "attn.add_k_proj"),
            "norm_q": (["attn.norm_q"], "copy", None, None),
            "norm_k": (["attn.norm_k"], "copy", None, None),
            "norm_added_q": (["attn.norm_added_q"], "copy", None, None),
            "norm_added_k": (["attn.norm_added_k"], "copy", None, None),
            "out_proj": lin(["attn.to_out.0"], "attn.to_out.0"),
            "out_proj_context": lin(["attn.to_add_out"], "attn.to_out.0", "attn.to_add_out"),
            "mlp_fc1": lin(["ff.net.0.proj"], "ff.net.0.proj"),
            "mlp_fc2": lin([down], down),
            "mlp_context_fc1": lin(["ff_context.net.0.proj"], "ff_context.net.0.proj"),
            "mlp_context_fc2": lin([cdown], cdown),
        }
    down = "proj_out.linears.1.linear" if shifted else "proj_out.linears.1"
    return {
        "norm.linear": (["norm.linear"], "adanorm_single", None, None),
        "qkv_proj": lin(["attn.to_q", "attn.to_k", "attn.to_v"], "attn.to_q"),
        "norm_q": (["attn.norm_q"], "copy", None, None),
        "norm_k": (["attn.norm_k"], "copy", None, None),
        "out_proj": lin(["proj_out.linears.0"], "proj_out.linears.0"),
        "mlp_fc1": lin(["proj_mlp"], "attn.to_q", "proj_mlp"),
        "mlp_fc2": lin([down], down),
    }


def _diffusers_of(dc_name: str, hidden: int) -> tuple[str, slice | None, bool]:
    """deepcompressor module name -> (diffusers module, its input columns or None, whether it carries the bias).
    deepcompressor splits the single-block proj_out by input columns (ConcatLinear [hidden, 4 * hidden], the bias
    on the last part) and wraps shifted linears (``.linear``)."""
    if dc_name.startswith("proj_out.linears."):
        first = dc_name.split(".")[2] == "0"
        return "proj_out", (slice(0, hidden) if first else slice(hidden, None)), not first
    if dc_name in ("ff.net.2.linear", "ff_context.net.2.linear"):
        return dc_name[: -len(".linear")], None, True
    return dc_name, None, True


def _blocks(config: dict):
    for block, count in ((_DB, int(config["num_layers"])), (_SB, int(config["num_single_layers"]))):
        for i in range(count):
            yield block, f"{block}.{i}"


# ---------------------------------------------------------------------------------------------------------------------
# 1. what deepcompressor's PTQ saves (round-to-nearest stand-in for its calibration)
# ---------------------------------------------------------------------------------------------------------------------

def _fp_codes(x: torch.Tensor) -> torch.Tensor:
    """deepcompressor backend/utils.py fp_quantize: the nearest e2m1 code (first in codebook order on ties)."""
    codebook = torch.tensor(E2M1, dtype=x.dtype, device=x.device)
    return (x.unsqueeze(-1) - codebook.unsqueeze(0)).abs().argmin(dim=-1)


def _rtn_int4(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 -7..7 (so that AWQ's zero point 7 keeps codes in 0..15), bf16 group-64 scales:
    (scale [out, 1, in/64, 1], fake-quantized weight bf16)."""
    out, k = r.shape
    g = r.reshape(out, k // 64, 64)
    s = (g.abs().amax(-1) / 7).clamp_min(2.0 ** -24).to(_BF)
    q = torch.round(g / s.float()[..., None]).clamp(-7, 7)
    return s.reshape(out, 1, k // 64, 1), (q * s.float()[..., None]).reshape(out, k).to(_BF)


def _rtn_fp4(r: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 under fp8 e4m3 group-16 scales and ``outer`` (bf16, [out] per channel or [1] per tensor): (group
    scales [out, 1, in/16, 1] as bf16 values that fp8 holds exactly, fake-quantized weight bf16)."""
    out, k = r.shape
    o = outer.float().reshape(-1, 1)
    g = r.reshape(out, k // 16, 16)
    sub = (g.abs().amax(-1) / (6 * o)).clamp(2.0 ** -6, _FP8_MAX).to(torch.float8_e4m3fn).to(_BF)
    unit = sub.float()[..., None] * o[..., None]
    vals = torch.tensor(E2M1)[_fp_codes(g / unit)]
    return sub.reshape(out, 1, k // 16, 1), (vals * unit).reshape(out, k).to(_BF)


def deepcompressor_checkpoint(weights: dict[str, torch.Tensor], config: dict, kind: str, rank: int,
                              scales: str | None = None, seed: int = 0) -> dict:
    """``{"model", "scale", "smooth", "branch"}``: the dicts deepcompressor's PTQ saves as model.pt, scale.pt,
    smooth.pt, branch.pt, for diffusers FLUX ``weights`` (float32). See the module docstring."""
    assert kind in ("int4", "fp4"), kind
    assert (scales is None) == (kind == "int4") and scales in (None, "channel", "tensor"), scales
    assert rank > 0 and rank % 16 == 0, f"rank must be a positive multiple of 16, got {rank}"
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    shifted = kind == "int4"
    model = {k: v.to(_BF) for k, v in weights.items() if not k.startswith((f"{_DB}.", f"{_SB}."))}
    scale, smooth, branch = {}, {"proj.fuse_when_possible": False}, {}

    def source(pre, dc_name):
        dname, cols, with_bias = _diffusers_of(dc_name, hidden)
        w = weights[f"{pre}.{dname}.weight"].to(_BF)  # the pipeline runs in bf16
        b = weights.get(f"{pre}.{dname}.bias") if with_bias else None
        return (w if cols is None else w[:, cols].contiguous()), (None if b is None else b.to(_BF))

    for block, pre in _blocks(config):
        for names, conv, smooth_key, branch_key in _block_map(block, shifted).values():
            if conv == "copy":
                model[f"{pre}.{names[0]}.weight"] = source(pre, names[0])[0]
                continue
            if conv.startswith("adanorm"):  # W4A16 with zero point 7: codes -7..7
                w, b = source(pre, names[0])
                s, model[f"{pre}.{names[0]}.weight"] = _rtn_int4(w.float())
                model[f"{pre}.{names[0]}.bias"] = b
                scale[f"{pre}.{names[0]}.weight.scale.0"] = s
                continue
            parts = [source(pre, n) for n in names]
            w = torch.cat([p[0] for p in parts]).double()
            sk = f"{pre}.{smooth_key}"
            if sk not in smooth:
                smooth[sk] = (0.6 + 0.9 * _uniform((w.shape[1],), f"smooth:{sk}", seed)).to(_BF)
            bk = f"{pre}.{branch_key}"
            branch[bk] = {  # the low-rank branch of the smoothed weight (a acts on x / smooth)
                "a.weight": _signed((rank, w.shape[1]), f"a:{bk}", seed, math.sqrt(3.0 / rank)).to(_BF),
                "b.weight": None}
            ws = w * smooth[sk].double()[None, :]
            branch[bk]["b.weight"] = _signed((w.shape[0], rank), f"b:{bk}", seed,
                                             0.3 * float(ws.abs().amax())).to(_BF)
            resid = (ws - branch[bk]["b.weight"].double() @ branch[bk]["a.weight"].double()).float()
            row = 0
            for n, (wn, bn) in zip(names, parts):
                r = resid[row:row + wn.shape[0]]
                row += wn.shape[0]
                key = f"{pre}.{n}"
                if kind == "int4":
                    scale[f"{key}.weight.scale.0"], model[f"{key}.weight"] = _rtn_int4(r)
                else:
                    if scales == "channel":
                        outer = (r.abs().amax(1) / (6 * _FP8_MAX)).clamp_min(2.0 ** -24).to(_BF)
                        scale[f"{key}.weight.scale.0"] = outer.reshape(-1, 1, 1, 1)
                    else:
                        outer = (r.abs().amax() / (6 * _FP8_MAX)).clamp_min(2.0 ** -24).to(_BF).reshape(1)
                        scale[f"{key}.weight.scale.0"] = outer.reshape(1, 1, 1, 1)
                    scale[f"{key}.weight.scale.1"], model[f"{key}.weight"] = _rtn_fp4(r, outer)
                if n.endswith(".linear"):  # ShiftedLinear.from_linear: bias lowered by W @ shift (original W)
                    model[f"{key[:-len('.linear')]}.shift"] = torch.tensor([SHIFT_GELU_INT4], dtype=_BF)
                    bn = (bn.double() - wn.double().sum(dim=1) * SHIFT_GELU_INT4).to(_BF)
                if bn is not None:
                    model[f"{key}.bias"] = bn
    return {"model": model, "scale": scale, "smooth": smooth, "branch": branch}


# ---------------------------------------------------------------------------------------------------------------------
# 2. the converter (convert_to_nunchaku_flux_state_dicts and what it calls)
# ---------------------------------------------------------------------------------------------------------------------

def _convert_w4a4(weight, scale, bias, smooth, lora, shift, smooth_fused, float_point, subscale):
    """convert_to_nunchaku_w4x4y16_linear_state_dict (+ ..._weight): (file tensors, natural tensors)."""
    oc, ic = weight.shape
    dtype = weight.dtype
    assert oc % 128 == 0 and ic % 128 == 0, "the tests' widths need no padding"
    if scale.numel() > 1:
        scale = scale.view(scale.shape[0], 1, scale.shape[2], 1)
        scale_key = "wcscales" if scale.shape[2] == 1 else "wscales"
    else:
        scale_key = "wtscale"
    subscale_key = None
    if subscale is not None:
        subscale = subscale.view(subscale.shape[0], 1, subscale.shape[2], 1)
        subscale_key = "wcscales" if subscale.shape[2] == 1 else "wscales"
    if lora is not None and (smooth is not None or shift is not None):
        down, up = lora
        down = down.to(torch.float64)
        if smooth is not None and not smooth_fused:
            down = down.div(smooth.to(torch.float64).unsqueeze(0))
        if shift is not None:
            bias = torch.zeros([up.shape[0]], dtype=torch.float64) if bias is None else bias.to(torch.float64)
            sh = shift.view(1, 1).expand(down.shape[1], 1) if shift.numel() == 1 else shift.view(-1, 1)
            bias = bias.add((up.to(torch.float64) @ down @ sh.to(torch.float64)).view(-1)).to(dtype)
        lora = (down.to(dtype), up)
    per_tensor = scale.numel() == 1
    if per_tensor:
        scale = scale.view(-1).expand(oc).reshape(oc, 1, 1, 1)
    ng = scale.shape[2]
    w = weight.to(torch.float32).view(oc, 1, ng, ic // ng).div(scale.to(torch.float32))
    if subscale is not None:
        nsg = subscale.shape[2]
        w = w.reshape(oc, 1, nsg, ic // nsg).div(subscale.to(torch.float32))
    w = w.reshape(oc, ic)
    if float_point:
        codes = _fp_codes(w)
    else:
        codes = w.round()
        assert codes.min() >= -8 and codes.max() <= 7
    bias = torch.zeros(oc, dtype=dtype) if bias is None else bias.reshape(-1).to(dtype)
    smooth = torch.ones(ic, dtype=dtype) if smooth is None else smooth.reshape(-1).to(dtype)

    def packed_scale(s, group):  # pack_scale(group if group < ic else -1); fp8 for the micro (group 16) scales
        s = s.to(dtype).reshape(oc, -1)
        if group >= ic:
            return pack_vector(s.reshape(-1))
        return pack_wscales(s.to(torch.float8_e4m3fn) if group == 16 else s, group)

    t = {"qweight": pack_qweight(codes.to(torch.int32)),
         scale_key: packed_scale(scale, ic // ng)}
    if per_tensor:
        t[scale_key] = t[scale_key].reshape(-1)[0].reshape(1)
    nat = {"codes": codes.to(torch.uint8 if float_point else torch.int8), "fp4": bool(float_point),
           scale_key: scale.to(dtype).reshape(oc, -1)}
    if per_tensor:
        nat[scale_key] = nat[scale_key][:1, :1].reshape(1)
    if subscale is not None:
        t[subscale_key] = packed_scale(subscale, ic // subscale.shape[2])
        sub = subscale.to(dtype).reshape(oc, -1)
        nat[subscale_key] = sub.to(torch.float8_e4m3fn) if subscale_key == "wscales" and float_point else sub
    t["bias"] = pack_vector(bias)
    t["smooth_orig"] = pack_vector(smooth)
    t["smooth"] = pack_vector(torch.ones_like(smooth) if smooth_fused else smooth)
    nat.update(bias=bias, smooth=torch.ones_like(smooth) if smooth_fused else smooth,
               shift=0.0 if shift is None else float(shift.reshape(-1)[0]))
    if lora is not None:
        t["lora_down"] = pack_lowrank(lora[0], down=True)
        t["lora_up"] = pack_lowrank(lora[1], down=False)
        nat.update(lora_down=lora[0], lora_up=lora[1])
    return t, nat


def _convert_awq(weight, scale, bias, splits):
    """convert_to_nunchaku_w4x16_linear_weight + TinyChat convert_to_tinychat_w4x16y16_linear_weight (zero point
    7, pre-scaled), with the scales cut to the ceil(in/64) rows nunchaku's loader allocates (module docstring)."""
    oc, ic = weight.shape
    ng = scale.shape[2]
    dtype = weight.dtype
    bias = torch.zeros(oc, dtype=dtype) if bias is None else bias.clone()
    if splits > 1:
        weight = weight.view(splits, oc // splits, ic).transpose(0, 1).reshape(oc, ic)
        scale = scale.view(splits, oc // splits, ng).transpose(0, 1).reshape(oc, 1, ng, 1)
        bias = bias.reshape(splits, oc // splits).transpose(0, 1)
        delta = [0] * splits
        delta[1] = delta[-2] = 1
        bias = bias.add(torch.tensor(delta, dtype=bias.dtype)).reshape(oc)
    s = scale.to(torch.float32).reshape(oc, ng, 1)
    zero = torch.full_like(scale, 7).to(torch.float32).reshape(oc, ng, 1) * s
    codes = weight.to(torch.float32).view(oc, ng, -1).add(zero).div(s).round().view(oc, ic)
    assert codes.min() >= 0 and codes.max() <= 15
    ws, wz = s.view(oc, ng).to(dtype), zero.view(oc, ng).to(dtype).neg()
    rows = -(-ic // 64)
    t = {"qweight": pack_awq_qweight(codes.to(torch.uint8)), "wscales": pack_awq_scales(ws, ic)[:rows].clone(),
         "wzeros": pack_awq_scales(wz, ic)[:rows].clone(), "bias": bias}
    return t, {"codes": codes, "wscales": ws, "wzeros": wz, "bias": bias, "splits": splits}


def convert(ckpt: dict, float_point: bool) -> tuple[dict, dict, dict]:
    """deepcompressor's convert_to_nunchaku_flux_state_dicts: (``transformer_blocks.safetensors`` tensors,
    ``unquantized_layers.safetensors`` tensors, natural tensors per nunchaku module path)."""
    model, scales, smooths, branches = ckpt["model"], ckpt["scale"], ckpt["smooth"], ckpt["branch"]
    names = {".".join(k.split(".")[:2]) for k in model if k.startswith((f"{_DB}.", f"{_SB}."))}
    other = {k: v for k, v in model.items() if not k.startswith((f"{_DB}.", f"{_SB}."))}
    converted, naturals = {}, {}
    for block_name in sorted(names, key=lambda x: (x.split(".")[0], int(x.split(".")[-1]))):
        block = block_name.split(".")[0]
        down = "ff.net.2.linear" if block == _DB else "proj_out.linears.1.linear"
        shifted = f"{block_name}.{down}.weight" in model
        for nname, (local, conv, smooth_key, branch_key) in _block_map(block, shifted).items():
            cands = [f"{block_name}.{n}" for n in local]
            weight = [model[f"{c}.weight"] for c in cands]
            bias = [model.get(f"{c}.bias") for c in cands]
            scale = [scales.get(f"{c}.weight.scale.0") for c in cands]
            subscale = [scales.get(f"{c}.weight.scale.1") for c in cands]
            if len(weight) > 1:
                bias = None if all(b is None for b in bias) else torch.cat(bias)
                if all(s is None for s in scale):
                    scale = None
                elif scale[0].numel() == 1:  # per-tensor scales of fused linears become one per-channel scale
                    scale = torch.cat([s.view(-1).expand(w.shape[0]).reshape(w.shape[0], 1, 1, 1)
                                       for s, w in zip(scale, weight)])
                else:
                    scale = torch.cat(scale)
                subscale = None if all(s is None for s in subscale) else torch.cat(subscale)
                weight = torch.cat(weight)
            else:
                weight, bias, scale, subscale = weight[0], bias[0], scale[0], subscale[0]
            path = f"{block_name}.{nname}"
            if scale is None:
                converted[f"{path}.weight"] = weight.clone()
                if bias is not None:
                    converted[f"{path}.bias"] = bias.clone()
                continue
            if conv.startswith("adanorm"):
                t, nat = _convert_awq(weight, scale, bias, 3 if conv == "adanorm_single" else 6)
            else:
                smooth = smooths.get(f"{block_name}.{smooth_key}")
                br = branches.get(f"{block_name}.{branch_key}")
                lora = None if br is None else (br["a.weight"], br["b.weight"])
                shift = model.get(f"{cands[0][:-7]}.shift")
                fused = "out_proj" in nname and smooths.get("proj.fuse_when_possible", True)
                t, nat = _convert_w4a4(weight, scale, bias, smooth, lora, shift, fused, float_point, subscale)
            naturals[path] = nat
            converted.update({f"{path}.{k}": v for k, v in t.items()})
    return converted, other, naturals


# ---------------------------------------------------------------------------------------------------------------------
# 3. nunchaku's merge_safetensors, the files, and the dense equivalent
# ---------------------------------------------------------------------------------------------------------------------

def quantization_config_for(kind: str, rank: int) -> dict:
    """nunchaku merge_safetensors' quantization_config (with "rank", nunchaku >= 1.0.1)."""
    fp4 = kind == "fp4"
    d = "fp4_e2m1_all" if fp4 else "int4"
    return {"method": "svdquant",
            "weight": {"dtype": d, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": GROUP[kind]},
            "activation": {"dtype": d, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": GROUP[kind]},
            "rank": rank}


def comfy_config_for(cfg: dict) -> dict:
    """ComfyUI-nunchaku's comfy_config.json for FLUX (ComfyUI's Flux model_config: latent channels before the 2x2
    patchify that diffusers' packed in_channels already includes)."""
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    latent = int(cfg["in_channels"]) // 4
    out_ch = cfg.get("out_channels")
    return {"model_class": "Flux", "model_config": {
        "image_model": "flux", "in_channels": latent, "patch_size": 2,
        "out_channels": int(out_ch) // 4 if out_ch else latent,
        "vec_in_dim": int(cfg["pooled_projection_dim"]), "context_in_dim": int(cfg["joint_attention_dim"]),
        "hidden_size": heads * head_dim, "mlp_ratio": 4.0, "num_heads": heads, "depth": int(cfg["num_layers"]),
        "depth_single_blocks": int(cfg["num_single_layers"]), "axes_dim": list(cfg["axes_dims_rope"]),
        "theta": 10000, "qkv_bias": True, "guidance_embed": bool(cfg.get("guidance_embeds", False))}}


def folder_texts(cfg: dict) -> dict[str, str]:
    """config.json and comfy_config.json beside the two weight files (merge_safetensors copies their text)."""
    return {"config.json": json.dumps(cfg, indent=2), "comfy_config.json": json.dumps(comfy_config_for(cfg), indent=2)}


def merge_metadata(blocks: dict, unquantized: dict, texts: dict[str, str],
                   model_class: str = "NunchakuFluxTransformer2dModel") -> dict[str, str]:
    """nunchaku merge_safetensors' header metadata for the two parts and the folder's JSON texts."""
    fp8 = {torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
           torch.float8_e8m0fnu}
    fp4 = any(v.dtype in fp8 for v in list(unquantized.values()) + list(blocks.values()))
    rank = next((blocks[k].shape[1] for k in sorted(blocks) if ".lora_down" in k), 32)
    return {"config": texts["config.json"], "comfy_config": texts["comfy_config.json"], "model_class": model_class,
            "quantization_config": json.dumps(quantization_config_for("fp4" if fp4 else "int4", int(rank)))}


def _dense_w4a4(nat: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the dense equivalent, in the reader's order: value x group scale x channel scale x tensor
    scale / smooth, plus the low-rank branch; bias + shift x W_eff.sum(1)."""
    codes = nat["codes"]
    out, k = codes.shape
    vals = torch.tensor(E2M1)[codes.long()] if nat["fp4"] else codes.float()
    g = nat["wscales"].float()
    w = (vals.reshape(out, g.shape[1], -1) * g[:, :, None]).reshape(out, k)
    if "wcscales" in nat:
        w = w * nat["wcscales"].float().reshape(out, 1)
    if "wtscale" in nat and float(nat["wtscale"].float()) != 1.0:
        w = w * float(nat["wtscale"].float())
    w_eff = w / nat["smooth"].float()[None, :]
    bias = nat["bias"].float() + nat["shift"] * w_eff.sum(1) if nat["shift"] else nat["bias"].float()
    if "lora_up" in nat:
        w_eff = w_eff + nat["lora_up"].float() @ nat["lora_down"].float()
    return w_eff, bias


def _dense_awq(nat: dict) -> tuple[torch.Tensor, torch.Tensor]:
    codes, s = nat["codes"], nat["splits"]
    out, k = codes.shape
    ng = nat["wscales"].shape[1]
    w = (codes.reshape(out, ng, -1) * nat["wscales"].float()[:, :, None] + nat["wzeros"].float()[:, :, None])
    w = w.reshape(out // s, s, k).transpose(0, 1).reshape(out, k)
    b = nat["bias"].float().reshape(out // s, s).clone()
    for c in sorted({1, s - 2}):
        b[:, c] -= 1.0
    return w, b.t().reshape(out)


def dense_state_dict(weights: dict, ckpt: dict, naturals: dict, blocks: dict, config: dict) -> dict:
    """The diffusers state dict (float32) that the converted tensors encode under weight-only math."""
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    dense = {k: v.float() for k, v in ckpt["model"].items() if not k.startswith((f"{_DB}.", f"{_SB}."))}
    for block, pre in _blocks(config):
        shifted = f"{pre}.{'ff.net.2.linear' if block == _DB else 'proj_out.linears.1.linear'}.weight" in ckpt["model"]
        for nname, (local, conv, _, _) in _block_map(block, shifted).items():
            path = f"{pre}.{nname}"
            if conv == "copy":
                dense[f"{pre}.{local[0]}.weight"] = blocks[f"{path}.weight"].float()
                continue
            w, b = (_dense_awq if conv.startswith("adanorm") else _dense_w4a4)(naturals[path])
            row = 0
            for n in local:
                dname, cols, _ = _diffusers_of(n, hidden)
                rows = ckpt["model"][f"{pre}.{n}.weight"].shape[0]
                wk, bk = f"{pre}.{dname}.weight", f"{pre}.{dname}.bias"
                if cols is None:
                    dense[wk], dense[bk] = w[row:row + rows].clone(), b[row:row + rows].clone()
                else:  # single-block proj_out: input-column parts, outputs (and biases) summed
                    dense.setdefault(wk, torch.zeros_like(weights[wk], dtype=torch.float32))[:, cols] = w
                    dense[bk] = dense.get(bk, 0) + b
                row += rows
    return dense


def write_nunchaku_flux(path, model, kind: str = "int4", rank: int = 32, seed: int = 0, scales: str | None = None,
                        layout: str = "file"):
    """Write ``model`` (diffusers FluxTransformer2DModel) as nunchaku writes it: ``layout="file"``, the merged
    safetensors at ``path``; ``"folder"``, the pre-v1 folder ``path`` (transformer_blocks.safetensors,
    unquantized_layers.safetensors, config.json, comfy_config.json). ``scales`` (fp4): "channel" (default) or
    "tensor". Returns a float32 deep copy of ``model`` whose weights are exactly what the files encode under
    weight-only math (dequantized weights with the low-rank branch folded in, effective biases, AdaLN
    un-interleaved, plain tensors rounded to bf16)."""
    assert layout in ("file", "folder"), layout
    if kind == "fp4" and scales is None:
        scales = "channel"
    cfg = json.loads(model.to_json_string())
    weights = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    ckpt = deepcompressor_checkpoint(weights, cfg, kind, rank, scales, seed)
    blocks, unquantized, naturals = convert(ckpt, float_point=kind == "fp4")
    dense = dense_state_dict(weights, ckpt, naturals, blocks, cfg)
    missing, extra = sorted(set(weights) - set(dense)), sorted(set(dense) - set(weights))
    assert not missing and not extra, f"writer coverage: missing {missing[:8]}, unexpected {extra[:8]}"
    texts = folder_texts(cfg)
    if layout == "file":
        save_file({k: v.contiguous() for k, v in {**unquantized, **blocks}.items()}, str(path),
                  metadata=merge_metadata(blocks, unquantized, texts))
    else:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in blocks.items()}, os.path.join(path, "transformer_blocks.safetensors"))
        save_file({k: v.contiguous() for k, v in unquantized.items()},
                  os.path.join(path, "unquantized_layers.safetensors"))
        for name, text in texts.items():
            with open(os.path.join(path, name), "w", encoding="utf-8") as fh:
                fh.write(text)

    out = copy.deepcopy(model)
    for t in list(out.parameters()) + list(out.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32)
    out.load_state_dict({k: dense[k] for k in weights}, strict=True)
    return out
