"""One quantized linear of a nunchaku file, holding its tensors as stored (packed): the SVDQuant W4A4 linear (dense
view, the torch forward and nunchaku's kernels) and the AWQ W4A16 AdaLN linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import DCGenError
from .kernels import _sm, require_nunchaku
from .packing import (E2M1_VALUES, GROUP_SIZE, _kind, int4_from_nibbles, unpack_awq_qweight, unpack_lowrank,
                      unpack_qweight, unpack_vector, unpack_wscales)


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
