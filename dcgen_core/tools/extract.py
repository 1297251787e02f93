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
import math
import os
import sys

import torch

from ..shared.checkpoints import owned
from ..shared.errors import DCGenError
from ..flux.comfy_model import dcgen_channels, read_flux_checkpoint
from ..flux.keys import (SCALE_SHIFT_SWAPPED_MODULES, diffusers_flux_module_names, diffusers_flux_module_to_bfl,
                         swap_scale_shift)
from .extract_common import SAVE_DTYPES, Request, carry_deltas, check_same_tensors, factor_dtype, paired_deltas
from .lowrank import METHODS

SVD_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
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


def _save_dtype(sd_f: dict, name: str | None) -> torch.dtype:
    """--save-dtype, else FULL's weight dtype when its weights share one float dtype (a mix: fp32 if any, else bf16)."""
    dtypes = {getattr(v, "dtype", None) for k, v in sd_f.items() if k.endswith(".weight") and not _is_embedding(k)}
    single = next(iter(dtypes)) if len(dtypes) == 1 and dtypes <= set(SAVE_DTYPES.values()) else None
    return factor_dtype(name, single or (torch.float32 if torch.float32 in dtypes else torch.bfloat16))


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

    req = Request(full=full, base=base, out=out, rank=rank, emb_path=emb_path, embed_in_lora=embed_in_lora,
                  svd_dtype=SVD_DTYPES[dtype], device=_resolve_device(device), save_dtype=save_dtype,
                  min_delta=min_delta, svd=svd, oversample=oversample, power_iters=power_iters, log=log)
    from .extract_qwen import extract_qwen, is_qwen_checkpoint
    from .extract_sana import extract_sana, is_sana_checkpoint

    if is_qwen_checkpoint(full) or is_qwen_checkpoint(base):
        return extract_qwen(req)
    if is_sana_checkpoint(full) or is_sana_checkpoint(base):
        return extract_sana(req)
    return _extract_flux(req)


def _extract_flux(req: Request) -> dict:
    full, base = req.full, req.base
    sd_f, cfg_f, _ = read_flux_checkpoint(full)
    sd_b, cfg_b, _ = read_flux_checkpoint(base)
    sd_f = {_canonical(k): v for k, v in sd_f.items()}
    sd_b = {_canonical(k): v for k, v in sd_b.items()}
    channels = _check_pair(full, base, cfg_f, cfg_b)
    check_same_tensors(req, "FLUX", sd_f, sd_b, _is_embedding)
    factor = _save_dtype(sd_f, req.save_dtype)

    from ..shared.embedding import parse_aligned_embedding

    emb = parse_aligned_embedding({k: owned(v) for k, v in sd_f.items() if _is_embedding(k)}, source=f"FULL {full}")

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

    def deltas():
        """Each diffusers module's weight difference (a fused BFL weight split), then the BFL biases whole."""
        for key, modules in targets.items():
            w_b = owned(sd_b[key], torch.float32)
            delta = owned(sd_f[key], torch.float32) - w_b
            for name, offset in modules:
                part = delta if offset is None else delta.narrow(offset[0], offset[1], offset[2])
                ref = w_b if offset is None else w_b.narrow(offset[0], offset[1], offset[2])
                if name in SCALE_SHIFT_SWAPPED_MODULES:
                    part, ref = swap_scale_shift(part), swap_scale_shift(ref)
                yield name, part, ref
        yield from paired_deltas(sd_f, sd_b, biases)

    return carry_deltas(req, deltas(), names=_names, low_rank_target=lambda key, delta: delta.ndim == 2,
                        factor=factor, emb_sd=emb.to_diffusers_state_dict(), channels=channels,
                        whole="norms/biases")


def _names(key: str, low: bool) -> tuple[str, str, str]:
    """Diffusers modules under ``transformer.`` (RMSNorm scales as ``.diff``); BFL biases under ComfyUI's
    ``diffusion_model.`` as ``.diff_b``, in its (possibly fused) layout."""
    if key.endswith(".bias"):
        module = key[: -len(".bias")]
        return f"diffusion_model.{module}", module, "diff_b"
    return f"transformer.{key}", key, "lora" if low else "diff"


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
