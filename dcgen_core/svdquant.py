"""Pure-torch reader for nunchaku SVDQuant FLUX transformer files (int4 and NVFP4 "fp4").

Imports only torch and safetensors; the real nunchaku (https://github.com/nunchaku-tech/nunchaku, formerly
mit-han-lab/nunchaku) is imported lazily, inside :func:`require_nunchaku`, and only used by
:meth:`SVDQuantWeight.forward` when the input is on a GPU that nunchaku supports.

Everything below was worked out from nunchaku commit 4132b3bffdb7d520ecb30ac6983ee482a39f9362 (2025-08-23,
version 1.0.0dev) and deepcompressor commit 69f3473f5e1c1504bae35cc50c7858ef900a9b17 (the converter that writes
these files). Files read:

* nunchaku/lora/flux/packer.py (NunchakuWeightPacker: pack_weight, pack_scale, pack_micro_scale,
  pack_lowrank_weight / unpack_lowrank_weight) -- the tile layouts undone here.
* nunchaku/lora/flux/nunchaku_converter.py (module name maps, LoRA concatenation onto lora_down/lora_up,
  fuse_vectors: bias/smooth are stored packed; single-block proj_out split).
* nunchaku/models/linear.py (SVDQW4A4Linear: parameter shapes/dtypes; AWQW4A16Linear), nunchaku/ops/quantize.py,
  nunchaku/ops/gemm.py, nunchaku/ops/fused.py (python wrappers of the CUDA ops, fused GELU MLP).
* nunchaku/models/transformers/transformer_flux.py (v1 loader), transformer_flux_v2.py (convert_flux_state_dict:
  file key -> module names; single block = mlp_fc1, mlp_fc2, attn.to_qkv, attn.to_out), normalization.py (AdaLN
  row interleave, scale_shift=0), text_encoders/tinychat_utils.py (AWQ pack_w4), utils.py
  (check_hardware_compatibility), merge_safetensors.py (header metadata).
* src/Linear.cpp (GEMM_W4A4: file keys qweight/wscales/bias/lora_down/lora_up/smooth/wtscale/wcscales, in/out
  padded to 128; GEMV_AWQ: qweight/wscales/wzeros/bias), src/FluxModel.cpp (block layout, forward_mlp),
  src/kernels/zgemm/gemm_w4a4.cuh (quantize_w4a4_fuse_lora_kernel, EpilogueQuantize, fp4 kernel alpha),
  src/kernels/zgemm/gemm_base.cuh (EpilogueBias: out*wcscales + bias), src/kernels/zgemm/gemm_w4a4_launch_impl.cuh
  (epilogue order, SHIFT_GELU = 0.171875), src/kernels/awq/gemv_awq.cu (w = q*scale + scaled_zero).
* deepcompressor/backend/nunchaku/convert.py and utils.py (convert_to_nunchaku_w4x4y16_linear_state_dict: lora_down
  divided by smooth, shift folded into bias, smooth_orig / smooth=ones when fused, wtscale/wcscales/wscales keys;
  AdaLN "+1" and row interleave), deepcompressor/nn/patch/linear.py (ConcatLinear: bias on the last sub-linear;
  ShiftedLinear).

Semantics of one SVDQuant W4A4 linear as nunchaku runs it (all vectors below are stored *packed*, see unpackers)::

    lora_act = x @ lora_down                    # on the ORIGINAL x (quantize_w4a4_fuse_lora_kernel applies
                                                # EpilogueLoraDown to the raw input before EpilogueQuantize)
    xq       = quant4((x + shift) / smooth)     # per group of 64 (int4, bf16 scales) or 16 (fp4, fp8 scales)
    y        = (xq @ dequant(qweight).T) * wtscale * wcscales + bias + lora_act @ lora_up.T

so with activations left unquantized the layer is exactly
``y = x @ W_eff.T + (x @ down.T) @ up.T + bias_eff`` with ``W_eff = dequant(qweight) * wcscales[:, None] * wtscale
/ smooth[None, :]`` and ``bias_eff = bias + shift * W_eff.sum(1)``. ``shift`` is 0 except for the int4 layers fed by
nunchaku's fused GELU MLP (``mlp_fc2``, ``mlp_context_fc2``), whose quantized input is GELU(h) + 0.171875 (unsigned
int4); deepcompressor stored their bias already lowered by that shift (ShiftedLinear), so ``bias_eff`` restores it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .checkpoints import read_safetensors_header
from .errors import DCGenError

__all__ = [
    "E2M1_VALUES",
    "GROUP_SIZE",
    "NUNCHAKU_FLUX_MODULES",
    "NUNCHAKU_FLUX_PLAIN_KEYS",
    "SHIFT_GELU_INT4",
    "AWQW4A16Weight",
    "NunchakuModule",
    "SVDQuantFile",
    "SVDQuantInfo",
    "SVDQuantWeight",
    "flux_module_info",
    "int4_from_nibbles",
    "nunchaku_supports",
    "read_svdquant_file",
    "require_nunchaku",
    "unpack_awq_qweight",
    "unpack_lowrank",
    "unpack_qweight",
    "unpack_vector",
    "unpack_wscales",
]

# --------------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------------

#: e2m1 code -> value: bit 3 sign, bits 2..1 exponent, bit 0 mantissa (deepcompressor backend/utils.py fp_quantize
#: codebook; the same as the hardware NVFP4 encoding).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: shift added to GELU outputs before the unsigned int4 quantization of the next layer (nunchaku
#: src/kernels/zgemm/gemm_w4a4_launch_impl.cuh, ``SHIFT_GELU``; fp4 uses 0).
SHIFT_GELU_INT4 = 0.171875

#: group size of the weight scales, by kind (nunchaku models/linear.py SVDQW4A4Linear).
GROUP_SIZE = {"int4": 64, "fp4": 16}

#: GPUs nunchaku accepts (nunchaku utils.check_hardware_compatibility; sm 121 from newer releases).
_SUPPORTED_SM = {"int4": frozenset({75, 80, 86, 89}), "fp4": frozenset({120, 121})}

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


def _sm(sm) -> int:
    if isinstance(sm, (tuple, list)) and len(sm) == 2:
        return int(sm[0]) * 10 + int(sm[1])
    if isinstance(sm, str):
        s = sm.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        return int(s)
    return int(sm)


def nunchaku_supports(kind: str, sm) -> bool:
    """Whether nunchaku runs ``kind`` ("int4" / "fp4") on a GPU of compute capability ``sm`` (89, (8, 9), "sm_89").

    int4: sm 75, 80, 86, 89 (Turing, Ampere, Ada). fp4: sm 120, 121 (consumer Blackwell). Nothing else (sm 90 Hopper
    and sm 100 datacenter Blackwell lack the 4-bit mma nunchaku uses)."""
    return _sm(sm) in _SUPPORTED_SM[_kind(kind)]


_INSTALL_HINT = ("Install the real nunchaku from the wheels on its GitHub releases page "
                 "(https://github.com/nunchaku-tech/nunchaku/releases, formerly mit-han-lab/nunchaku), choosing the "
                 "wheel that matches your torch and python versions. The PyPI package named 'nunchaku' is an "
                 "unrelated project: do not pip install it.")


def _import_nunchaku():
    """Import nunchaku's python wrappers of its CUDA ops; returns (namespace, None) or (None, problem text)."""
    try:
        spec = importlib.util.find_spec("nunchaku")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, ("nunchaku is not installed (expected the nunchaku package with its CUDA ops, found none). "
                      f"{_INSTALL_HINT}")
    where = (spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0])
    try:
        ops_spec = importlib.util.find_spec("nunchaku.ops")
    except (ImportError, ValueError):
        ops_spec = None
    if ops_spec is None:
        return None, (f"the 'nunchaku' package at {where} is not nunchaku's SVDQuant engine (expected the module "
                      f"nunchaku.ops with quantize/gemm wrappers, found none: probably the unrelated PyPI project "
                      f"of that name). Uninstall it. {_INSTALL_HINT}")
    try:
        gemm = importlib.import_module("nunchaku.ops.gemm")
        quantize = importlib.import_module("nunchaku.ops.quantize")
    except Exception as e:  # noqa: BLE001 - the CUDA extension may fail in many ways
        return None, (f"nunchaku at {where} is installed but its CUDA extension did not load (expected nunchaku._C "
                      f"to import, found {type(e).__name__}: {e}). Install the wheel built for your torch version "
                      f"({torch.__version__}). {_INSTALL_HINT}")
    if not hasattr(gemm, "svdq_gemm_w4a4_cuda") or not hasattr(quantize, "svdq_quantize_w4a4_act_fuse_lora_cuda"):
        return None, (f"nunchaku at {where} lacks svdq_gemm_w4a4_cuda / svdq_quantize_w4a4_act_fuse_lora_cuda "
                      f"(expected nunchaku >= 1.0, found an older or different package). {_INSTALL_HINT}")

    class _Ops:
        gemm_w4a4 = staticmethod(gemm.svdq_gemm_w4a4_cuda)
        quantize_w4a4_act_fuse_lora = staticmethod(quantize.svdq_quantize_w4a4_act_fuse_lora_cuda)
        location = where

    return _Ops, None


def require_nunchaku(device, kind: str | None = None):
    """Import nunchaku's CUDA ops for ``device`` or raise one :class:`DCGenError` listing every problem found.

    Checks: nunchaku installed (and the real one, not the unrelated PyPI project), ``device`` a CUDA device, and
    (when ``kind`` is given: "int4"/"fp4") that nunchaku supports that GPU for that kind (:func:`nunchaku_supports`).
    Returns a namespace with ``gemm_w4a4`` (nunchaku.ops.gemm.svdq_gemm_w4a4_cuda) and
    ``quantize_w4a4_act_fuse_lora`` (nunchaku.ops.quantize.svdq_quantize_w4a4_act_fuse_lora_cuda).
    """
    problems = []
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    kinds = [_kind(kind)] if kind is not None else ["int4", "fp4"]
    if dev.type != "cuda":
        problems.append(f"nunchaku's SVDQuant kernels run only on NVIDIA GPUs (expected a cuda device with sm "
                        f"75/80/86/89 for int4 or 120/121 for fp4, found device '{dev}').")
    elif not torch.cuda.is_available():
        problems.append(f"expected a CUDA GPU for device '{dev}', found torch.cuda unavailable "
                        f"(torch {torch.__version__}).")
    else:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        sm = _sm(torch.cuda.get_device_capability(idx))
        if not any(nunchaku_supports(k, sm) for k in kinds):
            try:
                name = torch.cuda.get_device_name(idx)
            except Exception:  # noqa: BLE001
                name = "GPU"
            want = " or ".join(f"sm {'/'.join(str(s) for s in sorted(_SUPPORTED_SM[k]))} for {k}" for k in kinds)
            problems.append(f"nunchaku does not support this GPU (expected {want}, found sm {sm} on {name} "
                            f"'{dev}'). On this GPU set svdquant_backend to auto or torch (the pack's pure-torch path), or use an "
                            f"NVFP4 / bf16 checkpoint.")
    ops, problem = _import_nunchaku()
    if problem:
        problems.insert(0, problem)
    if problems:
        raise DCGenError("nunchaku SVDQuant kernels unavailable: " + " ".join(
            f"({i}) {p}" for i, p in enumerate(problems, 1)))
    return ops


# --------------------------------------------------------------------------------------------------------------------
# One quantized linear
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class SVDQuantWeight:
    """One nunchaku SVDQuant W4A4 linear, holding the tensors exactly as stored (packed).

    File keys (src/Linear.cpp GEMM_W4A4; nunchaku v2 renames in memory: smooth -> smooth_factor, smooth_orig ->
    smooth_factor_orig, lora_down/lora_up -> proj_down/proj_up; both spellings are accepted):

    * ``qweight`` int8 ``[out, in/2]``: 4-bit codes in the MMA tile layout (int4 two's complement / e2m1).
    * ``wscales`` ``[in/G, out]``: int4 bf16/fp16 group-64 scales; fp4 float8_e4m3fn group-16 scales (micro layout).
    * ``smooth`` ``[in]`` (packed): the kernel divides activations by it before quantizing; the stored weight is
      the smoothed one (W * smooth). ``smooth_orig``: the factor before fusion; for ``out_proj``/``out_proj_context``
      deepcompressor fused the smoothing into the V rows of ``qkv_proj`` and stores ``smooth`` = ones there.
      Informational only; never used by nunchaku's forward.
    * ``lora_down`` ``[in, rank]``, ``lora_up`` ``[out, rank]`` (low-rank fragments): the low-rank branch, acting
      on the original (unsmoothed, unshifted) x; deepcompressor divided lora_down by smooth when converting, and
      nunchaku concatenates a diffusers LoRA's lora_A/lora_B onto them unchanged.
    * ``bias`` ``[out]`` (packed), ``wcscales`` ``[out]`` (packed, per channel) and ``wtscale`` ``[1]`` (per
      tensor, the kernel's ``alpha``): fp4 only, and deepcompressor's converter writes one of the two per layer
      (wtscale for a per-tensor scale, wcscales for a per-channel one or a fused qkv's per-tensor scales); nunchaku
      accepts both; output = acc * wtscale * wcscales + bias.
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor | None = None
    wcscales: torch.Tensor | None = None
    wtscale: torch.Tensor | None = None
    smooth_orig: torch.Tensor | None = None
    kind: str = "int4"
    group_size: int = 64
    in_features: int = 0
    out_features: int = 0
    act_shift: float = 0.0   # SHIFT_GELU_INT4 for int4 mlp_fc2 / mlp_context_fc2 (fused-GELU input), else 0
    name: str = ""
    _packed_dev: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.kind = _kind(self.kind)
        if self.group_size != GROUP_SIZE[self.kind]:
            raise DCGenError(f"{self.name or 'SVDQuant linear'}: expected group size {GROUP_SIZE[self.kind]} for "
                             f"{self.kind} (the only one nunchaku supports), found {self.group_size}.")
        out, half_in = self.qweight.shape
        self.out_features = self.out_features or out
        self.in_features = self.in_features or half_in * 2

    @property
    def rank(self) -> int:
        return int(self.lora_up.shape[1])

    # ---- natural (unpacked) tensors -------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Quantized codes ``[out, in]``: int8 -8..7 (int4) or uint8 e2m1 codes 0..15 (fp4)."""
        nib = unpack_qweight(self.qweight)
        return int4_from_nibbles(nib) if self.kind == "int4" else nib

    def scales(self) -> torch.Tensor:
        """Group scales ``[out, in/G]`` in their stored dtype (bf16/fp16 for int4, float8_e4m3fn for fp4)."""
        return unpack_wscales(self.wscales, self.group_size)

    def smooth_factor(self) -> torch.Tensor:
        return unpack_vector(self.smooth)

    def bias_vector(self) -> torch.Tensor | None:
        return None if self.bias is None else unpack_vector(self.bias)

    def channel_scales(self) -> torch.Tensor | None:
        return None if self.wcscales is None else unpack_vector(self.wcscales)

    def tensor_scale(self) -> float:
        return 1.0 if self.wtscale is None else float(self.wtscale.reshape(-1)[0].float())

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [rank, in], up [out, rank])`` in the stored dtype. The branch adds ``(x @ down.T) @ up.T`` with x
        the layer's ORIGINAL input: nunchaku's quantize kernel runs the lora-down epilogue on the raw input before
        dividing by smooth (gemm_w4a4.cuh quantize_w4a4_fuse_lora_kernel), and before the GELU shift of mlp_fc2."""
        return unpack_lowrank(self.lora_down, down=True), unpack_lowrank(self.lora_up, down=False)

    # ---- dense views ----------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_eff [out, in]`` such that, activations unquantized, ``y = x @ W_eff.T + (x @ down.T) @ up.T + bias``
        (use :meth:`effective_bias` as bias: it differs from the stored bias only for int4 mlp_fc2 layers)."""
        codes = self.codes()
        if self.kind == "int4":
            vals = codes.to(torch.float32)
        else:
            vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes.long()]
        out, k = vals.shape
        s = self.scales().to(torch.float32)
        w = (vals.view(out, k // self.group_size, self.group_size) * s[:, :, None]).view(out, k)
        cs = self.channel_scales()
        if cs is not None:
            w = w * cs.to(torch.float32)[:, None]
        ts = self.tensor_scale()
        if ts != 1.0:
            w = w * ts
        w = w / self.smooth_factor().to(torch.float32)[None, :]
        return w.to(dtype)

    def effective_bias(self, dtype: torch.dtype = torch.float32, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Bias of the dense equivalent: stored bias + act_shift * W_eff.sum(1) (zeros when there is no bias)."""
        b = self.bias_vector()
        b = torch.zeros(self.out_features, dtype=torch.float32) if b is None else b.to(torch.float32)
        if self.act_shift:
            w = self.dequantize(torch.float32) if weight is None else weight.to(torch.float32)
            b = b + self.act_shift * w.sum(dim=1)
        return b.to(dtype)

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
        """``y = x @ W_eff.T + (x @ down.T) @ up.T + bias_eff`` for x ``[..., in]``.

        ``use_kernel``: None (default) runs nunchaku's CUDA kernels when x is on a GPU that nunchaku supports and
        nunchaku is installed, else the weight-only torch path; True requires the kernels (raises DCGenError);
        False always runs the torch path (float32 math, result in x.dtype)."""
        if x.shape[-1] != self.in_features:
            raise DCGenError(f"{self.name or 'SVDQuant linear'}: expected input with {self.in_features} features, "
                             f"found shape {list(x.shape)}.")
        if use_kernel is None:
            use_kernel = False
            if x.is_cuda:
                try:
                    require_nunchaku(x.device, self.kind)
                    use_kernel = True
                except DCGenError:
                    use_kernel = False
        if use_kernel:
            return self._forward_nunchaku(x)
        w = self.dequantize(torch.float32).to(x.device)
        down, up = self.low_rank()
        xf = x.to(torch.float32)
        y = torch.nn.functional.linear(xf, w, self.effective_bias(torch.float32, weight=w).to(x.device))
        if up.shape[1]:
            y = y + torch.nn.functional.linear(
                torch.nn.functional.linear(xf, down.to(x.device, torch.float32)), up.to(x.device, torch.float32))
        return y.to(x.dtype)

    __call__ = forward

    def _packed_on(self, device: torch.device, dtype: torch.dtype) -> dict:
        key = (str(device), dtype)
        if key not in self._packed_dev:
            def mv(t, keep=False):
                if t is None:
                    return None
                t = t.to(device)
                return t if keep or not t.is_floating_point() or t.dtype == torch.float8_e4m3fn else t.to(dtype)
            down = self.lora_down
            if down.shape[1] == 0:
                down = down.new_zeros((self.in_features, 0))
            self._packed_dev.clear()
            self._packed_dev[key] = {
                "qweight": mv(self.qweight), "wscales": mv(self.wscales), "smooth": mv(self.smooth),
                "lora_down": mv(down), "lora_up": mv(self.lora_up), "bias": mv(self.bias),
                "wcscales": mv(self.wcscales),
            }
        return self._packed_dev[key]

    def _forward_nunchaku(self, x: torch.Tensor) -> torch.Tensor:
        """nunchaku's own path (models/linear.py SVDQW4A4Linear.forward): quantize activations with the fused
        lora-down and smooth (ops/quantize.py), then the fused W4A4 gemm + lora-up + bias (ops/gemm.py)."""
        ops = require_nunchaku(x.device, self.kind)
        sm = _sm(torch.cuda.get_device_capability(x.device))
        # bf16 kernels need sm >= 80 (quantize_w4a4_fuse_lora_kernel MIN_ARCH); Turing runs fp16
        dtype = torch.float16 if sm < 80 else (self.lora_up.dtype if self.lora_up.is_floating_point() else
                                               torch.bfloat16)
        p = self._packed_on(x.device, dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()
        xin = x2 + self.act_shift if self.act_shift else x2
        fp4 = self.kind == "fp4"
        qx, ascales, lora_act = ops.quantize_w4a4_act_fuse_lora(xin, lora_down=p["lora_down"], smooth=p["smooth"],
                                                               fp4=fp4)
        out = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x.device)
        ops.gemm_w4a4(act=qx, wgt=p["qweight"], out=out, ascales=ascales, wscales=p["wscales"],
                      lora_act_in=lora_act, lora_up=p["lora_up"], bias=p["bias"], fp4=fp4,
                      alpha=self.tensor_scale(), wcscales=p["wcscales"], act_unsigned=False)
        if self.act_shift and self.rank:
            # the kernel's lora-down saw x + shift; nunchaku's fused MLP feeds it the unshifted GELU output
            down, up = self.low_rank()
            corr = self.act_shift * (up.to(torch.float32) @ down.to(torch.float32).sum(dim=1))
            out = out - corr.to(x.device, dtype)
        return out.reshape(*lead, self.out_features).to(x.dtype)


@dataclass
class AWQW4A16Weight:
    """One nunchaku AWQ W4A16 linear (the AdaLayerNorm ``norm1.linear`` / ``norm1_context.linear`` / single-block
    ``norm.linear``): ``qweight`` int32 ``[out/4, in/2]`` (TinyChat pack_w4), ``wscales`` / ``wzeros``
    ``[in/64 (padded), out]``, ``bias`` ``[out]`` (plain). Weight = code * wscales + wzeros (gemv_awq.cu: hfma2(q, scale, scaled_zero)).

    Rows are in nunchaku's interleaved AdaLN order (row ``j * splits + s`` is chunk ``s``, channel ``j``; split_mod /
    normalization.py ``view(B, -1, splits)``) and the bias of the scale chunks carries the "+1" of ``1 + scale``
    (deepcompressor convert_to_nunchaku_w4x16_linear_weight: delta[1] = delta[-2] = 1; nunchaku runs scale_shift=0).
    :meth:`to_diffusers` undoes both."""

    qweight: torch.Tensor
    wscales: torch.Tensor
    wzeros: torch.Tensor
    bias: torch.Tensor | None = None
    group_size: int = 64
    adanorm_splits: int = 1
    name: str = ""

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0] * 4)

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1] * 2)

    def codes(self) -> torch.Tensor:
        return unpack_awq_qweight(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight ``[out, in]`` in nunchaku's (interleaved) row order."""
        q = self.codes().to(torch.float32)
        out, k = q.shape
        ng = k // self.group_size
        s = self.wscales[:ng].to(torch.float32).t()
        z = self.wzeros[:ng].to(torch.float32).t()
        w = q.view(out, ng, self.group_size) * s[:, :, None] + z[:, :, None]
        return w.view(out, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.device, torch.float32)
        return torch.nn.functional.linear(x.to(torch.float32), self.dequantize().to(x.device), b).to(x.dtype)

    __call__ = forward

    def to_diffusers(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the diffusers ``...norm*.linear`` (chunk-major rows, bias without the +1)."""
        w = self.dequantize(torch.float32)
        s = self.adanorm_splits
        b = None if self.bias is None else self.bias.to(torch.float32)
        if s > 1:
            out, k = w.shape
            w = w.view(out // s, s, k).transpose(0, 1).reshape(out, k)
            if b is not None:
                b = b.view(out // s, s).clone()
                for i in sorted({1, s - 2}):  # deepcompressor: delta[1] = delta[-2] = 1
                    b[:, i] -= 1.0
                b = b.t().reshape(out)
        return w.to(dtype), (None if b is None else b.to(dtype))


# --------------------------------------------------------------------------------------------------------------------
# Module table
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NunchakuModule:
    """A quantized module of nunchaku's FLUX layout and the diffusers ``FluxTransformer2DModel`` linear(s) it holds.

    ``fuse``: "one" (same linear), "rows" (diffusers outputs concatenated in the order given, e.g. q; k; v),
    "in_slice" (a slice of the diffusers linear's input columns: ``in_slice`` = (start, stop) in units of the
    inner dim ``D = heads * head_dim``; the diffusers output is the SUM of the slices' outputs).
    ``quant``: "svdq" (W4A4, :class:`SVDQuantWeight`) or "awq" (W4A16 AdaLN, :class:`AWQW4A16Weight`)."""

    block: str
    name: str
    diffusers: tuple[str, ...]
    fuse: str = "one"
    quant: str = "svdq"
    in_slice: tuple[int, int] | None = None
    shifted_input_int4: bool = False
    adanorm_splits: int = 1
    note: str = ""


# Sources: nunchaku/lora/flux/nunchaku_converter.py (local_name_map of convert_to_nunchaku_flux_transformer_block_
# lowrank_dict / ..._single_transformer_block_lowrank_dict, fuse_vectors name_map), nunchaku/models/transformers/
# transformer_flux_v2.py (convert_flux_state_dict, NunchakuFluxSingleTransformerBlock), src/FluxModel.cpp
# (JointTransformerBlock / FluxSingleTransformerBlock children), deepcompressor/backend/nunchaku/convert.py
# (convert_to_nunchaku_flux_*_block_state_dict), deepcompressor/app/diffusion/nn/patch.py + nn/patch/linear.py
# (single-block proj_out -> ConcatLinear([D, mlp]) with the bias on the LAST sub-linear).
_DB, _SB = "transformer_blocks", "single_transformer_blocks"
NUNCHAKU_FLUX_MODULES: dict[tuple[str, str], NunchakuModule] = {(m.block, m.name): m for m in (
    # ---- double (joint) blocks: image stream and its context ("_context") twin ----
    NunchakuModule(_DB, "norm1.linear", ("norm1.linear",), quant="awq", adanorm_splits=6,
                   note="AdaLayerNormZero 6*D outputs, rows interleaved, +1 on scale_msa/scale_mlp bias"),
    NunchakuModule(_DB, "norm1_context.linear", ("norm1_context.linear",), quant="awq", adanorm_splits=6,
                   note="context twin of norm1.linear"),
    NunchakuModule(_DB, "qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), fuse="rows",
                   note="V rows carry 1/smooth_orig of out_proj (smoothing fused), biases concatenated"),
    NunchakuModule(_DB, "qkv_proj_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                   fuse="rows", note="context twin of qkv_proj"),
    NunchakuModule(_DB, "out_proj", ("attn.to_out.0",), note="smooth stored as ones (fused into V)"),
    NunchakuModule(_DB, "out_proj_context", ("attn.to_add_out",), note="context twin; same fused smoothing"),
    NunchakuModule(_DB, "mlp_fc1", ("ff.net.0.proj",), note="GELU(tanh) follows, fused with mlp_fc2"),
    NunchakuModule(_DB, "mlp_fc2", ("ff.net.2",), shifted_input_int4=True,
                   note="int4: input is GELU + 0.171875 (unsigned), bias lowered accordingly"),
    NunchakuModule(_DB, "mlp_context_fc1", ("ff_context.net.0.proj",), note="context twin of mlp_fc1"),
    NunchakuModule(_DB, "mlp_context_fc2", ("ff_context.net.2",), shifted_input_int4=True,
                   note="context twin of mlp_fc2"),
    # ---- single blocks: proj_out [D, D + 4D] is split by input columns into out_proj + mlp_fc2, outputs summed ----
    NunchakuModule(_SB, "norm.linear", ("norm.linear",), quant="awq", adanorm_splits=3,
                   note="AdaLayerNormZeroSingle 3*D outputs, rows interleaved, +1 on scale bias"),
    NunchakuModule(_SB, "qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), fuse="rows",
                   note="shares its input (and smooth) with mlp_fc1"),
    NunchakuModule(_SB, "mlp_fc1", ("proj_mlp",), note="GELU(tanh) follows, fused with mlp_fc2"),
    NunchakuModule(_SB, "out_proj", ("proj_out",), fuse="in_slice", in_slice=(0, 1),
                   note="proj_out[:, :D] on the attention output; smooth fused into V. fuse_vectors puts LoRA bias "
                        "deltas of proj_out here"),
    NunchakuModule(_SB, "mlp_fc2", ("proj_out",), fuse="in_slice", in_slice=(1, 5), shifted_input_int4=True,
                   note="proj_out[:, D:] on the MLP hidden; deepcompressor's ConcatLinear stores proj_out.bias here. "
                        "diffusers proj_out.bias = out_proj bias + mlp_fc2 bias (effective)"),
)}

#: plain (bf16) tensors inside nunchaku blocks -> diffusers names (same parameter name after the module path).
NUNCHAKU_FLUX_PLAIN_KEYS = {
    (_DB, "norm_q"): "attn.norm_q", (_DB, "norm_k"): "attn.norm_k",
    (_DB, "norm_added_q"): "attn.norm_added_q", (_DB, "norm_added_k"): "attn.norm_added_k",
    (_SB, "norm_q"): "attn.norm_q", (_SB, "norm_k"): "attn.norm_k",
}


def flux_module_info(path: str) -> NunchakuModule | None:
    """The table entry for a nunchaku module path such as ``transformer_blocks.3.qkv_proj_context``."""
    parts = path.split(".")
    if len(parts) < 3 or parts[0] not in (_DB, _SB) or not parts[1].isdigit():
        return None
    return NUNCHAKU_FLUX_MODULES.get((parts[0], ".".join(parts[2:])))


# --------------------------------------------------------------------------------------------------------------------
# File reader
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class SVDQuantInfo:
    kind: str               # "int4" | "fp4"
    weight_dtype: str       # as in the file: "int4" | "fp4_e2m1_all"
    group_size: int         # 64 | 16
    rank: int | None        # quantization_config "rank" when present, else the base low-rank size found
    raw: dict


@dataclass
class SVDQuantFile:
    path: str
    config: dict                                  # diffusers FluxTransformer2DModel config
    quant: SVDQuantInfo
    comfy_config: dict | None
    metadata: dict
    linears: dict[str, SVDQuantWeight]            # nunchaku module path -> W4A4 linear
    awq: dict[str, AWQW4A16Weight]                # nunchaku module path -> W4A16 AdaLN linear
    other: dict[str, torch.Tensor]                # plain tensors (x_embedder, proj_out, norms, embedders, ...)


_SVDQ_PARAMS = {"qweight": "qweight", "wscales": "wscales", "bias": "bias", "smooth": "smooth",
                "smooth_factor": "smooth", "smooth_orig": "smooth_orig", "smooth_factor_orig": "smooth_orig",
                "lora_down": "lora_down", "proj_down": "lora_down", "lora_up": "lora_up", "proj_up": "lora_up",
                "wcscales": "wcscales", "wtscale": "wtscale"}
_AWQ_PARAMS = {"qweight", "wscales", "wzeros", "bias"}
_FP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _json_meta(path: str, meta: dict, key: str):
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise DCGenError(f"{path}: expected header metadata '{key}' to be JSON, found unreadable text "
                         f"({str(raw)[:80]!r}).") from e


def _parse_quant(path: str, meta: dict) -> SVDQuantInfo:
    qc = _json_meta(path, meta, "quantization_config")
    if not isinstance(qc, dict):
        raise DCGenError(f"{path}: expected header metadata 'quantization_config' (a nunchaku SVDQuant file made by "
                         f"nunchaku's merge_safetensors), found {'none' if qc is None else type(qc).__name__}. "
                         f"Metadata keys found: {sorted(meta) or 'none'}.")
    w = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
    wd = w.get("dtype")
    if wd not in ("int4", "fp4_e2m1_all"):
        raise DCGenError(f"{path}: expected quantization_config weight dtype 'int4' or 'fp4_e2m1_all' (the SVDQuant "
                         f"formats nunchaku runs), found {wd!r}.")
    kind = _kind(wd)
    gs = w.get("group_size", GROUP_SIZE[kind])
    if gs != GROUP_SIZE[kind]:
        raise DCGenError(f"{path}: expected group size {GROUP_SIZE[kind]} for {wd} (the only one nunchaku supports), "
                         f"found {gs}.")
    rank = qc.get("rank")
    return SVDQuantInfo(kind=kind, weight_dtype=wd, group_size=int(gs), rank=int(rank) if rank else None, raw=qc)


def _check(path, module, cond, what, expected, found):
    if not cond:
        raise DCGenError(f"{path}: tensor '{module}.{what}': expected {expected}, found {found}.")


def _build_svdq(path: str, module: str, t: dict[str, torch.Tensor], quant: SVDQuantInfo) -> SVDQuantWeight:
    missing = [k for k in ("qweight", "wscales", "smooth") if k not in t]
    if missing:
        raise DCGenError(f"{path}: quantized linear '{module}' is incomplete: expected tensors qweight, wscales, "
                         f"smooth (+ bias, lora_down, lora_up), found {', '.join(sorted(t))}; missing "
                         f"{', '.join(missing)}. The file is damaged or not a complete nunchaku SVDQuant file.")
    if ("lora_down" in t) != ("lora_up" in t):
        have, lack = ("lora_down", "lora_up") if "lora_down" in t else ("lora_up", "lora_down")
        raise DCGenError(f"{path}: quantized linear '{module}' has {have} but no {lack} (expected both or neither).")
    qw = t["qweight"]
    _check(path, module, qw.dtype == torch.int8 and qw.ndim == 2, "qweight", "int8 [out, in/2]",
           f"{qw.dtype} {list(qw.shape)}")
    out, inn = qw.shape[0], qw.shape[1] * 2
    _check(path, module, out % _WARP_N == 0 and inn % (_MEM_K * _NUM_K_UNROLLS) == 0, "qweight",
           f"out a multiple of {_WARP_N} and in a multiple of {_MEM_K * _NUM_K_UNROLLS}", f"[{out}, {inn}]")
    gs = quant.group_size
    ws = t["wscales"]
    want_ws = "float8_e4m3fn" if quant.kind == "fp4" else "bfloat16/float16"
    ok_dtype = ws.dtype == torch.float8_e4m3fn if quant.kind == "fp4" else ws.dtype in (torch.bfloat16, torch.float16)
    _check(path, module, ok_dtype, "wscales", f"{want_ws} scales for {quant.weight_dtype}",
           f"{ws.dtype} (the file's tensors do not match its quantization_config)")
    _check(path, module, list(ws.shape) == [inn // gs, out], "wscales", f"shape [{inn // gs}, {out}]",
           list(ws.shape))
    for k, n in (("smooth", inn), ("smooth_orig", inn), ("bias", out), ("wcscales", out)):
        if k in t:
            v = t[k]
            _check(path, module, v.ndim == 1 and v.shape[0] == n and v.dtype in _FP_DTYPES, k,
                   f"a floating vector of {n}", f"{v.dtype} {list(v.shape)}")
    if "wtscale" in t:
        _check(path, module, t["wtscale"].numel() == 1 and t["wtscale"].dtype in _FP_DTYPES, "wtscale",
               "one floating value", f"{t['wtscale'].dtype} {list(t['wtscale'].shape)}")
    if "lora_down" in t:
        d, u = t["lora_down"], t["lora_up"]
        _check(path, module, d.ndim == 2 and d.shape[0] == inn and d.dtype in _FP_DTYPES, "lora_down",
               f"[{inn}, rank]", f"{d.dtype} {list(d.shape)}")
        _check(path, module, u.ndim == 2 and u.shape[0] == out and u.shape[1] == d.shape[1] and u.dtype in _FP_DTYPES,
               "lora_up", f"[{out}, {d.shape[1]}]", f"{u.dtype} {list(u.shape)}")
        _check(path, module, d.shape[1] % _LR_FRAG == 0, "lora_down", f"a rank that is a multiple of {_LR_FRAG}",
               d.shape[1])
        down, up = d, u
    else:  # nunchaku's v1 loader substitutes an empty low-rank branch
        dt = t["smooth"].dtype
        down, up = torch.zeros(inn, 0, dtype=dt), torch.zeros(out, 0, dtype=dt)
    info = flux_module_info(module)
    shift = SHIFT_GELU_INT4 if (quant.kind == "int4" and info is not None and info.shifted_input_int4) else 0.0
    return SVDQuantWeight(qweight=qw, wscales=ws, smooth=t["smooth"], lora_down=down, lora_up=up, bias=t.get("bias"),
                          wcscales=t.get("wcscales"), wtscale=t.get("wtscale"), smooth_orig=t.get("smooth_orig"),
                          kind=quant.kind, group_size=gs, in_features=inn, out_features=out, act_shift=shift,
                          name=module)


def _build_awq(path: str, module: str, t: dict[str, torch.Tensor]) -> AWQW4A16Weight:
    missing = [k for k in ("qweight", "wscales", "wzeros") if k not in t]
    if missing:
        raise DCGenError(f"{path}: AWQ linear '{module}' is incomplete: expected qweight, wscales, wzeros, bias, found "
                         f"{', '.join(sorted(t))}; missing {', '.join(missing)}.")
    qw = t["qweight"]
    out, inn = qw.shape[0] * 4, qw.shape[1] * 2
    for k in ("wscales", "wzeros"):
        v = t[k]
        _check(path, module, v.ndim == 2 and v.shape[1] == out and v.shape[0] * 64 >= inn and v.dtype in _FP_DTYPES,
               k, f"[>= {inn // 64}, {out}] floating", f"{v.dtype} {list(v.shape)}")
    info = flux_module_info(module)
    return AWQW4A16Weight(qweight=qw, wscales=t["wscales"], wzeros=t["wzeros"], bias=t.get("bias"),
                          adanorm_splits=info.adanorm_splits if info is not None else 1, name=module)


def read_svdquant_file(path: str) -> SVDQuantFile:
    """Read a nunchaku SVDQuant FLUX transformer: one safetensors with ``config``, ``quantization_config`` and
    ``comfy_config`` header metadata, or nunchaku's pre-v1 folder of the same tensors in two files
    (:mod:`.svdquant_folder`). Tensors are memory-mapped views of the files (copy what you keep)."""
    from .svdquant_folder import is_svdquant_folder, read_folder, split_file_hint

    if is_svdquant_folder(path):
        files, meta = read_folder(path)
    else:
        header = read_safetensors_header(path)
        files, meta = [(path, header)], dict(header.get("__metadata__") or {})
    header = {k: v for _, h in files for k, v in h.items() if k != "__metadata__"}
    source = {k: f for f, h in files for k in h if k != "__metadata__"}
    names = list(header)
    qnames = [k for k in names if k.endswith(".qweight")]
    if not qnames:
        sample = ", ".join(sorted(names)[:4]) or "no tensors"
        hint = split_file_hint(path) or (" This looks like a plain checkpoint: load it with the regular FLUX "
                                         "loader.")
        raise DCGenError(f"{path}: expected a nunchaku SVDQuant file (4-bit '<module>.qweight' tensors with wscales, "
                         f"smooth, lora_down/lora_up and quantization_config metadata), found {len(names)} tensors "
                         f"and no qweight ({sample}, ...).{hint}")
    if "quantization_config" not in meta and split_file_hint(path):
        raise DCGenError(f"{path}: expected header metadata 'quantization_config' (a nunchaku SVDQuant file made by "
                         f"nunchaku's merge_safetensors), found none.{split_file_hint(path)}")
    quant = _parse_quant(path, meta)
    config = _json_meta(path, meta, "config")
    if config is not None and not isinstance(config, dict):
        raise DCGenError(f"{path}: expected header metadata 'config' to be a JSON object (diffusers Flux config), "
                         f"found {type(config).__name__}.")
    comfy_config = _json_meta(path, meta, "comfy_config")

    qmodules = {k[: -len(".qweight")] for k in qnames}
    grouped: dict[str, dict[str, str]] = {m: {} for m in qmodules}
    other_names = []
    for k in names:
        mod, _, param = k.rpartition(".")
        if mod in grouped:
            grouped[mod][param] = k
        else:
            other_names.append(k)

    linears: dict[str, SVDQuantWeight] = {}
    awq: dict[str, AWQW4A16Weight] = {}
    other: dict[str, torch.Tensor] = {}
    try:
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, framework="pt", device="cpu")) for f, _ in files}

            def tensor(k):
                return handles[source[k]].get_tensor(k)

            for mod in sorted(grouped):
                params = grouped[mod]
                is_awq = header[params["qweight"]]["dtype"] == "I32" or "wzeros" in params
                if is_awq:
                    unknown = sorted(set(params) - _AWQ_PARAMS)
                    if unknown:
                        raise DCGenError(f"{path}: AWQ linear '{mod}': expected tensors {sorted(_AWQ_PARAMS)}, found "
                                         f"also {', '.join(unknown)} (a LoRA-patched or unknown format).")
                    awq[mod] = _build_awq(path, mod, {p: tensor(k) for p, k in params.items()})
                    continue
                unknown = sorted(set(params) - set(_SVDQ_PARAMS))
                if unknown:
                    raise DCGenError(f"{path}: quantized linear '{mod}': expected tensors among "
                                     f"{sorted(set(_SVDQ_PARAMS))}, found unknown {', '.join(unknown)}.")
                t = {_SVDQ_PARAMS[p]: tensor(k) for p, k in params.items()}
                linears[mod] = _build_svdq(path, mod, t, quant)
            for k in other_names:
                other[k] = tensor(k)
    except DCGenError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise DCGenError(f"{path}: could not read tensors ({e}).") from e

    ranks = sorted({w.rank for w in linears.values()})
    if quant.rank is None and ranks:
        quant.rank = ranks[0]
    return SVDQuantFile(path=os.fspath(path), config=config or {}, quant=quant, comfy_config=comfy_config,
                        metadata=meta, linears=linears, awq=awq, other=other)
