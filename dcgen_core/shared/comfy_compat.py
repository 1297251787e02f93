"""What differs between the ComfyUI versions the pack supports (v0.3.64 .. v0.33), read from the running one.

Every function here asks the running ComfyUI what it has (a dataclass field, a
signature parameter, a model key) instead of comparing version numbers, so one
code path serves every version and a future release that keeps the new form.
"""

from __future__ import annotations

import inspect


def comfyui_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


_NORM_PARAMS = (".scale", ".weight")


def norm_param_in(key: str, model_keys) -> str | None:
    """``key`` as the model names it: an RMSNorm parameter may be ``.scale`` or ``.weight``; None if neither."""
    if key in model_keys:
        return key
    for a, b in (_NORM_PARAMS, _NORM_PARAMS[::-1]):
        if key.endswith(a) and "_norm" in key:
            other = key[: -len(a)] + b
            if other in model_keys:
                return other
    return None


# --- Model patchers --------------------------------------------------------------------------------------------

def model_patcher_class():
    """The patcher class core loaders use: ``CoreModelPatcher`` (``ModelPatcherDynamic`` when ComfyUI enabled
    dynamic VRAM) where it exists, ``ModelPatcher`` on older versions."""
    import comfy.model_patcher as mp

    return getattr(mp, "CoreModelPatcher", mp.ModelPatcher)


def make_model_patcher(model, load_device, offload_device, disable_dynamic: bool = False):
    """A patcher for ``model`` built as this ComfyUI's core loaders build theirs (``disable_dynamic``: a plain
    ModelPatcher, as core loaders give when ComfyUI asks its ``cached_patcher_init`` for a non-dynamic copy)."""
    import comfy.model_patcher as mp

    cls = mp.ModelPatcher if disable_dynamic else model_patcher_class()
    return cls(model, load_device=load_device, offload_device=offload_device)


def archive_weight_dtypes(module):
    """Record each parameter's dtype on its module, as v0.33's loaders do for dynamic VRAM (which streams weights
    and casts them back to these dtypes); nothing to do on versions without it."""
    import comfy.model_management as mm

    archive = getattr(mm, "archive_model_dtypes", None)
    if archive is not None:
        archive(module)


# --- Executor -----------------------------------------------------------------------------------------------------

def prompt_executor(execution, server):
    """A PromptExecutor with the classic cache: ``cache_size`` up to v0.3.67, ``cache_args`` (a dict) after."""
    params = inspect.signature(execution.PromptExecutor).parameters
    if "cache_args" in params:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
