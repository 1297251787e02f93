"""The scheduler config a diffusers release ships beside its transformer.

A diffusers pipeline folder holds ``transformer/`` and ``scheduler/scheduler_config.json``; the loaders are given
the pipeline folder, its transformer folder or a file in that folder, so the config is looked for in the folder
given (or holding the file) and in the folder above it. Families read their own fields (SANA and Wan a flow shift,
Qwen-Image the dynamic-shift parameters).
"""

from __future__ import annotations

import os

from .checkpoints import read_json
from .errors import DCGenError

SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


def find_scheduler_config(path: str) -> str | None:
    """``scheduler/scheduler_config.json`` of the pipeline ``path`` belongs to, or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for base in (folder, os.path.dirname(os.path.normpath(folder))):
        candidate = os.path.join(base, SCHEDULER_CONFIG)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_scheduler_config(path: str) -> tuple[dict | None, str | None]:
    """(the scheduler config, its file) of the pipeline ``path`` belongs to; (None, None) when there is none."""
    file = find_scheduler_config(path)
    if file is None:
        return None, None
    config = read_json(file, "a diffusers scheduler config")
    if not isinstance(config, dict):
        raise DCGenError(f"{file}: expected a diffusers scheduler config (a JSON object), found a JSON "
                         f"{type(config).__name__}.")
    return config, file


def config_number(config: dict, key: str, file: str, default=None, positive: bool = False):
    """``config[key]`` as a float (``default`` when absent or null); a clear error when it is not a number."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise DCGenError(f"{file}: expected {key} to be a {'positive ' if positive else ''}number, found "
                         f"{value!r}.")
    return float(value)
