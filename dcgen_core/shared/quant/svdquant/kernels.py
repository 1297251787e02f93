"""nunchaku's CUDA kernels: which GPUs run which 4-bit kind, and the lazy, checked import of the real nunchaku (not
the unrelated PyPI project of that name). Torch only until a kernel is asked for."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ...errors import DCGenError
from .packing import _kind


#: GPUs nunchaku accepts (nunchaku utils.check_hardware_compatibility; sm 121 from newer releases).
_SUPPORTED_SM = {"int4": frozenset({75, 80, 86, 89}), "fp4": frozenset({120, 121})}


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
