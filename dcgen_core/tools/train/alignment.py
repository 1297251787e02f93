"""Embedding alignment (post-training stage 1).

1. A new 1x1 embedder (xavier init, zero bias) is fitted so that its tokens on DC-AE latents agree with the frozen
   base embedder's tokens on the base-VAE latents of the same images (2x2-patchified), after matching the token
   grids (``--mode``): bilinear upsampling of the student's grid (default), average-pooling of the teacher's,
   global means, or the sum of the three. MSE, AdamW (``--embed-solver adam``, the recipe), or the exact
   least-squares minimiser of the same loss (``lstsq``: grid matching is linear, so the loss is a linear
   regression; one pass over the cache, float64 normal equations).
2. The new head (and with ``--train-embedder`` the embedder) is trained with the flow-matching objective (the
   guidance-distilled one for guidance-distilled bases) while every other weight stays frozen.

For FLUX and SANA (families.py: the base transformer decides; SANA's embedder is ``patch_embed.proj``, a 1x1 conv,
its teacher tokens those of the base embedder on SANA's own f32c32 latents).

Writes ``<out>/<name>-embedding.safetensors``: x_embedder (SANA: patch_embed.proj) / proj_out under diffusers names,
which Apply DC-Gen Aligned Embedding (and the LoRA stage) loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ...shared.errors import DCGenError
from .common import Stage, TrainConfig, progress_bar, resolve_runtime, run_stage
from .cache import open_cache
from .families import training_family
from .model import grid_ratio
from .fsdp import shard_model
from .objectives import ALIGN_MODES, alignment_loss, alignment_regression, denoising_loss, resolve_objective
from .state import CheckpointManager

SOLVERS = ("adam", "lstsq")
EMBED_STAGE, HEAD_STAGE = "align-embedder", "align-head"


@dataclass
class AlignResult:
    model: object  # the diffusers FluxTransformer2DModel / SanaTransformer2DModel with the aligned embedder/head
    embedding_path: str | None
    losses: dict = field(default_factory=dict)  # stage name -> per-step losses of this call
    objective: str = ""


def _as_model(base, rt, family):
    if isinstance(base, torch.nn.Module):
        return base
    return family.load_base_transformer(base, dtype=rt.dtype, device=rt.base_device)


def _student_grid(embedder, latent):
    if isinstance(embedder, torch.nn.Conv2d):  # SANA's patch embedder: a 1x1 conv on the latent grid
        return embedder(latent).float()
    b, c, h, w = latent.shape
    tokens = embedder(latent.permute(0, 2, 3, 1).reshape(b, h * w, c))
    return tokens.float().reshape(b, h, w, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def solve_alignment(cache, teacher, channels: int, mode: str, batch_size: int, device, progress: bool = True,
                    teacher_tokens=None):
    """(weight [hidden, C], bias [hidden]) minimising the alignment MSE over the whole cache (float64).
    ``teacher_tokens``: the family's (default: FLUX's, on 2x2 patches)."""
    if teacher_tokens is None:
        from .model import teacher_tokens
    hidden = teacher.weight.shape[0]
    gram = torch.zeros(channels + 1, channels + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(channels + 1, hidden, dtype=torch.float64, device=device)
    n = len(cache)
    bar = progress_bar(n, "align (least squares)", progress, unit="image")
    try:
        groups = cache.groups() if hasattr(cache, "groups") else [list(range(n))]  # a batch within one bucket
        chunks = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
        for chunk in chunks:
            b = cache.batch(chunk, device, keys=("base_latents", "dcae_latents"))
            target = teacher_tokens(teacher, b["base_latents"])
            grid_ratio(target.shape[-2:], b["dcae_latents"].shape[-2:])
            for x, y, weight in alignment_regression(b["dcae_latents"].float(), target, mode):
                xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=device)], 1)
                gram += weight * xa.T @ xa
                cross += weight * xa.T @ y.double()
            bar.update(b["dcae_latents"].shape[0])
    finally:
        bar.close()
    ridge = 1e-12 * gram.diagonal().mean().clamp_min(1e-30)
    theta = torch.linalg.solve(gram + ridge * torch.eye(channels + 1, dtype=torch.float64, device=device), cross)
    return theta[:channels].T.float(), theta[channels].float()


def align(cache, base, out: str | None, *, channels: int, mode: str = "upsample", embed_steps: int = 1000,
          embed_lr: float = 1e-3, solver: str = "adam", train_embedder: bool = False, cfg: TrainConfig | None = None,
          name: str = "dcgen", on_step=None) -> AlignResult:
    """Run both alignment steps; ``cfg.steps`` / ``cfg.lr`` are the head stage's. ``base``: a path or an already
    loaded FluxTransformer2DModel (frozen base FLUX, 64 input channels) or SanaTransformer2DModel (frozen base SANA,
    32 channels): it decides the family, which the cache's must match; ``out`` None writes nothing."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    if mode not in ALIGN_MODES:
        raise DCGenError(f"--mode: expected one of {', '.join(ALIGN_MODES)}, found {mode!r}.")
    if solver not in SOLVERS:
        raise DCGenError(f"--embed-solver: expected one of {', '.join(SOLVERS)}, found {solver!r}.")
    rt = resolve_runtime(cfg)
    cache = open_cache(cache)
    if cache.dcae_channels != channels:
        raise DCGenError(f"--channels {channels}: expected the cache's DC-AE channel count, found "
                         f"{cache.dcae_channels} in the cache. Prepare the cache with the DC-AE of {channels} "
                         "channels or pass --channels " + str(cache.dcae_channels) + ".")
    embed_steps = embed_steps if solver == "adam" else 0
    if (embed_steps > 0 or solver == "lstsq") and not cache.has_base_latents:
        raise DCGenError("align: expected base-VAE latents in the cache (the teacher's input), found none. Prepare "
                         "it with --base-vae.")
    family = training_family(base, cache, cfg.objective)
    model = _as_model(base, rt, family)
    teacher = family.base_embedder(model).to(rt.device)  # (loaded on the CPU under FSDP)
    torch.manual_seed(cfg.seed)
    embedder, head = family.install_embedding(model, channels, device=rt.device)
    if rt.gradient_checkpointing and train_embedder:
        model.enable_gradient_checkpointing()
    shard_model(model, rt, keep=(embedder, head))  # --sharding fsdp: the frozen base's weights
    saved = {"x_embedder.weight": embedder.weight, "x_embedder.bias": embedder.bias,
             "proj_out.weight": head.weight, "proj_out.bias": head.bias}
    structure = {"kind": "align", "channels": channels, "hidden": family.hidden_size(model), "mode": mode,
                 "solver": solver, "embed_steps": embed_steps, "train_embedder": train_embedder,
                 "ema": cfg.ema_decay > 0, "global_batch": rt.global_batch}
    checkpoints = CheckpointManager(out, structure, cfg.keep_checkpoints) if out else None
    resume = checkpoints.resolve(cfg.resume) if checkpoints else None
    result = AlignResult(model=model, embedding_path=None)
    result.objective = resolve_objective(cfg.objective, bool(model.config.guidance_embeds))
    # built before stage 1, so that a cache lacking what stage 2 needs fails at once
    loss_fn = denoising_loss(family.Denoiser(model, rt), cache, cfg, rt.device) if cfg.steps > 0 else None

    # stage 1: the embedder (skipped when resuming in stage 2: the checkpoint holds it)
    if resume is None or resume.stage == EMBED_STAGE:
        if solver == "lstsq":
            w, b = solve_alignment(cache, teacher, channels, mode, cfg.batch_size, rt.device, cfg.progress,
                                   family.teacher_tokens)
            with torch.no_grad():
                embedder.weight.copy_(w.view_as(embedder.weight))
                embedder.bias.copy_(b)
        elif embed_steps > 0:
            def embed_loss(indices, generator, part=None):
                b = cache.batch(indices[part or slice(None)], rt.device, keys=("base_latents", "dcae_latents"))
                with torch.no_grad(), rt.autocast_context():
                    target = family.teacher_tokens(teacher, b["base_latents"])
                with rt.autocast_context():
                    student = _student_grid(embedder, b["dcae_latents"])
                grid_ratio(target.shape[-2:], student.shape[-2:])
                return alignment_loss(student, target, mode)

            stage = Stage(EMBED_STAGE, {"x_embedder.weight": embedder.weight, "x_embedder.bias": embedder.bias},
                          embed_loss, 0, embed_steps, embed_lr, cfg.seed)
            run_stage(stage, cfg, cache, checkpoints, resume, on_step, saved_params=saved, rt=rt)
            result.losses["embed"] = stage.losses
        resume = None

    # stage 2: the head (and optionally the embedder) with the denoising objective
    params = {"proj_out.weight": head.weight, "proj_out.bias": head.bias}
    if train_embedder:
        params = {"x_embedder.weight": embedder.weight, "x_embedder.bias": embedder.bias, **params}
    for p in saved.values():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    stage = Stage(HEAD_STAGE, params, loss_fn, embed_steps, embed_steps + cfg.steps, cfg.lr, cfg.seed + 1)
    if cfg.steps > 0:
        run_stage(stage, cfg, cache, checkpoints, resume, on_step, saved_params=saved, rt=rt)
        result.losses["head"] = stage.losses
    elif resume is not None:
        resume.load_params(saved)
    for p in saved.values():
        p.requires_grad_(False)

    if out and rt.is_main:  # one writer: the main process
        meta = {"dcgen_stage": "align", "latent_channels": channels, "mode": mode, "solver": solver,
                "embed_steps": embed_steps, "head_steps": cfg.steps, "objective": result.objective,
                "base": getattr(model, "source", ""), "seed": cfg.seed}
        result.embedding_path = family.save_embedding(os.path.join(out, f"{name}-embedding.safetensors"), model,
                                                      meta)
        with open(os.path.join(out, f"{name}-align.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "config": cfg.to_dict(), "losses": result.losses}, f, indent=1)
    return result
