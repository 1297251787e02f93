"""LoRA fine-tuning (post-training stage 2) with PEFT on diffusers' FluxTransformer2DModel or SanaTransformer2DModel
(the base transformer decides, families.py; SANA: its own targets and ``diffusion_model.`` key names, flow matching).

The base FLUX gets the aligned embedder/head (trained fully from there) and a LoRA (rank/alpha as given, dropout
0) on the recipe's targets (:data:`~.model.LORA_TARGET_REGEX`). Objective: guidance-distilled for bases with a
guidance embedding, plain flow matching otherwise (``--objective``).

Writes ``<out>/<name>-lora.safetensors`` (``transformer.<module>.lora_A/B.weight`` and ``.alpha``, through
:func:`dcgen_core.shared.lora.save_lora`, so core LoRA loaders and the pack apply the same strength; with
``--embed-in-lora`` it also carries the embedder/head) and ``<out>/<name>-embedding.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ...shared.errors import DCGenError
from .common import Stage, TrainConfig, check_outputs, resolve_runtime, run_stage
from .cache import open_cache
from .families import model_family, training_family
from .model import read_embedding
from .fsdp import gather_full, shard_model
from .objectives import denoising_loss
from .state import CheckpointManager

STAGE = "lora"
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUT_SUFFIXES = ("lora.safetensors", "embedding.safetensors", "lora.json")


@dataclass
class LoraResult:
    model: object  # the PEFT-wrapped diffusers FluxTransformer2DModel / SanaTransformer2DModel, trained weights
    lora_path: str | None
    embedding_path: str | None
    losses: list = field(default_factory=list)
    objective: str = ""


def add_lora(model, rank: int, alpha: float, seed: int):
    """Inject PEFT LoRA layers (fp32, seeded init: A kaiming-uniform, B zero) on the recipe's targets (the
    family's ``LORA_TARGET_REGEX``)."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise DCGenError(f"--rank/--alpha: expected a positive rank and alpha, found {rank} / {alpha}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                        target_modules=model_family(model).LORA_TARGET_REGEX)
    torch.manual_seed(seed)
    model.add_adapter(config)
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return config


def lora_layers(model) -> dict:
    """diffusers module path -> (down [r, in], up [out, r]) of every LoRA layer (the ``default`` adapter)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    if not out:
        raise DCGenError("LoRA: expected PEFT LoRA layers in the model, found none.")
    return out


def save_trained_lora(path: str, model, alpha: float, dtype: torch.dtype, embed: bool, metadata: dict,
                      layers: dict | None = None) -> str:
    """``layers``: the whole LoRA matrices as :func:`lora_layers` names them (default: read from ``model``; under
    FSDP the gathered ones)."""
    from ...shared.lora import save_lora

    layers = layers if layers is not None else lora_layers(model)
    # flatten(1): a LoRA on a 1x1 conv (SANA's feed-forward) is saved as the [r, in] / [out, r] matrices
    family = model_family(model)
    tensors = {family.LORA_KEY_PREFIX + m: (a.detach().to("cpu", dtype).flatten(1),
                                            b.detach().to("cpu", dtype).flatten(1)) for m, (a, b) in layers.items()}
    if embed:
        tensors.update({f"transformer.{k}": v for k, v in family.embedding_state_dict(model).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save_lora(path, tensors, alpha=alpha, metadata={k: str(v) for k, v in metadata.items()})


def train_lora(cache, base, embedding, out: str | None, *, rank: int = 256, alpha: float = 256.0,
               embed_in_lora: bool = False, save_dtype: str = "bfloat16", cfg: TrainConfig | None = None,
               name: str = "dcgen", on_step=None) -> LoraResult:
    """``base``: path or loaded frozen base FLUX; ``embedding``: aligned-embedding path or its four diffusers-named
    tensors. ``out`` None writes nothing."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    if save_dtype not in SAVE_DTYPES:
        raise DCGenError(f"--save-dtype: expected one of {', '.join(SAVE_DTYPES)}, found {save_dtype!r}.")
    if out:
        check_outputs([os.path.join(out, f"{name}-{suffix}") for suffix in OUTPUT_SUFFIXES],
                      {"aligned embedding": embedding, "base transformer": base})
    rt = resolve_runtime(cfg)
    cache = open_cache(cache)
    emb = read_embedding(embedding) if isinstance(embedding, str) else embedding
    channels = int(emb["x_embedder.weight"].shape[1])
    if cache.dcae_channels != channels:
        raise DCGenError(f"{embedding if isinstance(embedding, str) else 'embedding'}: expected an embedding for the "
                         f"cache's {cache.dcae_channels}-channel DC-AE latents, found one for {channels} channels.")
    family = training_family(base, cache, cfg.objective)
    model = base if isinstance(base, torch.nn.Module) else family.load_base_transformer(base, rt.dtype, rt.base_device)
    hidden = family.hidden_size(model)
    if int(emb["x_embedder.weight"].shape[0]) != hidden:
        raise DCGenError(f"embedding: expected hidden size {hidden} (this base), found "
                         f"{int(emb['x_embedder.weight'].shape[0])}: an embedding for another base model.")
    embedder, head = family.install_embedding(model, channels, emb, device=rt.device)
    add_lora(model, rank, alpha, cfg.seed)
    if rt.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    shard_model(model, rt, keep=(embedder, head))  # --sharding fsdp; the parameters below are then shards
    params = {"x_embedder.weight": embedder.weight, "x_embedder.bias": embedder.bias,
              "proj_out.weight": head.weight, "proj_out.bias": head.bias}
    for module, (down, up) in lora_layers(model).items():
        params[f"{module}.lora_A"] = down
        params[f"{module}.lora_B"] = up
    for p in params.values():
        p.requires_grad_(True)
    structure = {"kind": "lora", "channels": channels, "hidden": int(hidden), "rank": rank, "alpha": float(alpha),
                 "lora_modules": len(params) // 2 - 2, "ema": cfg.ema_decay > 0, "global_batch": rt.global_batch}
    checkpoints = CheckpointManager(out, structure, cfg.keep_checkpoints) if out else None
    resume = checkpoints.resolve(cfg.resume) if checkpoints else None
    loss_fn = denoising_loss(family.Denoiser(model, rt), cache, cfg, rt.device)
    stage = Stage(STAGE, params, loss_fn, 0, cfg.steps, cfg.lr, cfg.seed)
    run_stage(stage, cfg, cache, checkpoints, resume, on_step, rt=rt)
    for p in params.values():
        p.requires_grad_(False)
    result = LoraResult(model=model, lora_path=None, embedding_path=None, losses=stage.losses,
                        objective=loss_fn.objective)
    layers = gather_full(lora_layers(model), keep=rt.is_main) if out else None  # FSDP: every process gathers
    if out and rt.is_main:  # one writer: the main process
        meta = {"dcgen_stage": "lora", "latent_channels": channels, "rank": rank, "alpha": float(alpha),
                "steps": cfg.steps, "objective": loss_fn.objective, "base": getattr(model, "source", ""),
                "seed": cfg.seed, "ema_decay": cfg.ema_decay}
        result.lora_path = save_trained_lora(os.path.join(out, f"{name}-lora.safetensors"), model, alpha,
                                             SAVE_DTYPES[save_dtype], embed_in_lora, meta, layers)
        result.embedding_path = family.save_embedding(os.path.join(out, f"{name}-embedding.safetensors"), model, meta)
        with open(os.path.join(out, f"{name}-lora.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "config": cfg.to_dict(), "embed_in_lora": embed_in_lora, "save_dtype": save_dtype,
                       "losses": stage.losses}, f, indent=1)
    return result
