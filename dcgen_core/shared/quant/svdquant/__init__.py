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

from .flux_modules import NUNCHAKU_FLUX_MODULES, NUNCHAKU_FLUX_PLAIN_KEYS, NunchakuModule, flux_module_info
from .kernels import nunchaku_supports, require_nunchaku
from .packing import (E2M1_VALUES, GROUP_SIZE, SHIFT_GELU_INT4, int4_from_nibbles, unpack_awq_qweight, unpack_lowrank,
                      unpack_qweight, unpack_vector, unpack_wscales)
from .reader import SVDQuantFile, SVDQuantInfo, read_svdquant_file
from .weights import AWQW4A16Weight, SVDQuantWeight


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
