"""``python -m dcgen_core.extract`` for SANA: the aligned embedding and a LoRA from a full DC-Gen-SANA transformer and
its base SANA (diffusers ``SanaTransformer2DModel`` keys or original NVlabs/Sana keys, file or diffusers folder).

Written, all under diffusers module names (SANA's parameters in ComfyUI carry them), with ComfyUI's
``diffusion_model.`` prefix, which both core's LoRA loader (it knows no SANA naming of its own) and the pack's read:

* the aligned embedding: FULL's ``patch_embed.proj`` (a 1x1 conv [hidden, C, 1, 1]) and ``proj_out``, exact;
* a LoRA of ``W_full - W_base`` for every linear and 1x1 conv that differs (``diffusion_model.<module>.lora_A/B.weight``,
  the truncated SVD of :mod:`.lowrank`, alpha = the layer's rank: scale 1); every other tensor that differs (the
  depthwise 3x3 conv, biases, norms, time and caption embedders) stored whole as ``diffusion_model.<key>.diff`` /
  ``.diff_b``, which ComfyUI's core LoRA reader applies (v0.3.64 and v0.33) and so does the pack's. A changed
  ``scale_shift_table`` cannot be carried (ComfyUI patches leaf modules' parameters only): it is left out, named,
  and counted in the printed error (LoRA post-training never changes it).
"""

from __future__ import annotations

import math
import time

import torch

from ..shared.checkpoints import load_checkpoint, owned
from ..shared.errors import DCGenError
from ..sana.comfy_model import read_sana_checkpoint
from ..sana.keys import is_diffusers_sana, is_original_sana, unwrap
from .lowrank import low_rank

#: Parameters of SANA modules that have children (the blocks' and the model's ``scale_shift_table``): ComfyUI's
#: model patcher applies weight patches to leaf modules only, so a ``.diff`` for them would be silently ignored.
UNPATCHABLE = ("scale_shift_table",)
EMBEDDING_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "proj_out.weight", "proj_out.bias")


def is_sana_checkpoint(path: str) -> bool:
    try:
        sd = unwrap(load_checkpoint(path, component="transformer").state_dict)
    except DCGenError:
        return False
    return is_diffusers_sana(sd) or is_original_sana(sd)


def _low_rank_target(key: str, t: torch.Tensor) -> bool:
    """A linear weight [out, in] or a 1x1 conv weight [out, in, 1, 1]: a LoRA target."""
    return key.endswith(".weight") and (t.ndim == 2 or (t.ndim == 4 and t.shape[2:] == (1, 1) and t.shape[1] > 1))


def extract_sana(full: str, base: str, out: str, rank: int, *, emb_path: str | None, embed_in_lora: bool,
                 svd_dtype: torch.dtype, device: str, save_dtype: str | None, save_dtypes: dict, min_delta: float,
                 svd: str, oversample: int, power_iters: int, log, write_embedding, write_lora) -> dict:
    sd_f, _ = read_sana_checkpoint(full)
    sd_b, _ = read_sana_checkpoint(base)
    c_b = int(sd_b["patch_embed.proj.weight"].shape[1])
    c_f = int(sd_f["patch_embed.proj.weight"].shape[1])
    if c_f == c_b:
        raise DCGenError(f"FULL {full}: expected a DC-Gen-SANA transformer (an embedder for another DC-AE than "
                         f"BASE's), found the same {c_f}-channel embedder as BASE {base}: nothing to extract.")
    keys_f, keys_b = set(sd_f) - set(EMBEDDING_KEYS), set(sd_b) - set(EMBEDDING_KEYS)
    if keys_f != keys_b:
        only_f, only_b = sorted(keys_f - keys_b), sorted(keys_b - keys_f)
        raise DCGenError(f"FULL {full} and BASE {base}: expected the same SANA tensors apart from the embedder and "
                         f"head, found {len(only_f)} only in FULL (e.g. {only_f[:3]}) and {len(only_b)} only in BASE "
                         f"(e.g. {only_b[:3]}). A DC-Gen model keeps its base's blocks: pick the base it was "
                         "trained from.")
    wrong = [k for k in sorted(keys_f) if tuple(sd_f[k].shape) != tuple(sd_b[k].shape)]
    if wrong:
        k = wrong[0]
        raise DCGenError(f"FULL {full} and BASE {base}: expected tensors of the same shapes, found {len(wrong)} that "
                         f"differ, e.g. {k}: {list(sd_f[k].shape)} in FULL vs {list(sd_b[k].shape)} in BASE.")
    if save_dtype is not None and save_dtype not in save_dtypes:
        raise DCGenError(f"--save-dtype: expected one of {list(save_dtypes)}, found '{save_dtype}'.")
    factor_dtype = save_dtypes[save_dtype] if save_dtype else (
        sd_f["transformer_blocks.0.attn1.to_q.weight"].dtype if sd_f["transformer_blocks.0.attn1.to_q.weight"].dtype
        in (torch.float32, torch.float16, torch.bfloat16) else torch.float32)
    emb_sd = {k: owned(sd_f[k], torch.float32).contiguous() for k in EMBEDDING_KEYS}

    lora, alphas, diffs, layers, skipped = {}, {}, {}, [], []
    total_err = total_energy = total_bound = 0.0
    unchanged = 0
    start = time.perf_counter()
    for key in sorted(keys_f):
        w_b = owned(sd_b[key], torch.float32)
        delta = owned(sd_f[key], torch.float32) - w_b
        energy = delta.square().sum().item()
        if energy == 0.0:
            unchanged += 1
            continue
        rel_delta = math.sqrt(energy) / max(w_b.norm().item(), 1e-30)
        total_energy += energy
        if rel_delta < min_delta:
            total_err += energy
            total_bound += energy
            skipped.append({"module": key, "relative_delta": rel_delta})
            log(f"  skip {key}: relative difference {rel_delta:.2e} < --min-delta {min_delta:g}")
            continue
        if key.rpartition(".")[2] in UNPATCHABLE:
            total_err += energy
            total_bound += energy
            skipped.append({"module": key, "relative_delta": rel_delta, "reason": "not patchable in ComfyUI"})
            log(f"  left out {key} {list(delta.shape)}: relative difference {rel_delta:.2e}, but ComfyUI patches no "
                "parameter of a module with children (a LoRA .diff there is never applied); counted in the error")
            continue
        if _low_rank_target(key, delta):
            module = key[: -len(".weight")]
            fit = low_rank(delta.reshape(delta.shape[0], -1), rank, svd_dtype, device, factor_dtype, svd, oversample,
                           power_iters)
            lora[module] = (fit.down, fit.up)
            alphas[f"diffusion_model.{module}.alpha"] = torch.tensor(float(fit.rank))
            total_err += fit.error
            total_bound += fit.bound
            rel_err, rel_bound = math.sqrt(fit.error / energy), math.sqrt(fit.bound / energy)
            layers.append({"module": module, "kind": "lora", "shape": list(delta.shape), "rank": fit.rank,
                           "relative_delta": rel_delta, "relative_error": rel_err,
                           "relative_error_bound": rel_bound, "svd": fit.method})
            log(f"  {module} {list(delta.shape)} rank {fit.rank}: relative error {rel_err:.3e} ({fit.method} SVD; "
                f"exact SVD's >= {rel_bound:.3e}) (relative difference {rel_delta:.2e})")
            continue
        if key.endswith(".bias"):
            name, kind = f"diffusion_model.{key[: -len('.bias')]}.diff_b", "diff_b"
        elif key.endswith(".weight"):
            name, kind = f"diffusion_model.{key[: -len('.weight')]}.diff", "diff"
        else:  # a parameter of its own name (scale_shift_table): core's generic "diffusion_model.<key>" entry
            name, kind = f"diffusion_model.{key}.diff", "diff"
        diffs[name] = delta.contiguous()
        layers.append({"module": key, "kind": kind, "shape": list(delta.shape), "rank": None,
                       "relative_delta": rel_delta, "relative_error": 0.0})
        log(f"  {key} {list(delta.shape)}: stored whole (.{kind}), relative difference {rel_delta:.2e}")

    total = math.sqrt(total_err / total_energy) if total_energy else 0.0
    total_lower = math.sqrt(min(total_bound, total_err) / total_energy) if total_energy else 0.0
    low = [entry for entry in layers if entry["kind"] == "lora"]
    log(f"SANA: {len(low)} low-rank layers (rank <= {rank}, {svd} SVD), {len(layers) - len(low)} tensors stored "
        f"whole, {len(skipped)} skipped (--min-delta), {unchanged} unchanged; total relative error {total:.4e} "
        f"(exact SVD's >= {total_lower:.4e}) ({time.perf_counter() - start:.1f} s)")

    written = {}
    if emb_path:
        written[emb_path] = write_embedding(emb_path, emb_sd, full, base)
    entries = {**alphas, **diffs}
    for module, (down, up) in lora.items():
        entries[f"diffusion_model.{module}.lora_A.weight"] = down.contiguous()
        entries[f"diffusion_model.{module}.lora_B.weight"] = up.contiguous()
    if embed_in_lora:
        entries.update({f"transformer.{k}": v for k, v in emb_sd.items()})
    if lora or diffs or embed_in_lora:
        written[out] = write_lora(out, entries, lora, full, base, rank, total, c_f)
    else:
        log(f"FULL and BASE have the same blocks: no LoRA needed, {out} not written (the embedding alone makes FULL).")
    for path, size in written.items():
        log(f"wrote {path}: {size / 2**20:.2f} MiB")
    return {"full": full, "base": base, "rank": rank, "latent_channels": c_f, "architecture": "SANA",
            "lora": out if out in written else None, "embedding": emb_path or (out if out in written else None),
            "layers": layers, "skipped": skipped, "unchanged": unchanged, "total_relative_error": total,
            "total_relative_error_bound": total_lower, "svd": svd, "bytes": written,
            "save_dtype": str(factor_dtype).replace("torch.", "")}

