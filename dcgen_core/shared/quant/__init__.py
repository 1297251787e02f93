"""4-bit weights: ComfyUI's NVFP4 format (``nvfp4.py``), its quantizer (``quantize.py``) and the ComfyUI operations
that run NVFP4 layers and LoRAs on them (``ops.py``); nunchaku's SVDQuant format (``svdquant/``). Part of the shared
layer: family-agnostic, any family's loader may use them."""

from __future__ import annotations
