"""The code every model family shares: errors, checkpoint files and key prefixes, the DC-AE (``dcae/``) and the
DC-AE latent space of a DC-Gen model, aligned embeddings, LoRA files, schedules, the DC-Gen sampler, model folders,
ComfyUI version differences, the 4-bit formats (``quant/``) and the ``Architecture`` a family registers.

Imports nothing of the pack above it (families, tools, nodes): see ARCHITECTURE.md.
"""

from __future__ import annotations
