"""The authors' own video code (dc-ai-projects/DC-Gen ``dc_videogen``), the reference in the DC-AE-V and Wan parity
tests: vendored unmodified under tests/authors/dc_videogen (see tests/authors/README.md) and imported from there."""

from __future__ import annotations

import importlib
import os
import sys

AUTHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "authors")


def dc_videogen(module: str):
    """``dc_videogen.<module>`` from the vendored copy of the authors' code."""
    if AUTHORS not in sys.path:
        sys.path.insert(0, AUTHORS)
    return importlib.import_module(f"dc_videogen.{module}")
