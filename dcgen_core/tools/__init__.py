"""Command-line tools and the library code behind them: the headless runner (``headless.py``), what a workflow needs
(``workflows.py``), the doctor and its smoke run (``doctor.py``, ``smoke.py``), adapter extraction (``extract.py``),
the NVFP4 quantizer CLI (``quantize.py``) and post-training (``train/``). The node pack never imports them; the
``python -m dcgen_core.<tool>`` entry points are thin modules in dcgen_core/."""

from __future__ import annotations
