"""``python -m dcgen_core.extract`` for Qwen-Image: the aligned embedding and a LoRA from a full DC-Gen-Qwen-Image-Edit
transformer and its base Qwen-Image-Edit (diffusers ``QwenImageTransformer2DModel`` keys, which are ComfyUI's; file or
folder, the Hub's nested release folder included).

Written under diffusers module names with ComfyUI's ``diffusion_model.`` prefix (core's LoRA reader and the pack's
both read them): the aligned embedding (FULL's ``img_in`` / ``proj_out``, exact); a LoRA of ``W_full - W_base`` for
every linear that differs (the truncated SVD of :mod:`.lowrank`, alpha = the layer's rank: scale 1); every other
tensor that differs (biases, RMSNorm scales) stored whole as ``.diff`` / ``.diff_b``, which ComfyUI applies.
"""

from __future__ import annotations

import math
import time

import torch

from ..qwen_image.comfy_model import read_qwen_checkpoint
from ..qwen_image.keys import is_qwen_image
from ..shared.checkpoints import load_checkpoint, owned
from ..shared.errors import DCGenError
from ..shared.keys import strip_prefix
from .lowrank import low_rank

EMBEDDING_KEYS = ("img_in.weight", "img_in.bias", "proj_out.weight", "proj_out.bias")


def is_qwen_checkpoint(path: str) -> bool:
    from ..qwen_image.comfy_model import resolve_release_folder

    try:
        return is_qwen_image(strip_prefix(load_checkpoint(resolve_release_folder(path), "transformer").state_dict))
    except DCGenError:
        return False


def extract_qwen(full: str, base: str, out: str, rank: int, *, emb_path: str | None, embed_in_lora: bool,
                 svd_dtype: torch.dtype, device: str, save_dtype: str | None, save_dtypes: dict, min_delta: float,
                 svd: str, oversample: int, power_iters: int, log, write_embedding, write_lora) -> dict:
    (sd_f, cfg_f), (sd_b, cfg_b) = read_qwen_checkpoint(full), read_qwen_checkpoint(base)
    if cfg_f.patch_size != 1 or cfg_b.patch_size != 2:
        raise DCGenError(f"FULL {full} / BASE {base}: expected a DC-Gen-Qwen-Image-Edit (patch 1) and the base "
                         f"Qwen-Image-Edit it was trained from (patch 2), found patch {cfg_f.patch_size} / "
                         f"{cfg_b.patch_size}.")
    keys_f, keys_b = set(sd_f) - set(EMBEDDING_KEYS), set(sd_b) - set(EMBEDDING_KEYS)
    wrong = sorted(keys_f ^ keys_b) + [k for k in sorted(keys_f & keys_b) if sd_f[k].shape != sd_b[k].shape]
    if wrong:
        raise DCGenError(f"FULL {full} and BASE {base}: expected the same Qwen-Image tensors apart from the embedder "
                         f"and head, found {len(wrong)} that differ in name or shape (e.g. {wrong[:3]}). A DC-Gen "
                         "model keeps its base's blocks: pick the base it was trained from.")
    if save_dtype is not None and save_dtype not in save_dtypes:
        raise DCGenError(f"--save-dtype: expected one of {list(save_dtypes)}, found '{save_dtype}'.")
    w0 = sd_f["transformer_blocks.0.attn.to_q.weight"].dtype
    factor_dtype = save_dtypes[save_dtype] if save_dtype else (
        w0 if w0 in (torch.float32, torch.float16, torch.bfloat16) else torch.float32)
    emb_sd = {k: owned(sd_f[k], torch.float32).contiguous() for k in EMBEDDING_KEYS}
    lora, entries, layers = {}, {}, []
    total_err = total_energy = 0.0
    start = time.perf_counter()
    for key in sorted(keys_f):
        w_b = owned(sd_b[key], torch.float32)
        delta = owned(sd_f[key], torch.float32) - w_b
        energy = delta.square().sum().item()
        if energy == 0.0:
            continue
        total_energy += energy
        rel_delta = math.sqrt(energy) / max(w_b.norm().item(), 1e-30)
        if rel_delta < min_delta:
            total_err += energy
            log(f"  skip {key}: relative difference {rel_delta:.2e} < --min-delta {min_delta:g}")
            continue
        if key.endswith(".weight") and delta.ndim == 2:
            module = key[: -len(".weight")]
            fit = low_rank(delta, rank, svd_dtype, device, factor_dtype, svd, oversample, power_iters)
            lora[module] = (fit.down, fit.up)
            entries[f"diffusion_model.{module}.alpha"] = torch.tensor(float(fit.rank))
            total_err += fit.error
            layers.append({"module": module, "kind": "lora", "rank": fit.rank,
                           "relative_error": math.sqrt(fit.error / energy)})
            log(f"  {module} {list(delta.shape)} rank {fit.rank}: relative error {math.sqrt(fit.error / energy):.3e}")
        else:
            kind = "diff_b" if key.endswith(".bias") else "diff"
            entries[f"diffusion_model.{key.rpartition('.')[0]}.{kind}"] = delta.contiguous()
            layers.append({"module": key, "kind": kind, "rank": None, "relative_error": 0.0})
            log(f"  {key} {list(delta.shape)}: stored whole (.{kind})")
    total = math.sqrt(total_err / total_energy) if total_energy else 0.0
    log(f"Qwen-Image: {sum(e['kind'] == 'lora' for e in layers)} low-rank layers (rank <= {rank}), "
        f"{sum(e['kind'] != 'lora' for e in layers)} tensors stored whole; total relative error {total:.4e} "
        f"({time.perf_counter() - start:.1f} s)")
    written = {}
    if emb_path:
        written[emb_path] = write_embedding(emb_path, emb_sd, full, base)
    for module, (down, up) in lora.items():
        entries[f"diffusion_model.{module}.lora_A.weight"] = down.contiguous()
        entries[f"diffusion_model.{module}.lora_B.weight"] = up.contiguous()
    if embed_in_lora:
        entries.update({f"transformer.{k}": v for k, v in emb_sd.items()})
    if entries or embed_in_lora:
        written[out] = write_lora(out, entries, lora, full, base, rank, total, cfg_f.latent_channels)
    for path, size in written.items():
        log(f"wrote {path}: {size / 2**20:.2f} MiB")
    return {"full": full, "base": base, "rank": rank, "latent_channels": cfg_f.latent_channels,
            "architecture": "Qwen-Image", "lora": out if out in written else None,
            "embedding": emb_path or (out if out in written else None), "layers": layers,
            "total_relative_error": total, "svd": svd, "bytes": written,
            "save_dtype": str(factor_dtype).replace("torch.", "")}
