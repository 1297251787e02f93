"""nunchaku SVDQuant storage: the 4-bit kinds and group sizes, and the exact inverses of nunchaku's packers (4-bit
weights, int4/fp8 group scales, per-channel vectors, low-rank branches, AWQ W4A16 weights). Torch only."""

from __future__ import annotations

import torch

from ...errors import DCGenError


#: e2m1 code -> value: bit 3 sign, bits 2..1 exponent, bit 0 mantissa (deepcompressor backend/utils.py fp_quantize
#: codebook; the same as the hardware NVFP4 encoding).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: shift added to GELU outputs before the unsigned int4 quantization of the next layer (nunchaku
#: src/kernels/zgemm/gemm_w4a4_launch_impl.cuh, ``SHIFT_GELU``; fp4 uses 0).
SHIFT_GELU_INT4 = 0.171875

#: group size of the weight scales, by kind (nunchaku models/linear.py SVDQW4A4Linear).
GROUP_SIZE = {"int4": 64, "fp4": 16}


# NunchakuWeightPacker(bits=4, warp_n=128) constants (nunchaku/lora/flux/packer.py)
_WARP_N = 128          # mem_n: output-channel tile
_MEM_K = 64            # comp_k = 256 // bits: input-channel tile
_NUM_K_UNROLLS = 2     # in_features must be a multiple of _MEM_K * _NUM_K_UNROLLS
_NUM_N_PACKS, _N_PACK, _N_LANES, _REG_N = 8, 2, 8, 1
_NUM_K_PACKS, _K_PACK, _K_LANES, _REG_K = 1, 2, 4, 8
# pack_weight permutes (n_tiles, num_n_packs, n_pack, n_lanes, reg_n, k_tiles, num_k_packs, k_pack, k_lanes, reg_k)
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
# pack_scale (16-bit, group 64 or per channel): s_pack_size 4, num_s_lanes 32, num_s_packs 1 for warp_n 128
_S_PACK = min(max(_WARP_N // 32, 2), 8)
_S_LANES = min(32, _WARP_N // _S_PACK)
_S_PACKS = _WARP_N // (_S_PACK * _S_LANES)
_S_PERM = (0, 6, 1, 2, 4, 3, 5)
# pack_micro_scale (fp8, group 16): s_pack_size 4, 32 lanes, 1 pack; 64 // 16 = 4 scales per mma k-step
_MS_PACK = min(max(_WARP_N // 32, 1), 4)
_MS_PACKS = -(-_WARP_N // (_MS_PACK * 32))
_MS_PER_K = _MEM_K // 16
_MS_PERM = (0, 5, 1, 4, 3, 2, 6)
# low-rank packing: fragments of 16 x 16 (pack_n = 2*8*1, pack_k = 2*4*2)
_LR_FRAG = 16


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


# --------------------------------------------------------------------------------------------------------------------
# Unpackers (the exact inverses of nunchaku's packers)
# --------------------------------------------------------------------------------------------------------------------

def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Undo ``NunchakuWeightPacker(bits=4).pack_weight``: int8 ``[out, in/2]`` -> uint8 nibbles ``[out, in]`` (0..15).

    For int4 the nibble is a two's complement code (see :func:`int4_from_nibbles`); for fp4 it is an e2m1 code.
    """
    if qweight.dtype not in (torch.int8, torch.uint8) or qweight.ndim != 2:
        raise DCGenError(f"qweight: expected an int8 tensor [out, in/2], found {qweight.dtype} {list(qweight.shape)}.")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % _WARP_N or k % (_MEM_K * _NUM_K_UNROLLS):
        raise DCGenError(f"qweight: expected out a multiple of {_WARP_N} and in a multiple of "
                         f"{_MEM_K * _NUM_K_UNROLLS} (nunchaku pads to these), found out {n}, in {k}.")
    b = qweight.contiguous().view(torch.uint8).reshape(-1)
    # little-endian int32 words: byte m holds element 2m in its low nibble and 2m+1 in its high nibble
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)
    packed_shape = (n // _WARP_N, k // _MEM_K, _NUM_K_PACKS, _NUM_N_PACKS, _N_LANES, _K_LANES, _N_PACK, _K_PACK,
                    _REG_N, _REG_K)
    return nib.reshape(packed_shape).permute(_inverse(_W_PERM)).reshape(n, k).contiguous()


def int4_from_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """Two's complement 4-bit codes (0..15) -> int8 values -8..7."""
    v = nib.to(torch.int8)
    return torch.where(v >= 8, v - 16, v)


def unpack_wscales(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Undo ``pack_scale`` / ``pack_micro_scale``: ``[in/G, out]`` -> natural ``[out, in/G]`` (same dtype).

    ``group_size`` 16 selects the fp8 micro-scale layout (nunchaku ``check_if_micro_scale``: insn_k == 4 * group).
    """
    if packed.ndim != 2:
        raise DCGenError(f"wscales: expected a 2-D tensor [in/{group_size}, out], found {list(packed.shape)}.")
    ng, n = packed.shape
    if n % _WARP_N:
        raise DCGenError(f"wscales: expected out a multiple of {_WARP_N}, found {n}.")
    flat = packed.contiguous().reshape(-1)
    if group_size * 4 == _MEM_K:  # micro scales (fp4)
        if ng % _MS_PER_K:
            raise DCGenError(f"wscales: expected a number of groups that is a multiple of {_MS_PER_K}, found {ng}.")
        shape = (n // _WARP_N, ng // _MS_PER_K, _MS_PACKS, 8, 4, _MS_PACK, _MS_PER_K)
        t = flat.reshape(shape).permute(_inverse(_MS_PERM))  # (n_tiles, packs, s_pack, 4, 8, k_tiles, per_k)
    else:
        shape = (n // _WARP_N, ng, _S_PACKS, _S_LANES // 4, 4, _S_PACK // 2, 2)
        t = flat.reshape(shape).permute(_inverse(_S_PERM))  # (n_tiles, packs, lanes/4, s_pack/2, 4, 2, ng)
    return t.reshape(n, ng).contiguous()


def unpack_vector(packed: torch.Tensor) -> torch.Tensor:
    """Undo ``pack_scale(group_size=-1)`` for per-channel vectors (bias, smooth, smooth_orig, wcscales): ``[n]``."""
    if packed.ndim != 1 or packed.shape[0] % _WARP_N:
        raise DCGenError(f"expected a packed vector of a multiple of {_WARP_N} values, found {list(packed.shape)}.")
    return unpack_wscales(packed.reshape(1, -1), group_size=-1).reshape(-1)


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """Undo ``pack_lowrank_weight``: ``lora_down`` ``[in, rank]`` -> ``[rank, in]``; ``lora_up`` ``[out, rank]`` ->
    ``[out, rank]`` (nunchaku_converter.unpack_lowrank_weight)."""
    c, r = packed.shape
    if c % _LR_FRAG or r % _LR_FRAG:
        raise DCGenError(f"{'lora_down' if down else 'lora_up'}: expected both sizes multiples of {_LR_FRAG}, "
                         f"found {list(packed.shape)}.")
    if r == 0:
        return packed.new_zeros((0, c) if down else (c, 0))
    if down:
        r_frags, c_frags = r // _LR_FRAG, c // _LR_FRAG
    else:
        c_frags, r_frags = c // _LR_FRAG, r // _LR_FRAG
    # (c_frags, r_frags, n_lanes, k_lanes, n_pack, k_pack, lane_k) -> (c, r, n_pack, n_lanes, k_pack, k_lanes, lane_k)
    w = packed.contiguous().view(c_frags, r_frags, 8, 4, 2, 2, 2).permute(0, 1, 4, 2, 5, 3, 6).contiguous()
    w = w.view(c_frags, r_frags, _LR_FRAG, _LR_FRAG)
    if down:
        return w.permute(1, 2, 0, 3).contiguous().view(r, c)
    return w.permute(0, 2, 1, 3).contiguous().view(c, r)


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Undo TinyChat ``pack_w4`` (nunchaku models/text_encoders/tinychat_utils.py), as stored by nunchaku's GEMV_AWQ:
    int32 ``[out/4, in/2]`` -> uint8 codes ``[out, in]`` (0..15, zero point 7 stored pre-scaled in ``wzeros``)."""
    if qweight.dtype != torch.int32 or qweight.ndim != 2:
        raise DCGenError(f"AWQ qweight: expected int32 [out/4, in/2], found {qweight.dtype} {list(qweight.shape)}.")
    oc, ic = qweight.shape[0] * 4, qweight.shape[1] * 2
    if ic % 64:
        raise DCGenError(f"AWQ qweight: expected in a multiple of 64, found {ic}.")
    h = qweight.contiguous().view(torch.int16).to(torch.int32)            # [oc/4, ic], packed int16 words
    h = h.view(oc // 4, ic // 64, 4, 16).permute(0, 2, 1, 3).reshape(-1, 8)  # undo the 4-row interleave
    nib = torch.stack([(h >> (4 * j)) & 0xF for j in range(4)], dim=1)     # [words/8, 4, 8]: element j*8 + t
    return nib.reshape(oc, ic).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Kinds, GPUs, the lazy nunchaku import
# --------------------------------------------------------------------------------------------------------------------

def _kind(kind: str) -> str:
    k = str(kind).lower()
    if k in ("int4",):
        return "int4"
    if k in ("fp4", "nvfp4", "fp4_e2m1_all"):
        return "fp4"
    raise DCGenError(f"SVDQuant kind: expected 'int4' or 'fp4' (nunchaku weight dtype 'int4' / 'fp4_e2m1_all'), "
                     f"found {kind!r}.")
