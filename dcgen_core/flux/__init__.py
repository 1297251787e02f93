"""FLUX.1 (dev / Krea-dev) and DC-Gen-FLUX: key maps (``keys.py``), the ComfyUI model and bf16 loader
(``comfy_model.py``), the DC-Gen latent space and embedding patch (``dcgen.py``), the registry entry
(``architecture.py``: recognising a FLUX MODEL, LoRA key map), 4-bit loaders (``four_bit.py`` NVFP4, ``svdquant.py``
nunchaku SVDQuant) and the NVFP4 quantizer (``quantize.py``)."""

from __future__ import annotations
