"""What ``python -m dcgen_core.extract`` does the same way for every family (FLUX: extract.py, SANA: extract_sana.py,
Qwen-Image: extract_qwen.py): the per-tensor loop over the differences FULL - BASE (a truncated SVD of
:mod:`.lowrank` for low-rank targets, the whole tensor as ``.diff`` / ``.diff_b`` otherwise), its printed lines and
summary (achieved error and the lower bound on the exact SVD's), and the two files with their sizes.

A family reads and checks its pair of checkpoints, then hands :func:`carry_deltas` its differences (fused tensors
already split into their modules), a naming function and which tensors are low-rank targets.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..shared.checkpoints import owned
from ..shared.errors import DCGenError
from .lowrank import low_rank

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: (key, low_rank) -> (entry stem, the layer's name in the report, kind: "lora" / "diff" / "diff_b"); the file's
#: entries are ``<stem>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` for a LoRA, ``<stem>.<kind>`` otherwise.
Names = Callable[[str, bool], "tuple[str, str, str]"]


@dataclass(frozen=True)
class Request:
    """The command's options, checked by extract.extract."""

    full: str
    base: str
    out: str
    rank: int
    emb_path: str | None  # None: the embedding goes into the LoRA file (embed_in_lora)
    embed_in_lora: bool
    svd_dtype: torch.dtype
    device: str
    save_dtype: str | None
    min_delta: float
    svd: str
    oversample: int
    power_iters: int
    log: Callable[[str], None]


def factor_dtype(name: str | None, weights: torch.dtype) -> torch.dtype:
    """The LoRA factors' dtype: ``--save-dtype`` when given, else FULL's weight dtype ``weights`` when it is a float
    one, else fp32."""
    if name is None:
        return weights if weights in SAVE_DTYPES.values() else torch.float32
    if name not in SAVE_DTYPES:
        raise DCGenError(f"--save-dtype: expected one of {list(SAVE_DTYPES)}, found '{name}'.")
    return SAVE_DTYPES[name]


def check_same_tensors(req: Request, family: str, sd_f: dict, sd_b: dict,
                       is_embedding: Callable[[str], bool]) -> list[str]:
    """FULL and BASE hold the same tensors, of the same shapes, apart from the embedder and head; returns those keys
    sorted."""
    keys_f = {k for k in sd_f if not is_embedding(k)}
    keys_b = {k for k in sd_b if not is_embedding(k)}
    pair = f"FULL {req.full} and BASE {req.base}"
    if keys_f != keys_b:
        only_f, only_b = sorted(keys_f - keys_b), sorted(keys_b - keys_f)
        raise DCGenError(f"{pair}: expected the same {family} tensors apart from the embedder and head, found "
                         f"{len(only_f)} only in FULL (e.g. {only_f[:3]}) and {len(only_b)} only in BASE (e.g. "
                         f"{only_b[:3]}). A DC-Gen model keeps its base's blocks: pick the base it was trained from.")
    keys = sorted(keys_f)
    wrong = [k for k in keys if tuple(sd_f[k].shape) != tuple(sd_b[k].shape)]
    if wrong:
        k = wrong[0]
        raise DCGenError(f"{pair}: expected tensors of the same shapes, found {len(wrong)} that differ, e.g. {k}: "
                         f"{list(sd_f[k].shape)} in FULL vs {list(sd_b[k].shape)} in BASE.")
    return keys


def paired_deltas(sd_f: dict, sd_b: dict, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, FULL - BASE, BASE) in fp32, one key at a time."""
    for key in keys:
        w_b = owned(sd_b[key], torch.float32)
        yield key, owned(sd_f[key], torch.float32) - w_b, w_b


def linear_weight(key: str, t: torch.Tensor) -> bool:
    """A linear weight [out, in] or a 1x1 conv weight [out, in, 1, 1]: a LoRA target."""
    return key.endswith(".weight") and (t.ndim == 2 or (t.ndim == 4 and t.shape[2:] == (1, 1) and t.shape[1] > 1))


def diffusion_model_names(key: str, low: bool) -> tuple[str, str, str]:
    """:data:`Names` for diffusers keys under ComfyUI's ``diffusion_model.`` prefix (SANA, Qwen-Image: their ComfyUI
    modules carry the diffusers names); a parameter of its own name (``scale_shift_table``) gets core's generic
    ``diffusion_model.<key>.diff`` entry."""
    module, _, param = key.rpartition(".")
    if low:
        return f"diffusion_model.{module}", module, "lora"
    if param in ("weight", "bias"):
        return f"diffusion_model.{module}", key, "diff_b" if param == "bias" else "diff"
    return f"diffusion_model.{key}", key, "diff"


def carry_deltas(req: Request, deltas: Iterable[tuple[str, torch.Tensor, torch.Tensor]], *, names: Names,
                 low_rank_target: Callable[[str, torch.Tensor], bool], factor: torch.dtype, emb_sd: dict,
                 channels: int, label: str = "", whole: str = "tensors",
                 patchable: Callable[[str], bool] = lambda key: True) -> dict:
    """Carry each (key, FULL - BASE, BASE) of ``deltas`` as a LoRA or whole, print each layer and the summary
    (prefixed ``label``; ``whole``: what it calls the tensors stored whole), write the files; returns the report.
    Differences that ComfyUI cannot apply (``patchable`` false) are left out and counted in the error."""
    log, rank, min_delta = req.log, req.rank, req.min_delta
    lora, entries, layers, skipped = {}, {}, [], []
    total_err = total_energy = total_bound = 0.0
    unchanged = 0
    start = time.perf_counter()
    for key, delta, reference in deltas:
        energy = delta.square().sum().item()
        if energy == 0.0:
            unchanged += 1
            continue
        rel_delta = math.sqrt(energy) / max(reference.norm().item(), 1e-30)
        total_energy += energy
        shape = list(delta.shape)
        if rel_delta < min_delta or not patchable(key):
            total_err += energy
            total_bound += energy
            if rel_delta < min_delta:
                skipped.append({"module": key, "relative_delta": rel_delta})
                log(f"  skip {key}: relative difference {rel_delta:.2e} < --min-delta {min_delta:g}")
            else:
                skipped.append({"module": key, "relative_delta": rel_delta, "reason": "not patchable in ComfyUI"})
                log(f"  left out {key} {shape}: relative difference {rel_delta:.2e}, but ComfyUI patches no "
                    "parameter of a module with children (a LoRA .diff there is never applied); counted in the error")
            continue
        low = low_rank_target(key, delta)
        stem, module, kind = names(key, low)
        if not low:
            entries[f"{stem}.{kind}"] = delta.clone(memory_format=torch.contiguous_format)
            layers.append({"module": module, "kind": kind, "shape": shape, "rank": None,
                           "relative_delta": rel_delta, "relative_error": 0.0})
            log(f"  {key} {shape}: stored whole (.{kind}), relative difference {rel_delta:.2e}")
            continue
        fit = low_rank(delta.reshape(delta.shape[0], -1), rank, req.svd_dtype, req.device, factor, req.svd,
                       req.oversample, req.power_iters)
        lora[module] = (fit.down, fit.up)
        entries[f"{stem}.lora_A.weight"] = fit.down.contiguous()
        entries[f"{stem}.lora_B.weight"] = fit.up.contiguous()
        entries[f"{stem}.alpha"] = torch.tensor(float(fit.rank))
        total_err += fit.error
        total_bound += fit.bound
        rel_err, rel_bound = math.sqrt(fit.error / energy), math.sqrt(fit.bound / energy)
        layers.append({"module": module, "kind": "lora", "shape": shape, "rank": fit.rank,
                       "relative_delta": rel_delta, "relative_error": rel_err, "relative_error_bound": rel_bound,
                       "svd": fit.method})
        log(f"  {module} {shape} rank {fit.rank}: relative error {rel_err:.3e} ({fit.method} SVD; exact SVD's >= "
            f"{rel_bound:.3e}) (relative difference {rel_delta:.2e})")

    total = math.sqrt(total_err / total_energy) if total_energy else 0.0
    total_lower = math.sqrt(min(total_bound, total_err) / total_energy) if total_energy else 0.0
    prefix = f"{label}: " if label else ""
    log(f"{prefix}{len(lora)} low-rank layers (rank <= {rank}, {req.svd} SVD), {len(layers) - len(lora)} {whole} "
        f"stored whole, {len(skipped)} skipped (--min-delta), {unchanged} unchanged; total relative error "
        f"{total:.4e} (exact SVD's >= {total_lower:.4e}) ({time.perf_counter() - start:.1f} s)")

    written, out = {}, req.out
    if req.emb_path:
        written[req.emb_path] = write_embedding(req.emb_path, emb_sd, req.full, req.base)
    if req.embed_in_lora:
        entries.update({f"transformer.{k}": v.contiguous() for k, v in emb_sd.items()})
    if entries:
        written[out] = write_lora(out, entries, lora, req.full, req.base, rank, total, channels)
    else:
        log(f"FULL and BASE have the same blocks: no LoRA needed, {out} not written (the embedding alone makes FULL).")
    for path, size in written.items():
        log(f"wrote {path}: {size / 2**20:.2f} MiB")
    return {"full": req.full, "base": req.base, "rank": rank, "latent_channels": channels,
            "lora": out if out in written else None, "embedding": req.emb_path or (out if out in written else None),
            "layers": layers, "skipped": skipped, "unchanged": unchanged, "total_relative_error": total,
            "total_relative_error_bound": total_lower, "svd": req.svd, "bytes": written,
            "save_dtype": str(factor).replace("torch.", "")}


def carry_diffusers_pair(req: Request, family: str, sd_f: dict, sd_b: dict, embedding_keys: tuple, weight_key: str,
                         channels: int, patchable: Callable[[str], bool] = lambda key: True) -> dict:
    """A family in diffusers keys on both sides (SANA, Qwen-Image), its pair checked: the embedding is FULL's
    ``embedding_keys``, every other difference goes under ``diffusion_model.<key>``, linears and 1x1 convs as LoRA;
    the factors in FULL's ``weight_key`` dtype unless --save-dtype."""
    keys = check_same_tensors(req, family, sd_f, sd_b, lambda k: k in embedding_keys)
    factor = factor_dtype(req.save_dtype, sd_f[weight_key].dtype)
    emb_sd = {k: owned(sd_f[k], torch.float32).contiguous() for k in embedding_keys}
    report = carry_deltas(req, paired_deltas(sd_f, sd_b, keys), names=diffusion_model_names,
                          low_rank_target=linear_weight, factor=factor, emb_sd=emb_sd, channels=channels,
                          label=family, patchable=patchable)
    return {**report, "architecture": family}


def _atomic(path: str, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".partial"
    write(tmp)
    os.replace(tmp, path)  # never a truncated file under the final name
    return os.path.getsize(path)


def _source_metadata(full: str, base: str) -> dict:
    return {"full": os.path.basename(full.rstrip("/")), "base": os.path.basename(base.rstrip("/"))}


def write_embedding(path: str, emb_sd: dict, full: str, base: str) -> int:
    from safetensors.torch import save_file

    meta = {"dcgen_extract": json.dumps({**_source_metadata(full, base), "kind": "aligned embedding"})}
    return _atomic(path, lambda p: save_file({k: v.contiguous() for k, v in emb_sd.items()}, p, metadata=meta))


def write_lora(path: str, entries: dict, lora: dict, full: str, base: str, rank: int, total: float,
               channels: int) -> int:
    from ..shared.lora import save_lora

    ranks = {name: down.shape[0] for name, (down, _) in lora.items()}
    r = max(ranks.values(), default=rank)
    peft = {"r": r, "lora_alpha": float(r)}
    other = {name: k for name, k in ranks.items() if k != r}
    if other:  # alpha = rank per module: scale 1 everywhere
        peft.update(rank_pattern=other, alpha_pattern={name: float(k) for name, k in other.items()})
    meta = {"lora_adapter_metadata": json.dumps(peft),
            "dcgen_extract": json.dumps({**_source_metadata(full, base), "rank": rank, "latent_channels": channels,
                                         "total_relative_error": total})}
    # per-module alpha tensors (already named) rather than save_lora's one alpha: a layer smaller than --rank keeps
    # its full rank with alpha = that rank
    return _atomic(path, lambda p: save_lora(p, entries, alpha=None, metadata=meta))
