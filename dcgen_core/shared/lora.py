"""DC-Gen LoRA files: key layouts, alpha, and ComfyUI patches (each family's key map: <family>/architecture.py).

Layouts read: diffusers (``transformer.<module>.lora_A/B.weight``), PEFT
(``base_model.model.<module>.lora_A[.default].weight``, alpha from
``adapter_config.json`` or the ``lora_adapter_metadata`` header), kohya
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` and
``lora_transformer_<diffusers module>``), and BFL/ComfyUI module names
(``diffusion_model.<module>.lora_A.weight``). Diffusers modules that are fused
in ComfyUI (q/k/v, single-block q/k/v/mlp) map to a row offset of the fused
weight. The patches are applied through ComfyUI's weight patching, so
offloading and low-VRAM modes keep working; nothing is rewritten in place.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .checkpoints import load_safetensors, read_json
from .embedding import extract_aligned_embedding
from .errors import DCGenError
from .keys import swap_scale_shift


_SUFFIXES = (
    ".lora_A.weight", ".lora_B.weight", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
    ".lora.up.weight", ".lora.down.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".lora_A.bias", ".lora_B.bias", ".alpha", ".dora_scale", ".diff", ".diff_b",
)
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "lora_t5", "t5xxl", "clip_l")
_PEFT_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$")


def module_of(key: str) -> str | None:
    for s in _SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)]
    return None


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def _alpha_from(path: str, metadata: dict) -> float | None:
    """``lora_alpha`` from the header (diffusers' ``lora_adapter_metadata``), or from ``adapter_config.json`` when
    the file is a PEFT adapter folder's own ``adapter_model.safetensors`` (never for other LoRAs in that folder)."""
    cfg, where = None, None
    if metadata.get("lora_adapter_metadata"):
        where = f"{path} (header metadata 'lora_adapter_metadata')"
        try:
            cfg = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise DCGenError(f"{where}: expected a JSON object like {{\"lora_alpha\": 16, \"r\": 16}}, found "
                             f"unparsable text ({e}).") from e
    elif os.path.basename(path) == PEFT_WEIGHTS:
        beside = os.path.join(os.path.dirname(path), PEFT_CONFIG)
        if os.path.isfile(beside):
            where = beside
            cfg = read_json(beside, f"the PEFT adapter config of {path}")
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise DCGenError(f"{where}: expected a JSON object with 'lora_alpha', found a {type(cfg).__name__}.")
    alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise DCGenError(f"{where}: expected 'lora_alpha' to be a positive number, found {alpha!r}.")
    return float(alpha)


_DOWN = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", "_lora.down.weight",
         ".lora_linear_layer.down.weight")
_UP = (".lora_B.weight", ".lora_up.weight", ".lora.up.weight", "_lora.up.weight", ".lora_linear_layer.up.weight")


def check_lora_pairs(sd: dict, source: str):
    """Every low-rank module has its down (A) and up (B) matrix, with the same rank."""
    downs, ups = {}, {}
    for k, v in sd.items():
        for suffixes, found in ((_DOWN, downs), (_UP, ups)):
            for suffix in suffixes:
                if k.endswith(suffix):
                    found[k[: -len(suffix)]] = (k, v)
    for module in sorted(set(downs) ^ set(ups)):
        key, _ = downs.get(module) or ups.get(module)
        missing = "up (lora_B)" if module in downs else "down (lora_A)"
        raise DCGenError(f"{source}: expected a {missing} matrix for '{key}', found none (an unpaired LoRA entry; "
                         "the file is incomplete or not a LoRA).")
    for module in sorted(downs):
        (dk, d), (uk, u) = downs[module], ups[module]
        if d.ndim != 2 or u.ndim != 2 or d.shape[0] != u.shape[1]:
            raise DCGenError(f"{source}: expected '{dk}' [rank, in] and '{uk}' [out, rank] of the same rank, found "
                             f"{list(d.shape)} and {list(u.shape)}.")


def normalize_lora(sd: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Rename keys to one of the layouts ComfyUI's LoRA reader knows, adding ``.alpha`` when known."""
    out = {}
    for k, v in sd.items():
        if k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        k = _PEFT_ADAPTER.sub(r".\1.\2", k)
        if k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                         "time_text_embed.", "norm_out.", "proj_out.", "patch_embed.", "caption_projection.",
                         "caption_norm.", "time_embed.")):
            k = "transformer." + k
        elif k.startswith(("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "final_layer.", "time_in.",
                           "vector_in.", "guidance_in.")):
            k = "diffusion_model." + k
        elif k.startswith("model.diffusion_model."):
            k = k[len("model."):]
        out[k] = v
    if alpha is not None:
        for k in list(out):
            m = module_of(k)
            if m is not None and k.endswith((".lora_A.weight", ".lora_down.weight")) and f"{m}.alpha" not in out:
                out[f"{m}.alpha"] = torch.tensor(alpha)
    return out


def read_lora_file(path: str):
    """(normalized LoRA state dict, AlignedEmbedding or None) from a LoRA safetensors file."""
    sd, metadata = load_safetensors(path, copy=True)  # the patches outlive the file's contents
    emb, rest = extract_aligned_embedding(sd, source=path)
    check_lora_pairs(rest, path)
    return normalize_lora(rest, _alpha_from(path, metadata)), emb


def unmatched_modules(lora_sd: dict, key_map: dict) -> list[str]:
    modules = {module_of(k) for k in lora_sd}
    unknown = sorted(k for k in lora_sd if module_of(k) is None)
    missing = sorted(m for m in modules if m is not None and m not in key_map
                     and not m.startswith(_TEXT_ENCODER_PREFIXES))
    return unknown + missing


def diffusers_lora_key_map(model_keys) -> dict:
    """LoRA module name -> ComfyUI patch key for a model whose parameters carry diffusers names (SANA)."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            module = k[len("diffusion_model."):-len(".weight")]
            for name in (f"transformer.{module}", f"diffusion_model.{module}",
                         "lora_transformer_" + module.replace(".", "_"), "lora_unet_" + module.replace(".", "_")):
                key_map[name] = k
    return key_map


def lora_patches(model, lora_sd: dict, source: str, arch) -> dict:
    """ComfyUI patches for ``model`` (a patcher of the architecture ``arch``, see architectures.py); errors if the
    LoRA targets another model."""
    import comfy.lora

    from .latent_space import logical_weights

    weights = logical_weights(model.model)  # quantized weights by their logical [out, in]
    # core's own map first (it gains aliases across versions, e.g. LyCoris names), the architecture's on top (FLUX:
    # fused offsets, the norm_out scale/shift swap, kohya diffusers names)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map.update(arch.lora_key_map(model, set(weights)))
    bad = unmatched_modules(lora_sd, key_map)
    if bad:
        raise DCGenError(
            f"{source}: expected a LoRA for this {arch.name} transformer (modules like {arch.lora_example}), found "
            f"{len(bad)} entries it does not have, e.g. {', '.join(bad[:3])}. Is it a LoRA for another model or "
            f"another depth?"
        )
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    if not patches:
        raise DCGenError(f"{source}: expected LoRA weights (lora_A/lora_B or lora_up/lora_down), found none.")
    check_lora_shapes(patches, weights, source)
    return patches


def _lora_weights(patch):
    """(up, down, alpha, mid, dora_scale, ...) of a LoRA patch in either ComfyUI representation; None otherwise."""
    if isinstance(patch, tuple):
        kind, weights = patch
    else:
        kind, weights = getattr(patch, "name", None), getattr(patch, "weights", None)
    if kind == "lora" and weights is not None and weights[0].ndim == 2 and weights[1].ndim == 2:
        return weights
    return None


def _low_rank_pair(patch):
    """(up, down) of a plain LoRA patch, for either ComfyUI patch representation."""
    weights = _lora_weights(patch)
    return None if weights is None else (weights[0], weights[1])


def split_quantized(patches: dict, weights: dict, strength: float, exact: set | frozenset = frozenset()):
    """(runtime low-rank terms by module, remaining patches): a plain LoRA on a 4-bit weight, or on a weight in
    ``exact`` (the bf16 linears of a 4-bit model), stays a low-rank term ``y = W x + s B A x`` (no re-quantization,
    no rounding of W + dW); anything else (other layers, LoHa/LoKr/DoRA) stays a ComfyUI weight patch, which
    dequantizes, adds and re-quantizes 4-bit layers."""
    from .quant.nvfp4 import is_quantized
    from .quant.ops import LowRankTerm

    terms, rest = {}, {}
    for key, patch in patches.items():
        target, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        function = key[2] if isinstance(key, tuple) and len(key) > 2 else None
        lw = _lora_weights(patch)
        if (lw is None or not (is_quantized(weights.get(target)) or target in exact)
                or function not in (None, swap_scale_shift) or any(extra is not None for extra in lw[3:5])):
            rest[key] = patch
            continue
        up, down, alpha = lw[0], lw[1], lw[2]
        if function is swap_scale_shift:  # norm_out: the delta's row halves swapped, i.e. the up matrix's
            up = swap_scale_shift(up)
        scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
        rows = (offset[1], offset[2]) if offset is not None else None
        module = target[len("diffusion_model."):-len(".weight")]
        terms.setdefault(module, []).append(LowRankTerm(down, up, scale, rows))
    return terms, rest


def check_lora_shapes(patches: dict, model_sd: dict, source: str):
    """Reject a LoRA trained for another width of model before ComfyUI silently skips it at patch time."""
    for key, patch in patches.items():
        target, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        pair = _low_rank_pair(patch)
        if pair is None or target not in model_sd:
            continue
        weight = model_sd[target]
        if len(weight.shape) == 4 and tuple(weight.shape[2:]) != (1, 1):
            continue  # a LoRA on a k x k conv is flattened by ComfyUI: its in-size is in * k * k
        rows = offset[2] if offset else weight.shape[0]
        up, down = pair
        if up.shape[0] != rows or down.shape[1] != weight.shape[1]:
            raise DCGenError(
                f"{source}: expected a LoRA delta of [{rows}, {weight.shape[1]}] for {target}, found "
                f"[{up.shape[0]}, {down.shape[1]}] (rank {down.shape[0]}). This LoRA is for another model.")


def save_lora(path: str, lora: dict[str, torch.Tensor], alpha: float | None = None, metadata: dict | None = None):
    """Write a LoRA that core LoRA loaders and ours read the same way.

    ``lora``: diffusers module paths (``transformer_blocks.0.attn.to_q``; a path given with a ``diffusion_model.``
    prefix keeps it: core's loader reads SANA LoRAs by that name only) -> (down [r, in], up [out, r]), or
    already-named tensors. Keys are ``transformer.<module>.lora_A/B.weight`` with a ``transformer.<module>.alpha``
    per module (ComfyUI's LoRA reader takes alpha from that key; PEFT's ``lora_alpha`` is also written to the
    header for diffusers/PEFT readers).
    """
    from safetensors.torch import save_file

    out = {}
    for module, value in lora.items():
        if isinstance(value, tuple):
            down, up = value
            keep = module.startswith(("transformer.", "diffusion_model."))
            name = module if keep else f"transformer.{module}"
            out[f"{name}.lora_A.weight"] = down.contiguous()
            out[f"{name}.lora_B.weight"] = up.contiguous()
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            out[module] = value.contiguous()
    meta = dict(metadata or {})
    if alpha is not None:
        ranks = {v[0].shape[0] for v in lora.values() if isinstance(v, tuple)}
        meta["lora_adapter_metadata"] = json.dumps({"lora_alpha": float(alpha), "r": max(ranks) if ranks else None})
    check_lora_pairs(out, path)
    save_file(out, path, metadata=meta)
    return path
