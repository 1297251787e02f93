"""NVFP4: ComfyUI's 4-bit checkpoint format for FLUX transformers, and its math (through comfy-kitchen).

A quantized linear ``<layer>`` is stored as
``<layer>.weight`` uint8 [out, in/2] (two e2m1 codes per byte),
``<layer>.weight_scale`` float8_e4m3fn block scales (one per 16 inputs, cuBLAS blocked layout padded to
[roundup(out, 128), roundup(in/16, 4)]), ``<layer>.weight_scale_2`` float32 per-tensor scale and
``<layer>.comfy_quant`` uint8 bytes of the JSON ``{"format": "nvfp4"}``, or with no ``.comfy_quant`` tensors
and the layers listed in the header's ``_quantization_metadata`` (the form ComfyUI's QUANTIZATION.md documents;
core turns it into the per-layer entries on load, and so does :func:`add_layer_confs`). The weight is
``e2m1 * block_scale * weight_scale_2``; an optional ``<layer>.pre_quant_scale`` [in] scales the input first
(y = W (s * x), AWQ-style smoothing) and an optional scalar ``<layer>.input_scale`` is the activation scale of the
native NVFP4 matmul. Everything else stays in bf16 under its BFL key.

In memory a quantized weight is a comfy-kitchen ``QuantizedTensor`` (the same object ComfyUI's own mixed
precision ops hold), so it moves, offloads, backs up and restores as one tensor with its scales.
"""

from __future__ import annotations

import functools
import json
import re

import torch

from ..errors import DCGenError, MissingDependencyError

FORMAT = "nvfp4"
LAYOUT = "TensorCoreNVFP4Layout"
GROUP = 16
_E2M1_MAX = 6.0
_E4M3_MAX = 448.0
#: Per-layer tensors besides ``.weight`` (``input_scale``/``pre_quant_scale`` are optional in core files).
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale")
QUANT_CONF_SUFFIX = ".comfy_quant"
#: What the pack implements of a quantized layer: its tensors, and the keys of its comfy_quant JSON (any other
#: field is refused by name rather than loaded and ignored).
LAYER_TENSORS = ("weight", "bias", "comfy_quant", *(s[1:] for s in SCALE_SUFFIXES))
CONF_KEYS = ("format", "full_precision_matrix_mult")

#: The transformer-block linears DC-Gen's recipe quantizes (attention qkv/proj and MLPs of both streams, the
#: single blocks' fused linears). The embedder/head (the DC-Gen part), text/time/guidance inputs and norms stay
#: bf16; the modulation linears too unless asked (they are a quarter of FLUX's weights, see ``MODULATION``).
BLOCK_LINEARS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$")
MODULATION = re.compile(r"^(double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin)$")


def require_kitchen():
    """comfy-kitchen, which holds the NVFP4 kernels (eager on CPU, CUDA where its backend supports the GPU)."""
    try:
        import comfy_kitchen
        from comfy_kitchen.tensor import QuantizedTensor  # noqa: F401  (the API this module uses)
    except ImportError as e:
        raise MissingDependencyError(
            f"NVFP4: expected the comfy-kitchen package (ComfyUI's quantization kernels), found it missing ({e}). "
            "Install it into ComfyUI's Python: pip install comfy-kitchen") from e
    return comfy_kitchen


def should_quantize(module: str, weight_shape, modulation: bool = False) -> bool:
    """Whether the quantizer stores ``module``'s weight in NVFP4 (a block linear whose sides are multiples of 16)."""
    if not (BLOCK_LINEARS.match(module) or (modulation and MODULATION.match(module))):
        return False
    return len(weight_shape) == 2 and weight_shape[0] % GROUP == 0 and weight_shape[1] % GROUP == 0


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [out, in/2], block scales fp8 blocked, per-tensor scale f32) of a 2-D weight."""
    ck = require_kitchen()
    w = weight.float()
    tensor_scale = (w.abs().amax() / (_E4M3_MAX * _E2M1_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    codes, block_scale = ck.quantize_nvfp4(w, tensor_scale)
    return codes, block_scale, tensor_scale.reshape(())


def dequantize(codes: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ck = require_kitchen()
    return ck.dequantize_nvfp4(codes, tensor_scale.float().reshape(()), block_scale.view(torch.float8_e4m3fn),
                               output_type=dtype)


def quantized_tensor(codes, block_scale, tensor_scale, dtype: torch.dtype):
    """The comfy-kitchen QuantizedTensor of stored NVFP4 tensors; it reports the logical shape and ``dtype``."""
    require_kitchen()
    from comfy_kitchen.tensor import QuantizedTensor, get_layout_class

    shape = (codes.shape[0], codes.shape[1] * 2)
    params = get_layout_class(LAYOUT).Params(scale=tensor_scale.float().reshape(()), orig_dtype=dtype,
                                             orig_shape=shape, block_scale=block_scale.view(torch.float8_e4m3fn))
    return QuantizedTensor(codes, LAYOUT, params)


def quantize_to_tensor(weight: torch.Tensor, dtype: torch.dtype | None = None):
    """A float weight as an NVFP4 QuantizedTensor (used to re-quantize after a core LoRA patch)."""
    codes, block_scale, tensor_scale = quantize(weight)
    return quantized_tensor(codes, block_scale, tensor_scale, dtype or weight.dtype)


def is_quantized(t) -> bool:
    """A 4-bit weight: a comfy-kitchen QuantizedTensor (or a Parameter of one), or the stand-in of a weight a module
    keeps in another 4-bit format (``is_4bit``, see flux/svdquant.py)."""
    return (getattr(t, "is_4bit", False) or type(t).__name__ == "QuantizedTensor"
            or type(getattr(t, "data", None)).__name__ == "QuantizedTensor")


def stored_tensors(layer: str, qt) -> dict[str, torch.Tensor]:
    """The file entries of one quantized layer (inverse of :func:`quantized_tensor`)."""
    params = qt._params
    return {f"{layer}.weight": qt._qdata, f"{layer}.weight_scale": params.block_scale,
            f"{layer}.weight_scale_2": params.scale.float().reshape(()),
            f"{layer}{QUANT_CONF_SUFFIX}": conf_tensor({"format": FORMAT})}


def conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def read_conf(t: torch.Tensor) -> dict:
    """The JSON a ``.comfy_quant`` entry holds (inverse of :func:`conf_tensor`)."""
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def blocked_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return _round_up(out_features, 128), _round_up(in_features // GROUP, 4)


def _layer_confs(sd: dict, metadata: dict, source: str) -> dict[str, dict]:
    confs = {}
    for k, v in sd.items():
        if k.endswith(QUANT_CONF_SUFFIX):
            try:
                confs[k[: -len(QUANT_CONF_SUFFIX)]] = read_conf(v)
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
                raise DCGenError(f"{source}: expected '{k}' to hold JSON like {{\"format\": \"nvfp4\"}}, found "
                                 f"unreadable bytes ({e}).") from e
    if metadata.get("_quantization_metadata"):
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise DCGenError(f"{source}: expected header metadata '_quantization_metadata' to be JSON "
                             f"{{\"layers\": {{...}}}}, found unreadable text ({e}).") from e
        if not isinstance(layers, dict):
            raise DCGenError(f"{source}: expected header metadata '_quantization_metadata' to hold \"layers\": "
                             f"{{name: {{\"format\": ...}}}}, found {type(layers).__name__}.")
        from ..keys import strip_key_prefix

        for layer, conf in layers.items():
            if f"{layer}.weight" not in sd:  # named as in the file, whose wrapper prefix the loader stripped
                layer = strip_key_prefix(layer)
            confs.setdefault(layer, conf)
    return confs


def add_layer_confs(sd: dict, confs: dict):
    """A ``.comfy_quant`` entry for each quantized layer listed only in the header (what core's convert_old_quants
    does), so that core's mixed-precision ops and the pack's read the layer the same way."""
    for layer, conf in confs.items():
        sd.setdefault(f"{layer}{QUANT_CONF_SUFFIX}", conf_tensor(conf))
    return sd


def _check_fields(sd: dict, confs: dict, source: str):
    """Refuse quantization fields the pack does not implement, naming them: comfy_quant keys, per-layer tensors."""
    implemented = (f"tensors {', '.join(LAYER_TENSORS)}; comfy_quant keys {', '.join(CONF_KEYS)}")
    for layer, conf in sorted(confs.items()):
        extra = sorted(set(conf) - set(CONF_KEYS)) if isinstance(conf, dict) else []
        if extra:
            raise DCGenError(f"{source}: expected the NVFP4 fields the pack implements ({implemented}), found "
                             f"'{extra[0]}' in the quantization config of '{layer}' ({json.dumps(conf)}), which the "
                             "pack does not implement; loading it without would compute another model.")
    for k in sd:
        layer, _, field = k.rpartition(".")
        if layer in confs and field not in LAYER_TENSORS:
            raise DCGenError(f"{source}: expected the NVFP4 fields the pack implements ({implemented}), found "
                             f"'{field}' ('{k}'), which the pack does not implement; loading it without would "
                             "compute another model.")


def quantized_layers(sd: dict, metadata: dict, source: str) -> dict[str, dict]:
    """{layer: conf} of an NVFP4 file's state dict (BFL keys, prefix stripped), validated: every quantized layer
    is NVFP4 with its codes, block scales and tensor scale (and optional pre_quant_scale / input_scale) of consistent
    shapes, and no field the pack does not implement. Errors name the file and key."""
    confs = _layer_confs(sd, metadata, source)
    if not confs:
        kinds = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
        raise DCGenError(
            f"{source}: expected an NVFP4 checkpoint (quantized layers in per-layer '.comfy_quant' entries or the "
            f"'_quantization_metadata' header, with weight_scale / weight_scale_2), found no quantized layers "
            f"(tensors of {', '.join(kinds)}). Load a bf16/fp8 file with DC-Gen Load Model, or make an "
            "NVFP4 file with python -m dcgen_core.quantize.")
    _check_fields(sd, confs, source)
    for layer, conf in sorted(confs.items()):
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt != FORMAT:
            raise DCGenError(
                f"{source}: expected NVFP4 layers, found '{layer}' in format {fmt!r}. "
                + ("Load fp8 files with core Load Diffusion Model." if fmt and "float8" in str(fmt) else ""))
        codes = sd.get(f"{layer}.weight")
        block = sd.get(f"{layer}.weight_scale")
        tensor = sd.get(f"{layer}.weight_scale_2")
        for name, t in (("weight", codes), ("weight_scale", block), ("weight_scale_2", tensor)):
            if t is None:
                raise DCGenError(f"{source}: expected '{layer}.{name}' for the NVFP4 layer '{layer}', found none "
                                 "(the file is incomplete or was not written as NVFP4).")
        if codes.dtype != torch.uint8 or codes.ndim != 2:
            raise DCGenError(f"{source}: expected '{layer}.weight' as uint8 [out, in/2] packed e2m1 codes, found "
                             f"{str(codes.dtype).replace('torch.', '')} {list(codes.shape)}.")
        out_f, in_f = codes.shape[0], codes.shape[1] * 2
        want = blocked_scale_shape(out_f, in_f)
        if block.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(block.shape) != want:
            raise DCGenError(f"{source}: expected '{layer}.weight_scale' as float8_e4m3fn {list(want)} (blocked "
                             f"scales of a [{out_f}, {in_f}] weight), found {str(block.dtype).replace('torch.', '')} "
                             f"{list(block.shape)}.")
        if tensor.numel() != 1 or not tensor.dtype.is_floating_point:
            raise DCGenError(f"{source}: expected '{layer}.weight_scale_2' as one float32 value, found "
                             f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)}.")
        for name, want in (("pre_quant_scale", [in_f]), ("input_scale", [])):
            t = sd.get(f"{layer}.{name}")
            if t is not None and (not t.dtype.is_floating_point
                                  or (list(t.shape) != want if want else t.numel() != 1)):
                raise DCGenError(f"{source}: expected '{layer}.{name}' as a float tensor {want} (the layer's "
                                 f"{'input width' if want else 'one activation scale'}), found "
                                 f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}.")
    return confs


class LogicalWeight:
    """Stands in for a 4-bit weight where only its logical [out, in] is read (architecture detection, LoRA shape
    checks)."""

    is_4bit = True

    def __init__(self, shape, dtype=torch.bfloat16):
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def numel(self) -> int:
        return self.shape.numel()


def logical_view(sd: dict, layers) -> dict:
    """``sd`` with each quantized layer's packed weight replaced by an object of its logical shape and its scale
    entries left out: what the FLUX architecture reader and ComfyUI's config detection expect."""
    out = {}
    skip = {f"{layer}{s}" for layer in layers for s in (*SCALE_SUFFIXES, QUANT_CONF_SUFFIX)}
    for k, v in sd.items():
        if k in skip:
            continue
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        out[k] = LogicalWeight((v.shape[0], v.shape[1] * 2)) if layer in layers else v
    return out


def native_matmul_supported(device) -> bool:
    """NVFP4 x NVFP4 tensor-core matmul: an NVIDIA GPU of SM >= 10.0 with comfy-kitchen's CUDA backend."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    # asked by every NVFP4 layer on every call: the answer for a GPU does not change while ComfyUI runs
    return _cuda_native_matmul(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_native_matmul(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 10:
        return False
    try:
        ck = require_kitchen()
    except MissingDependencyError:
        return False
    cuda = ck.list_backends().get("cuda", {})
    return bool(cuda.get("available")) and not cuda.get("disabled") and "scaled_mm_nvfp4" in cuda.get("capabilities", [])


def compute_path(device) -> str:
    """How NVFP4 layers run on ``device``: what users see in the log and the doctor report."""
    if native_matmul_supported(device):
        return "native NVFP4 matmul (comfy-kitchen CUDA, SM >= 10)"
    return "weight-only: each layer's NVFP4 weight dequantized to the compute dtype just before its matmul"
