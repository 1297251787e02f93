"""Reader of nunchaku SVDQuant FLUX transformer files (one safetensors with ``config``, ``quantization_config``
and ``comfy_config`` header metadata): every tensor checked, each linear as a :mod:`.weights` object."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ...checkpoints import read_safetensors_header
from ...errors import DCGenError
from .flux_modules import flux_module_info
from .packing import GROUP_SIZE, SHIFT_GELU_INT4, _LR_FRAG, _MEM_K, _NUM_K_UNROLLS, _WARP_N, _kind
from .weights import AWQW4A16Weight, SVDQuantWeight


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
    from .folder import is_svdquant_folder, read_folder, split_file_hint

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
