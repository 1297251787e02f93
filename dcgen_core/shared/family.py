"""What a model family gives the shared nodes: its :class:`Architecture` (``<family>/architecture.py``), listed in
the registry (dcgen_core/architectures.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Architecture:
    name: str
    matches: Callable  # (ComfyUI diffusion model) -> True when it is this family's transformer
    apply_aligned_embedding: Callable  # (model, AlignedEmbedding, vae=None, clone=True) -> model
    lora_key_map: Callable  # (model, model weight keys) -> {LoRA module name: ComfyUI patch key}
    lora_example: str  # module names a LoRA for this family has, for messages
    expected: str  # "a FLUX model (...)": what a node that takes any family asks for, for messages
