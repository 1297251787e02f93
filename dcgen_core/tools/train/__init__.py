"""DC-Gen post-training for FLUX: ``python -m dcgen_core.train prepare | align | lora``.

* :func:`prepare` (data.py): image folder with captions -> latent cache (base-VAE and DC-AE latents, text
  embeddings) in safetensors shards + ``index.json``.
* :func:`align` (alignment.py): fit the new 1x1 embedder to the frozen base embedder's tokens, then train the head
  with the flow-matching objective; writes an aligned-embedding file.
* :func:`train_lora` (finetune.py): PEFT LoRA on the recipe's targets with the embedder/head trained fully and
  the guidance-distilled objective for guidance-distilled bases; writes a LoRA and the embedding.

The training code runs on diffusers' ``FluxTransformer2DModel`` (model.py) or ``SanaTransformer2DModel``
(sana_model.py; the base transformer decides, families.py) + PEFT; torch, diffusers and peft are imported by
this package only (the node pack never imports it). Checkpoints are safetensors + JSON (see state.py).
"""

from __future__ import annotations

_EXPORTS = {
    "prepare": "data", "write_cache": "cache", "LatentCache": "cache", "MemoryCache": "cache",
    "align": "alignment", "solve_alignment": "alignment", "AlignResult": "alignment",
    "train_lora": "finetune", "LoraResult": "finetune",
    "TrainConfig": "common",
    "flow_matching_loss": "objectives", "guidance_distilled_loss": "objectives", "alignment_loss": "objectives",
    "load_base_transformer": "model", "LORA_TARGET_REGEX": "model",
}

__all__ = list(_EXPORTS)


def __getattr__(name):  # lazy: `python -m dcgen_core.train --help` imports neither diffusers nor peft
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
