"""Pure-torch WRITER of nunchaku SVDQuant FLUX files, for tests (the inverse of dcgen_core/svdquant.py's reader).

Packers (each checked bit-exactly against tests/fixtures/svdquant_packing.safetensors, which nunchaku's own
packer made, in tests/test_svdquant_pack.py):

* :func:`pack_qweight`      natural 4-bit codes ``[out, in]`` -> int8 ``[out, in/2]`` (NunchakuWeightPacker.pack_weight)
* :func:`pack_wscales`      group scales ``[out, in/G]`` -> ``[in/G, out]`` (pack_scale, G=64 bf16; pack_micro_scale,
                            G=16 fp8 e4m3)
* :func:`pack_vector`       per-channel vector (bias, smooth, smooth_orig, wcscales) ``[n]`` -> ``[n]``
                            (pack_scale with group_size=-1)
* :func:`pack_lowrank`      ``lora_down [rank, in]`` -> ``[in, rank]``; ``lora_up [out, rank]`` -> ``[out, rank]``
* :func:`pack_awq_qweight`  AWQ W4A16 codes 0..15 ``[out, in]`` -> int32 ``[out/4, in/2]`` (TinyChat pack_w4)
* :func:`pack_awq_scales`   AWQ ``[out, in/64]`` -> ``[ceil_num_groups, out]`` (zero padded, TinyChat)

:func:`write_nunchaku_flux` quantizes a diffusers ``FluxTransformer2DModel`` (round-to-nearest, random smoothing and
random low-rank branch) into nunchaku's FLUX file layout and returns the EXACT dense equivalent (weight-only math).

torch + safetensors + diffusers only (plus dcgen_core.svdquant's module table); nunchaku is not needed.
"""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

from dcgen_core.svdquant import NUNCHAKU_FLUX_MODULES, NUNCHAKU_FLUX_PLAIN_KEYS, SHIFT_GELU_INT4

__all__ = [
    "E2M1",
    "GROUP",
    "awq_num_groups",
    "comfy_config_for",
    "pack_awq_qweight",
    "pack_awq_scales",
    "pack_lowrank",
    "pack_qweight",
    "pack_vector",
    "pack_wscales",
    "quantization_config_for",
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
# round-to-nearest quantizers (natural tensors + their exact dequantization)
# ---------------------------------------------------------------------------------------------------------------------

def _quant_int4(r: torch.Tensor) -> dict:
    """Symmetric int4, bf16 group-64 scales. Returns natural tensors and ``stored`` = dequant (float32)."""
    out, k = r.shape
    g = r.reshape(out, k // 64, 64)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(_BF)
    codes = torch.round(g / scale.float()[:, :, None]).clamp(-8, 7).to(torch.int8).reshape(out, k)
    stored = (codes.float().reshape(out, k // 64, 64) * scale.float()[:, :, None]).reshape(out, k)
    return {"codes": codes, "wscales": scale, "stored": stored}


def _quant_fp4(r: torch.Tensor, wtscale: float) -> dict:
    """NVFP4 as nunchaku stores it: e2m1 codes, fp8 e4m3 group-16 scales, bf16 per-channel wcscales, bf16 wtscale."""
    out, k = r.shape
    ts = torch.tensor([wtscale], dtype=_BF)
    tsf = float(ts.float())
    cs = (r.abs().amax(1) / (6 * _FP8_MAX * tsf)).clamp_min(1e-6).to(_BF)
    g = r.reshape(out, k // 16, 16)
    gs = (g.abs().amax(-1) / (6 * cs.float()[:, None] * tsf)).clamp(2.0 ** -6, _FP8_MAX).to(torch.float8_e4m3fn)
    unit = gs.float()[:, :, None] * cs.float()[:, None, None] * tsf
    y = g / unit
    mags = torch.tensor(E2M1[:8])
    code = (y.abs()[..., None] - mags).abs().argmin(-1)
    codes = (code + 8 * (y < 0).long()).to(torch.uint8).reshape(out, k)
    # dequantize in the reader's order: value * group scale, * channel scale, * tensor scale
    vals = torch.tensor(E2M1)[codes.long()]
    stored = (vals.reshape(out, k // 16, 16) * gs.float()[:, :, None]).reshape(out, k)
    stored = stored * cs.float()[:, None]
    if tsf != 1.0:
        stored = stored * tsf
    return {"codes": codes, "wscales": gs, "wcscales": cs, "wtscale": ts, "stored": stored}


def _svdq_linear(w: torch.Tensor, b: torch.Tensor, kind: str, rank: int, g: torch.Generator, *,
                 smooth: torch.Tensor | None = None, fused_smooth: torch.Tensor | None = None,
                 shift: float = 0.0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Quantize one W4A4 linear (w [out, in], b [out], float32).

    ``smooth``: the activation smoothing (stored ``smooth``/``smooth_orig``); ``fused_smooth``: smoothing already
    fused into the producer of the input (out_proj: stored ``smooth`` = ones, ``smooth_orig`` = the factor, the weight
    is ``w * fused_smooth``). Returns (file tensors, dense weight, dense bias) with the dense pair EXACTLY what the
    tensors encode: ``W_eff / smooth + up @ down`` and ``bias + shift * W_eff.sum(1)``."""
    out, k = w.shape
    if fused_smooth is not None:
        s_div = torch.ones(k, dtype=_BF)
        s_orig = fused_smooth
        ws = w * fused_smooth.float()[None, :]
    else:
        s_div = s_orig = smooth
        ws = w * smooth.float()[None, :]
    # random rank-r branch in the smoothed domain; stored lora_down is divided by smooth (deepcompressor)
    scale = float(ws.std()) * 0.3
    up = (torch.randn(out, rank, generator=g) * scale).to(_BF)
    down_s = torch.randn(rank, k, generator=g) / rank ** 0.5
    down = (down_s.double() / s_div.double()[None, :]).to(_BF)
    resid = ws - up.float() @ (down.float() * s_div.float()[None, :])
    q = _quant_int4(resid) if kind == "int4" else _quant_fp4(resid, wtscale=0.75)
    w_eff = q["stored"] / s_div.float()[None, :]
    if shift:
        bias = (b - shift * w_eff.sum(1)).to(_BF)          # ShiftedLinear: bias lowered by the shift
    else:
        bias = b.to(_BF)
    t = {"qweight": pack_qweight(q["codes"]), "wscales": pack_wscales(q["wscales"], GROUP[kind]),
         "bias": pack_vector(bias), "smooth": pack_vector(s_div), "smooth_orig": pack_vector(s_orig),
         "lora_down": pack_lowrank(down, down=True), "lora_up": pack_lowrank(up, down=False)}
    if kind == "fp4":
        t["wcscales"] = pack_vector(q["wcscales"])
        t["wtscale"] = q["wtscale"]
    dense_w = w_eff + up.float() @ down.float()
    dense_b = bias.float() + shift * w_eff.sum(1) if shift else bias.float()
    return t, dense_w, dense_b


def _awq_linear(w: torch.Tensor, b: torch.Tensor, splits: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """AWQ W4A16 AdaLN linear (zero point 7, bf16 group-64 scales) in nunchaku's interleaved row order with the "+1"
    on the scale chunks' bias. Returns (file tensors, dense diffusers weight, dense diffusers bias)."""
    out, k = w.shape
    per = out // splits
    wi = w.reshape(splits, per, k).transpose(0, 1).reshape(out, k)           # row j*splits + c = chunk c, row j
    g = wi.reshape(out, k // 64, 64)
    s = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(_BF)
    codes = (torch.round(g / s.float()[:, :, None]) + 7).clamp(0, 15).to(torch.uint8).reshape(out, k)
    z = (-(7 * s.float())).to(_BF)                                             # wzeros: zero point pre-scaled, negated
    delta = [0.0] * splits
    delta[1] = delta[-2] = 1.0
    bi = (b.reshape(splits, per).transpose(0, 1) + torch.tensor(delta)).reshape(out).to(_BF)
    t = {"qweight": pack_awq_qweight(codes), "wscales": pack_awq_scales(s, k), "wzeros": pack_awq_scales(z, k),
         "bias": bi}
    dq = (codes.float().reshape(out, k // 64, 64) * s.float()[:, :, None] + z.float()[:, :, None]).reshape(out, k)
    dense_w = dq.reshape(per, splits, k).transpose(0, 1).reshape(out, k)
    bb = bi.float().reshape(per, splits).clone()
    for c in sorted({1, splits - 2}):
        bb[:, c] -= 1.0
    dense_b = bb.t().reshape(out)
    return t, dense_w, dense_b


# ---------------------------------------------------------------------------------------------------------------------
# header metadata
# ---------------------------------------------------------------------------------------------------------------------

def quantization_config_for(kind: str, rank: int) -> dict:
    """nunchaku merge_safetensors' quantization_config."""
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


# ---------------------------------------------------------------------------------------------------------------------
# the FLUX writer
# ---------------------------------------------------------------------------------------------------------------------

_DB, _SB = "transformer_blocks", "single_transformer_blocks"


def write_nunchaku_flux(path, model, kind: str = "int4", rank: int = 16, seed: int = 0):
    """Write ``model`` (diffusers FluxTransformer2DModel) as a nunchaku SVDQuant FLUX file at ``path``.

    Returns a float32 deep copy of ``model`` whose weights are exactly what the file encodes under weight-only math
    (dequantized weights with the low-rank branch folded in, effective biases, AdaLN un-interleaved, plain tensors
    rounded to bf16)."""
    assert kind in ("int4", "fp4"), kind
    assert rank > 0 and rank % 16 == 0, f"rank must be a positive multiple of 16, got {rank}"
    g = torch.Generator().manual_seed(seed)
    src = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    cfg = json.loads(model.to_json_string())
    D = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    file: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}

    def smooth_vec(n):
        return torch.exp(torch.rand(n, generator=g) - 0.5).to(_BF)

    def lin(prefix):
        w = src[f"{prefix}.weight"]
        b = src.get(f"{prefix}.bias")
        return w, (torch.zeros(w.shape[0]) if b is None else b)

    def put(module_path, tensors):
        for k, v in tensors.items():
            file[f"{module_path}.{k}"] = v.contiguous()

    def shift_of(block, name):
        return SHIFT_GELU_INT4 if kind == "int4" and NUNCHAKU_FLUX_MODULES[(block, name)].shifted_input_int4 else 0.0

    for block, count in ((_DB, int(cfg["num_layers"])), (_SB, int(cfg["num_single_layers"]))):
        for i in range(count):
            pre = f"{block}.{i}"
            # attention-output smoothing, fused into the V rows (one factor for the joint attention of both streams)
            s_attn = smooth_vec(D)
            s_in = smooth_vec(D)                   # single blocks: qkv_proj and mlp_fc1 share their input
            for (blk, name), m in NUNCHAKU_FLUX_MODULES.items():
                if blk != block:
                    continue
                dn = [f"{pre}.{d}" for d in m.diffusers]
                if m.quant == "awq":
                    w, b = lin(dn[0])
                    t, dw, db = _awq_linear(w, b, m.adanorm_splits)
                    put(f"{pre}.{name}", t)
                    dense[f"{dn[0]}.weight"], dense[f"{dn[0]}.bias"] = dw, db
                    continue
                if m.fuse == "rows":
                    parts = [lin(d) for d in dn]
                    ws = [p[0] for p in parts]
                    bs = [p[1] for p in parts]
                    ws[2] = ws[2] / s_attn.float()[:, None]      # V rows carry 1/smooth of the attention output
                    bs[2] = bs[2] / s_attn.float()
                    w, b = torch.cat(ws, 0), torch.cat(bs, 0)
                    sm = s_in if block == _SB else smooth_vec(w.shape[1])
                    t, dw, db = _svdq_linear(w, b, kind, rank, g, smooth=sm)
                    rows = [x.shape[0] for x in ws]
                    for d, wpart, bpart in zip(dn, dw.split(rows, 0), db.split(rows, 0)):
                        dense[f"{d}.weight"], dense[f"{d}.bias"] = wpart.clone(), bpart.clone()
                elif m.fuse == "in_slice":
                    w_full, b_full = lin(dn[0])
                    a, z = m.in_slice
                    w = w_full[:, a * D:z * D]
                    b = b_full if name == "mlp_fc2" else torch.zeros(w.shape[0])  # ConcatLinear: bias on the last
                    fused = s_attn if name == "out_proj" else None
                    t, dw, db = _svdq_linear(w, b, kind, rank, g, smooth=None if fused is not None
                                             else smooth_vec(w.shape[1]), fused_smooth=fused,
                                             shift=shift_of(block, name))
                    key_w, key_b = f"{dn[0]}.weight", f"{dn[0]}.bias"
                    if key_w not in dense:
                        dense[key_w] = torch.zeros_like(w_full)
                        dense[key_b] = torch.zeros_like(b_full)
                    dense[key_w][:, a * D:z * D] = dw
                    dense[key_b] = dense[key_b] + db
                else:
                    w, b = lin(dn[0])
                    if name.startswith("out_proj"):
                        kw = {"fused_smooth": s_attn}
                    elif block == _SB and name == "mlp_fc1":
                        kw = {"smooth": s_in}
                    else:
                        kw = {"smooth": smooth_vec(w.shape[1])}
                    t, dw, db = _svdq_linear(w, b, kind, rank, g, shift=shift_of(block, name), **kw)
                    dense[f"{dn[0]}.weight"], dense[f"{dn[0]}.bias"] = dw, db
                put(f"{pre}.{name}", t)
            for (blk, nname), dname in NUNCHAKU_FLUX_PLAIN_KEYS.items():
                if blk != block:
                    continue
                for k in [k for k in src if k.startswith(f"{pre}.{dname}.")]:
                    v = src[k].to(_BF)
                    file[f"{pre}.{nname}.{k[len(pre) + len(dname) + 2:]}"] = v
                    dense[k] = v.float()
    # everything outside the blocks stays plain bf16 under its diffusers name
    for k, v in src.items():
        if not k.startswith((f"{_DB}.", f"{_SB}.")):
            file[k] = v.to(_BF)
            dense[k] = file[k].float()

    missing = sorted(set(src) - set(dense))
    extra = sorted(set(dense) - set(src))
    assert not missing and not extra, f"writer coverage: missing {missing[:8]}, unexpected {extra[:8]}"
    meta = {"config": json.dumps(cfg), "comfy_config": json.dumps(comfy_config_for(cfg)),
            "model_class": "NunchakuFluxTransformer2dModel",
            "quantization_config": json.dumps(quantization_config_for(kind, rank))}
    save_file({k: v.contiguous() for k, v in file.items()}, str(path), metadata=meta)

    out = copy.deepcopy(model)
    for t in list(out.parameters()) + list(out.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32)
    out.load_state_dict({k: dense[k] for k in src}, strict=True)
    return out
