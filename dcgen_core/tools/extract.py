"""Extract the aligned embedding and a LoRA from a full DC-Gen-FLUX (or DC-Gen-SANA: see extract_sana.py; or
DC-Gen-Qwen-Image-Edit: see extract_qwen.py) checkpoint and its base model.

    python -m dcgen_core.extract FULL BASE OUT --rank R [--embedding-out E | --embed-in-lora]

FULL is a DC-Gen-FLUX transformer (e.g. DC-Gen-FLUX.1-Krea-Dev Res1K / Res4K) and BASE the FLUX transformer it
was post-trained from, each in any layout the pack loads (diffusers folder or sharded, single safetensors with
diffusers or BFL keys). Written:

* the aligned embedding (FULL's ``x_embedder`` / ``proj_out``, diffusers names, exact), to ``--embedding-out``
  (default: OUT with an ``-embedding`` suffix) or into the LoRA file (``--embed-in-lora``);
* a LoRA of ``W_full - W_base`` (fp32) under diffusers module names ``transformer.<module>.lora_A/B.weight``:
  every linear that differs gets a truncated SVD at rank R (randomized by default, ``--svd exact`` for the exact
  one; all of it when the layer's rank is <= R: exact),
  ``up = U sqrt(S)``, ``down = sqrt(S) V^T``, ``alpha`` = the module's rank (scale 1). Fused BFL weights are split
  back into their diffusers modules (q / k / v / proj_mlp rows), ``norm_out.linear`` into diffusers row order.
  RMSNorm scales that differ are stored whole as ``transformer.<module>.diff`` and biases that differ as
  ``diffusion_model.<BFL module>.diff_b`` (the whole, possibly fused, bias in ComfyUI's layout): ComfyUI's core
  LoRA reader applies both (v0.3.64 and v0.33), and so does the pack's.

Base + embedding + LoRA through the pack's nodes (DC-Gen Load Model on BASE -> DC-Gen Add Embedding
-> DC-Gen Load LoRA at strength 1) is then FULL, up to the printed truncation error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from ..shared.checkpoints import owned
from ..shared.errors import DCGenError
from ..flux.comfy_model import dcgen_channels, read_flux_checkpoint
from ..flux.keys import (SCALE_SHIFT_SWAPPED_MODULES, diffusers_flux_module_names, diffusers_flux_module_to_bfl,
                         swap_scale_shift)
from .lowrank import METHODS, low_rank

SVD_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The embedder and head: not deltas (their shapes differ), written as the aligned embedding.
_EMBEDDING_MODULES = ("img_in", "final_layer.linear")
_EMBEDDING_DIFFUSERS = ("x_embedder", "proj_out")
#: Architecture fields that must agree between FULL and BASE.
_ARCH_FIELDS = ("hidden_size", "num_heads", "head_dim", "depth", "depth_single_blocks", "context_in_dim",
                "vec_in_dim", "mlp_hidden_dim", "guidance_embed", "qkv_bias")


def _canonical(key: str) -> str:
    """BFL key with RMSNorm parameters as ``.scale`` (ComfyUI v0.33 names them ``.weight``)."""
    if "_norm." in key and key.endswith(".weight"):
        return key[: -len(".weight")] + ".scale"
    return key


def _is_embedding(key: str) -> bool:
    return key.rpartition(".")[0] in _EMBEDDING_MODULES


def default_embedding_path(out: str) -> str:
    """Where the embedding goes when ``--embedding-out`` is not given: beside OUT, named like it with ``-lora``
    replaced by ``-embedding`` (``x-lora.safetensors`` -> ``x-embedding.safetensors``; another name gets an
    ``-embedding`` suffix); when OUT is in ComfyUI's ``models/loras``, in ``models/dcgen_embeddings`` instead
    (the folder DC-Gen Add Embedding lists), so that the README's command writes the names the shipped
    workflow ``dcgen-flux-1k-from-base-lora.json`` loads."""
    folder, file = os.path.split(out)
    root, ext = os.path.splitext(file)
    root = root[: -len("-lora")] if root.endswith("-lora") and len(root) > len("-lora") else root
    name = f"{root}-embedding{ext or '.safetensors'}"
    if os.path.basename(os.path.normpath(folder or ".")) == "loras" and folder:
        folder = os.path.join(os.path.dirname(os.path.normpath(folder)), "dcgen_embeddings")
    return os.path.join(folder, name)


def _describe(cfg) -> str:
    return (f"hidden {cfg.hidden_size} ({cfg.num_heads} heads x {cfg.head_dim}), {cfg.depth} double / "
            f"{cfg.depth_single_blocks} single blocks, text {cfg.context_in_dim}, pooled {cfg.vec_in_dim}, "
            f"mlp {cfg.mlp_hidden_dim}, guidance {'yes' if cfg.guidance_embed else 'no'}")


def _check_pair(full: str, base: str, cfg_f, cfg_b):
    """FULL is a DC-Gen-FLUX, BASE a base FLUX, of one architecture. Returns the DC-AE channel count."""
    if (cfg_b.img_in_features, cfg_b.out_features) != (64, 64):
        swapped = " (did you swap FULL and BASE?)" if (cfg_f.img_in_features, cfg_f.out_features) == (64, 64) else ""
        raise DCGenError(
            f"BASE {base}: expected a base FLUX transformer (64-channel embedder and head: 16 latent channels x 2x2 "
            f"patches), found {cfg_b.img_in_features} in / {cfg_b.out_features} out{swapped}.")
    if (cfg_f.img_in_features, cfg_f.out_features) == (cfg_b.img_in_features, cfg_b.out_features):
        raise DCGenError(
            f"FULL {full}: expected a DC-Gen transformer (an embedder for 32/128/512 DC-AE channels), found the same "
            f"{cfg_f.img_in_features}-channel embedder as BASE {base}: it is a FLUX model in FLUX's own latent "
            "space, nothing to extract.")
    channels = dcgen_channels(cfg_f, f"FULL {full}")
    differ = [f for f in _ARCH_FIELDS if getattr(cfg_f, f) != getattr(cfg_b, f)]
    if differ:
        shown = ", ".join(f"{f} {getattr(cfg_b, f)} vs {getattr(cfg_f, f)}" for f in differ)
        raise DCGenError(
            f"FULL {full} and BASE {base}: expected one FLUX architecture (BASE: {_describe(cfg_b)}), found FULL "
            f"with {_describe(cfg_f)} ({shown}). A DC-Gen model keeps its base's blocks: pick the base it was "
            "trained from.")
    return channels


def _check_keys(full: str, base: str, sd_f: dict, sd_b: dict):
    keys_f = {k for k in sd_f if not _is_embedding(k)}
    keys_b = {k for k in sd_b if not _is_embedding(k)}
    only_f, only_b = sorted(keys_f - keys_b), sorted(keys_b - keys_f)
    if only_f or only_b:
        raise DCGenError(
            f"FULL {full} and BASE {base}: expected the same FLUX tensors apart from the embedder and head, found "
            f"{len(only_f)} only in FULL (e.g. {only_f[:3]}) and {len(only_b)} only in BASE (e.g. {only_b[:3]}).")
    wrong = [k for k in sorted(keys_f) if tuple(sd_f[k].shape) != tuple(sd_b[k].shape)]
    if wrong:
        k = wrong[0]
        raise DCGenError(
            f"FULL {full} and BASE {base}: expected tensors of the same shapes, found {len(wrong)} that differ, e.g. "
            f"{k}: {list(sd_f[k].shape)} in FULL vs {list(sd_b[k].shape)} in BASE.")


def _save_dtype(sd_f: dict, name: str | None) -> torch.dtype:
    if name is not None:
        if name not in SAVE_DTYPES:
            raise DCGenError(f"--save-dtype: expected one of {list(SAVE_DTYPES)}, found '{name}'.")
        return SAVE_DTYPES[name]
    dtypes = {getattr(v, "dtype", None) for k, v in sd_f.items() if k.endswith(".weight") and not _is_embedding(k)}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        if dtypes == {dt}:
            return dt
    return torch.float32 if torch.float32 in dtypes else torch.bfloat16


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def extract(full: str, base: str, out: str, rank: int, *, device: str | None = None, dtype: str = "fp32",
            save_dtype: str | None = None, embedding_out: str | None = None, embed_in_lora: bool = False,
            min_delta: float = 0.0, overwrite: bool = False, svd: str = "randomized", oversample: int = 10,
            power_iters: int = 4, log=print) -> dict:
    """Write the aligned embedding and a rank-``rank`` LoRA of ``full - base``; returns a report.

    ``dtype``: the SVD's precision ("fp32" / "fp64"); ``save_dtype``: the LoRA factors' ("fp32", "bf16", "fp16";
    default FULL's weight dtype); ``min_delta``: layers with ||W_full - W_base|| / ||W_base|| below it are left out
    (counted in the error); ``svd``: "randomized" (``torch.svd_lowrank`` with ``rank + oversample`` columns and
    ``power_iters`` power iterations; see :mod:`.lowrank`) or "exact"; ``log``: called with each line printed (None:
    silent). Each layer's line and the summary give the achieved error and a lower bound on the exact SVD's.
    """
    log = log or (lambda *_: None)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DCGenError(f"--rank: expected a whole number >= 1, found {rank!r}.")
    if dtype not in SVD_DTYPES:
        raise DCGenError(f"--dtype: expected one of {list(SVD_DTYPES)}, found '{dtype}'.")
    if not (min_delta >= 0 and math.isfinite(min_delta)):
        raise DCGenError(f"--min-delta: expected a relative difference >= 0, found {min_delta!r}.")
    if svd not in METHODS:
        raise DCGenError(f"--svd: expected one of {list(METHODS)}, found '{svd}'.")
    if embed_in_lora and embedding_out:
        raise DCGenError("--embedding-out and --embed-in-lora: expected one of them, found both.")
    emb_path = None if embed_in_lora else (embedding_out or default_embedding_path(out))
    outputs = [out] + ([emb_path] if emb_path else [])
    inputs = {os.path.abspath(p.rstrip("/")) for p in (full, base)}
    for p in outputs:
        if os.path.abspath(p) in inputs:
            raise DCGenError(f"{p}: expected an output path other than FULL and BASE.")
        if os.path.exists(p) and not overwrite:
            raise DCGenError(f"{p}: expected a new output file, found an existing one (pass --overwrite).")
    if emb_path and os.path.abspath(emb_path) == os.path.abspath(out):
        raise DCGenError(f"{out}: expected the embedding and the LoRA in different files (or --embed-in-lora).")

    svd_dtype, device = SVD_DTYPES[dtype], _resolve_device(device)
    from .extract_qwen import extract_qwen, is_qwen_checkpoint
    from .extract_sana import extract_sana, is_sana_checkpoint

    if is_qwen_checkpoint(full) or is_qwen_checkpoint(base):
        return extract_qwen(full, base, out, rank, emb_path=emb_path, embed_in_lora=embed_in_lora,
                            svd_dtype=svd_dtype, device=device, save_dtype=save_dtype, save_dtypes=SAVE_DTYPES,
                            min_delta=min_delta, svd=svd, oversample=oversample, power_iters=power_iters, log=log,
                            write_embedding=_write_embedding, write_lora=_write_lora)

    if is_sana_checkpoint(full) or is_sana_checkpoint(base):
        return extract_sana(full, base, out, rank, emb_path=emb_path, embed_in_lora=embed_in_lora,
                            svd_dtype=svd_dtype, device=device, save_dtype=save_dtype, save_dtypes=SAVE_DTYPES,
                            min_delta=min_delta, svd=svd, oversample=oversample, power_iters=power_iters, log=log,
                            write_embedding=_write_embedding, write_lora=_write_lora)
    sd_f, cfg_f, _ = read_flux_checkpoint(full)
    sd_b, cfg_b, _ = read_flux_checkpoint(base)
    sd_f = {_canonical(k): v for k, v in sd_f.items()}
    sd_b = {_canonical(k): v for k, v in sd_b.items()}
    channels = _check_pair(full, base, cfg_f, cfg_b)
    _check_keys(full, base, sd_f, sd_b)
    factor_dtype = _save_dtype(sd_f, save_dtype)

    from ..shared.embedding import parse_aligned_embedding

    emb = parse_aligned_embedding({k: owned(v) for k, v in sd_f.items() if _is_embedding(k)}, source=f"FULL {full}")
    emb_sd = emb.to_diffusers_state_dict()

    # diffusers module -> its BFL weight (rows of a fused one; norm_out's halves swapped), grouped by BFL weight
    targets: dict[str, list] = {}
    for name in diffusers_flux_module_names(cfg_f):
        if name in _EMBEDDING_DIFFUSERS:
            continue
        key, offset = diffusers_flux_module_to_bfl(name, config=cfg_f)
        targets.setdefault(key, []).append((name, offset))
    biases = [k for k in sd_b if k.endswith(".bias") and not _is_embedding(k)]
    uncovered = sorted(set(sd_b) - set(targets) - set(biases) - {k for k in sd_b if _is_embedding(k)})
    if uncovered:
        raise DCGenError(f"BASE {base}: expected only FLUX tensors the pack maps, found {len(uncovered)} others "
                         f"(e.g. {uncovered[:3]}).")

    lora, alphas, diffs, layers, skipped = {}, {}, {}, [], []
    total_err = total_energy = total_bound = 0.0
    unchanged = 0
    start = time.perf_counter()

    def consider(what: str, delta: torch.Tensor, reference: torch.Tensor):
        """(||delta||^2, ||delta|| / ||reference||) when the delta is kept; None (bookkeeping done) when it is zero
        or below --min-delta."""
        nonlocal total_err, total_energy, total_bound, unchanged
        energy = delta.square().sum().item()
        if energy == 0.0:
            unchanged += 1
            return None
        rel = math.sqrt(energy) / max(reference.norm().item(), 1e-30)
        total_energy += energy
        if rel < min_delta:
            total_err += energy
            total_bound += energy
            skipped.append({"module": what, "relative_delta": rel})
            log(f"  skip {what}: relative difference {rel:.2e} < --min-delta {min_delta:g}")
            return None
        return energy, rel

    for key, modules in targets.items():
        w_f, w_b = owned(sd_f[key], torch.float32), owned(sd_b[key], torch.float32)
        delta = w_f - w_b
        del w_f
        for name, offset in modules:
            part = delta if offset is None else delta.narrow(offset[0], offset[1], offset[2])
            ref = w_b if offset is None else w_b.narrow(offset[0], offset[1], offset[2])
            if name in SCALE_SHIFT_SWAPPED_MODULES:
                part, ref = swap_scale_shift(part), swap_scale_shift(ref)
            kept = consider(name, part, ref)
            if kept is None:
                continue
            energy, rel_delta = kept
            if part.ndim == 1:  # an RMSNorm scale: stored whole
                diffs[f"transformer.{name}.diff"] = part.clone()
                layers.append({"module": name, "kind": "diff", "shape": list(part.shape), "rank": None,
                               "relative_delta": rel_delta, "relative_error": 0.0})
                log(f"  {name} {list(part.shape)}: stored whole (.diff), relative difference {rel_delta:.2e}")
                continue
            fit = low_rank(part, rank, svd_dtype, device, factor_dtype, svd, oversample, power_iters)
            r, err = fit.rank, fit.error
            lora[name] = (fit.down, fit.up)
            alphas[f"transformer.{name}.alpha"] = torch.tensor(float(r))
            total_err += err
            total_bound += fit.bound
            rel_err, rel_bound = math.sqrt(err / energy), math.sqrt(fit.bound / energy)
            layers.append({"module": name, "kind": "lora", "shape": list(part.shape), "rank": r,
                           "relative_delta": rel_delta, "relative_error": rel_err,
                           "relative_error_bound": rel_bound, "svd": fit.method})
            log(f"  {name} {list(part.shape)} rank {r}: relative error {rel_err:.3e} ({fit.method} SVD; exact "
                f"SVD's >= {rel_bound:.3e}) (relative difference {rel_delta:.2e})")
        del delta, w_b
    for key in biases:
        b_b = owned(sd_b[key], torch.float32)
        delta = owned(sd_f[key], torch.float32) - b_b
        module = key[: -len(".bias")]
        kept = consider(module + ".bias", delta, b_b)
        if kept is None:
            continue
        rel_delta = kept[1]
        diffs[f"diffusion_model.{module}.diff_b"] = delta
        layers.append({"module": module, "kind": "diff_b", "shape": list(delta.shape), "rank": None,
                       "relative_delta": rel_delta, "relative_error": 0.0})
        log(f"  {module}.bias {list(delta.shape)}: stored whole (.diff_b), relative difference {rel_delta:.2e}")

    total = math.sqrt(total_err / total_energy) if total_energy else 0.0
    total_lower = math.sqrt(min(total_bound, total_err) / total_energy) if total_energy else 0.0
    low = [entry for entry in layers if entry["kind"] == "lora"]
    log(f"{len(low)} low-rank layers (rank <= {rank}, {svd} SVD), {len(layers) - len(low)} norms/biases stored "
        f"whole, {len(skipped)} skipped (--min-delta), {unchanged} unchanged; total relative error {total:.4e} "
        f"(exact SVD's >= {total_lower:.4e}) ({time.perf_counter() - start:.1f} s)")

    written = {}
    if emb_path:
        written[emb_path] = _write_embedding(emb_path, emb_sd, full, base)
    entries = {**lora, **alphas, **diffs}
    if embed_in_lora:
        entries.update({f"transformer.{k}": v.contiguous() for k, v in emb_sd.items()})
    if lora or diffs or embed_in_lora:
        written[out] = _write_lora(out, entries, lora, full, base, rank, total, channels)
    else:
        log(f"FULL and BASE have the same blocks: no LoRA needed, {out} not written (the embedding alone makes FULL).")
    for path, size in written.items():
        log(f"wrote {path}: {size / 2**20:.2f} MiB")
    return {"full": full, "base": base, "rank": rank, "latent_channels": channels,
            "lora": out if out in written else None, "embedding": emb_path or (out if out in written else None),
            "layers": layers, "skipped": skipped, "unchanged": unchanged, "total_relative_error": total,
            "total_relative_error_bound": total_lower, "svd": svd,
            "bytes": written, "save_dtype": str(factor_dtype).replace("torch.", "")}


def _atomic(path: str, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".partial"
    write(tmp)
    os.replace(tmp, path)  # never a truncated file under the final name
    return os.path.getsize(path)


def _source_metadata(full: str, base: str) -> dict:
    return {"full": os.path.basename(full.rstrip("/")), "base": os.path.basename(base.rstrip("/"))}


def _write_embedding(path: str, emb_sd: dict, full: str, base: str) -> int:
    from safetensors.torch import save_file

    meta = {"dcgen_extract": json.dumps({**_source_metadata(full, base), "kind": "aligned embedding"})}
    return _atomic(path, lambda p: save_file({k: v.contiguous() for k, v in emb_sd.items()}, p, metadata=meta))


def _write_lora(path: str, entries: dict, lora: dict, full: str, base: str, rank: int, total: float,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dcgen_core.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("full", help="DC-Gen-FLUX or DC-Gen-SANA transformer: .safetensors (diffusers/BFL/original "
                                     "keys) or diffusers folder")
    parser.add_argument("base", help="its base transformer (e.g. FLUX.1-Krea-dev, SANA-1.6B), any layout")
    parser.add_argument("out", help="output LoRA .safetensors (put it in ComfyUI/models/loras)")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank (the official post-training used 256)")
    parser.add_argument("--device", default="auto", help="where to run the SVDs (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(SVD_DTYPES), help="precision of the SVDs")
    parser.add_argument("--svd", default="randomized", choices=list(METHODS),
                        help="randomized (default: torch.svd_lowrank, minutes for FLUX's ~420 layers) or exact "
                             "(torch.linalg.svd: the optimum, hours on a CPU); both print the achieved error and a "
                             "lower bound on the exact one")
    parser.add_argument("--oversample", type=int, default=10, help="randomized SVD: extra sketch columns (default 10)")
    parser.add_argument("--power-iters", type=int, default=4, help="randomized SVD: power iterations (default 4)")
    parser.add_argument("--save-dtype", default=None, choices=list(SAVE_DTYPES),
                        help="dtype of the LoRA factors (default: FULL's weight dtype)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--embedding-out", default=None,
                       help="aligned embedding file (default: OUT's name with -lora replaced by -embedding, in "
                            "models/dcgen_embeddings when OUT is in models/loras, else beside OUT)")
    where.add_argument("--embed-in-lora", action="store_true",
                       help="write the aligned embedding into the LoRA file instead (DC-Gen Load LoRA applies both)")
    parser.add_argument("--min-delta", type=float, default=0.0,
                        help="leave out layers whose ||W_full - W_base|| / ||W_base|| is below this (default 0: "
                             "only identical ones)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not every layer")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def log(line: str):
        if not (args.quiet and line.startswith("  ")):
            print(line, flush=True)

    try:
        extract(args.full, args.base, args.out, args.rank, device=args.device, dtype=args.dtype,
                save_dtype=args.save_dtype, embedding_out=args.embedding_out, embed_in_lora=args.embed_in_lora,
                min_delta=args.min_delta, overwrite=args.overwrite, svd=args.svd, oversample=args.oversample,
                power_iters=args.power_iters, log=log)
    except DCGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
