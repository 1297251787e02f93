"""DC-Gen core. Layers (ARCHITECTURE.md; tests/test_architecture.py checks them):

* ``shared/``: what every model family uses (DC-AE and its latent space, checkpoints, LoRA files, aligned embeddings,
  schedules, the 4-bit formats in ``shared/quant/``).
* ``flux/``, ``sana/``: one package per model family (key maps, ComfyUI model and loader, DC-Gen embedding patch,
  ``architecture.py``), registered in ``architectures.py``.
* ``tools/``: command-line tools (doctor, smoke, headless, extract, quantize, train); ``quantize.py``, ``extract.py``,
  ``train.py``, ``doctor.py`` and ``headless.py`` here are their ``python -m dcgen_core.<tool>`` entry points.

Importable with torch alone; the modules that touch ComfyUI import it inside their functions.
"""

from __future__ import annotations
