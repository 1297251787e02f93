"""ComfyUI operations for 4-bit FLUX weights, and LoRAs kept as runtime low-rank terms beside them.

``operations_for`` picks the Linear a quantized FLUX is built with: ComfyUI's own mixed-precision ops where
the running ComfyUI reads NVFP4 (``comfy.ops.mixed_precision_ops`` with an ``nvfp4`` entry in
``comfy.quant_ops.QUANT_ALGOS``), the pack's :class:`NVFP4 Linear <nvfp4_operations>` otherwise (ComfyUI
v0.3.64). Both hold each quantized weight as a comfy-kitchen ``QuantizedTensor``, so one loaded model looks
the same to patching, offloading and LoRA code on every version.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import nvfp4
from ..errors import DCGenError


PACK_OPS = "DC-Gen NVFP4 ops"


def core_reads_nvfp4() -> bool:
    """Whether this ComfyUI has mixed-precision ops that load NVFP4 layers (v0.4+; not v0.3.64)."""
    try:
        import comfy.ops
        import comfy.quant_ops
    except ImportError:
        return False
    algos = getattr(comfy.quant_ops, "QUANT_ALGOS", {})
    return hasattr(comfy.ops, "mixed_precision_ops") and nvfp4.FORMAT in algos and getattr(
        comfy.quant_ops, "_CK_AVAILABLE", True)


def nvfp4_operations(compute_dtype: torch.dtype):
    """The pack's operations for NVFP4 files: ComfyUI's manual-cast ops with a Linear that loads NVFP4 layers.

    A quantized weight stays 4-bit in memory, the other weights in their stored dtype (bf16); each call casts
    them, and dequantizes a 4-bit weight, on the input's device, in the input's
    dtype, applies ComfyUI's low-VRAM weight functions (LoRA patches) to the dequantized weight and runs the
    matmul; on a GPU with native NVFP4 (see :func:`nvfp4.native_matmul_supported`) and no weight functions it
    quantizes the input and runs comfy-kitchen's NVFP4 matmul. ``convert_weight``/``set_weight`` let core LoRA
    loaders patch it (dequantize, add, re-quantize), as ComfyUI's model patcher expects of such layers.
    """
    import comfy.model_management as mm
    import comfy.ops

    base = comfy.ops.manual_cast

    class NVFP4Ops(base):
        class Linear(base.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.weight = None  # set by loading: a QuantizedTensor or a plain compute-dtype tensor
                # optional fields of a quantized layer (see nvfp4): input smoothing, native matmul's activation scale
                self.pre_quant_scale = self.input_scale = None
                self.full_precision = False  # comfy_quant full_precision_matrix_mult: never the native matmul
                self.bias = (torch.nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype),
                                                requires_grad=False) if bias else None)

            def reset_parameters(self):
                return None

            def _load_from_state_dict(self, sd, prefix, local_metadata, strict, missing, unexpected, errors):
                conf = sd.pop(f"{prefix}{nvfp4.QUANT_CONF_SUFFIX[1:]}", None)
                weight = sd.pop(f"{prefix}weight", None)
                if weight is None:
                    missing.append(f"{prefix}weight")
                elif conf is not None:
                    conf = nvfp4.read_conf(conf)
                    if conf.get("format") != nvfp4.FORMAT:
                        errors.append(f"{prefix}weight: expected format nvfp4, found {conf.get('format')!r}")
                        return
                    qt = nvfp4.quantized_tensor(weight, sd.pop(f"{prefix}weight_scale"),
                                                sd.pop(f"{prefix}weight_scale_2"), compute_dtype)
                    self.weight = torch.nn.Parameter(qt, requires_grad=False)
                    self.full_precision = bool(conf.get("full_precision_matrix_mult", False))
                    for name in ("pre_quant_scale", "input_scale"):
                        value = sd.pop(f"{prefix}{name}", None)
                        if value is not None:
                            setattr(self, name, torch.nn.Parameter(value, requires_grad=False))
                else:  # kept in its stored dtype (bf16 in the pack's files); cast per call, as manual_cast does
                    self.weight = torch.nn.Parameter(weight, requires_grad=False)
                if self.bias is not None:
                    bias = sd.pop(f"{prefix}bias", None)
                    if bias is None:
                        missing.append(f"{prefix}bias")
                    elif tuple(bias.shape) != (self.out_features,):
                        errors.append(f"{prefix}bias: expected [{self.out_features}], found {list(bias.shape)}")
                    else:
                        self.bias = torch.nn.Parameter(bias, requires_grad=False)

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                # what the file holds (codes + scales): ComfyUI sizes modules from their state dicts
                if self.weight is not None and nvfp4.is_quantized(self.weight):
                    destination.update(nvfp4.stored_tensors(prefix[:-1], self.weight.data))
                    for name in ("pre_quant_scale", "input_scale"):
                        if getattr(self, name) is not None:
                            destination[f"{prefix}{name}"] = getattr(self, name).detach()
                elif self.weight is not None:
                    destination[f"{prefix}weight"] = self.weight if keep_vars else self.weight.detach()
                if self.bias is not None:
                    destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()

            def forward(self, x, *args, **kwargs):
                if not nvfp4.is_quantized(self.weight):
                    return super().forward(x, *args, **kwargs)
                functions = list(self.weight_function)
                bias = None
                if self.bias is not None:
                    bias = mm.cast_to(self.bias, x.dtype, x.device, copy=len(self.bias_function) > 0)
                    for f in self.bias_function:
                        bias = f(bias)
                qt = self.weight.data.to(x.device)
                if self.pre_quant_scale is not None:  # y = W (s * x), as core's mixed-precision Linear
                    x = x * mm.cast_to(self.pre_quant_scale, x.dtype, x.device)
                if not functions and not self.full_precision and nvfp4.native_matmul_supported(x.device):
                    from comfy_kitchen.tensor import QuantizedTensor

                    flat = x.reshape(-1, x.shape[-1])
                    scale = None if self.input_scale is None else mm.cast_to(self.input_scale, None, x.device)
                    y = F.linear(QuantizedTensor.from_float(flat, nvfp4.LAYOUT, scale=scale), qt, bias)
                    return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
                weight = qt.dequantize().to(x.dtype)
                for f in functions:
                    weight = f(weight)
                    if nvfp4.is_quantized(weight):  # a low-VRAM LoRA patch re-quantized through set_weight
                        weight = weight.dequantize().to(x.dtype)
                return F.linear(x, weight, bias)

            def convert_weight(self, weight, inplace=False, **kwargs):
                return weight.dequantize() if nvfp4.is_quantized(weight) else weight

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if nvfp4.is_quantized(self.weight):
                    new = nvfp4.quantize_to_tensor(weight.float(), compute_dtype)
                else:
                    new = weight.to(self.weight.dtype)
                if return_weight:
                    return new
                self.weight = torch.nn.Parameter(new, requires_grad=False)

    return NVFP4Ops


def operations_for(model_config, compute_dtype: torch.dtype, load_device, which: str = "auto"):
    """(operations, name) for building a quantized FLUX: ``core`` (ComfyUI's mixed precision), ``pack``, or
    ``auto`` (core where this ComfyUI reads NVFP4, else the pack's)."""
    if which not in ("auto", "core", "pack"):
        raise DCGenError(f"quantized ops: expected 'auto', 'core' or 'pack', found {which!r}.")
    if which == "core" or (which == "auto" and core_reads_nvfp4()):
        if not core_reads_nvfp4():
            raise DCGenError("quantized ops: expected a ComfyUI whose core loads NVFP4 layers (v0.4 or newer with "
                             "comfy-kitchen), found one without; use the pack's ops.")
        import comfy.ops

        model_config.quant_config = {"mixed_ops": True}
        ops = comfy.ops.pick_operations(None, compute_dtype, load_device=load_device, model_config=model_config)
        return ops, "ComfyUI mixed-precision ops"
    nvfp4.require_kitchen()
    return nvfp4_operations(compute_dtype), PACK_OPS


# --- LoRA as a runtime low-rank term on quantized layers ------------------------------------------------------

LOW_RANK_KEY = "dcgen_low_rank"


class LowRankTerm:
    """``scale * up @ (down @ x)`` added to rows ``start:start+rows`` of a layer's output (all rows if None)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, rows: tuple[int, int] | None = None):
        self.down, self.up, self.scale, self.rows = down, up, float(scale), rows
        self._on = {}

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on every clone: share the factors
        return self

    def factors(self, device, dtype):
        """The factors on ``device`` in ``dtype``, kept there after the first call (one copy per device/dtype)."""
        key = (str(device), dtype)
        if key not in self._on:
            self._on[key] = (self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype))
        return self._on[key]

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors(x.device, x.dtype)
        delta = F.linear(F.linear(x, down), up) * self.scale
        if self.rows is None:
            return y + delta
        start, n = self.rows
        y = y.clone()
        y[..., start:start + n] += delta
        return y


def _low_rank_hook(terms):
    def hook(module, args, output):
        x = args[0]
        for term in terms:
            output = term.add_to(output, x)
        return output

    return hook


def _low_rank_wrapper(executor, *args, **kwargs):
    """Adds each quantized layer's LoRA terms to its output for the duration of one diffusion-model call."""
    import comfy.utils

    dm = executor.class_obj
    # FLUX's forward passes (x, timestep, context, y, guidance, ref_latents, control, transformer_options)
    options = kwargs.get("transformer_options", args[7] if len(args) > 7 else {})
    handles = []
    try:
        for name, terms in (options.get(LOW_RANK_KEY) or {}).items():
            handles.append(comfy.utils.get_attr(dm, name).register_forward_hook(_low_rank_hook(terms)))
        return executor(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def runtime_lora_targets(base_model, weights: dict) -> set[str]:
    """The weights (``diffusion_model.<linear>.weight``) whose plain LoRAs stay runtime low-rank terms: on a 4-bit
    model every linear layer's, the bf16 ones (modulation, embedder, head) too: ComfyUI would merge W + dW there in
    the weight's stored dtype (bf16 with the pack's ops), rounding the LoRA; the term, computed in the activations'
    dtype, keeps it as exact as on the 4-bit layers."""
    from .nvfp4 import is_quantized

    if not any(is_quantized(w) for w in weights.values()):
        return set()
    return {f"{name}.weight" for name, mod in base_model.named_modules()
            if hasattr(mod, "in_features") and len(getattr(weights.get(f"{name}.weight"), "shape", ())) == 2}


def add_low_rank_terms(model, terms: dict[str, list[LowRankTerm]]):
    """Add LoRA terms (diffusion-model module path -> terms) to the patcher ``model`` (already a clone)."""
    import comfy.patcher_extension as pe

    to = model.model_options.setdefault("transformer_options", {})
    table = {k: list(v) for k, v in (to.get(LOW_RANK_KEY) or {}).items()}
    for name, new in terms.items():
        table.setdefault(name, []).extend(new)
    to[LOW_RANK_KEY] = table
    model.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, LOW_RANK_KEY)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, LOW_RANK_KEY, _low_rank_wrapper)
    logging.info("DC-Gen: LoRA kept as runtime low-rank terms on %d layers of a 4-bit model.", len(terms))
