"""The release's FlowMatchEulerDiscreteScheduler config (``scheduler/scheduler_config.json``), as the authors'
pipeline reads it: diffusers fills the keys a file leaves out with the scheduler's defaults, and the pipeline's
calculate_shift takes base/max_image_seq_len and base/max_shift from that config. Options that change the schedule
in ways the pack does not reproduce (karras / exponential / beta sigmas, inverted sigmas, stochastic sampling) are
refused rather than ignored."""

from __future__ import annotations

import logging

from ..shared.errors import DCGenError
from ..shared.scheduler_config import config_number, read_scheduler_config
from .dcgen import SCHEDULER

#: FlowMatchEulerDiscreteScheduler.__init__ defaults (diffusers 0.42) for the keys the schedule uses
DIFFUSERS_DEFAULTS = {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift_terminal": None,
                      "time_shift_type": "exponential"}
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")
_CLASS = "FlowMatchEulerDiscreteScheduler"


def scheduler_from_config(config: dict, file: str) -> dict:
    """The schedule's keys of a FlowMatchEulerDiscreteScheduler config, diffusers' defaults filled in, checked."""
    name = config.get("_class_name", _CLASS)
    if name != _CLASS:
        raise DCGenError(f"{file}: expected a {_CLASS} config (the authors' pipeline's scheduler), found {name!r}.")
    on = [k for k in _UNSUPPORTED if config.get(k)]
    if on:
        raise DCGenError(f"{file}: expected {', '.join(on)} false (the authors' schedule), found true; this loader "
                         "does not reproduce that schedule.")
    out = {}
    for key in ("shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "shift_terminal"):
        out[key] = config_number(config, key, file, DIFFUSERS_DEFAULTS[key], positive=key == "shift")
    for key in ("base_image_seq_len", "max_image_seq_len"):
        out[key] = int(out[key])
    if out["max_image_seq_len"] == out["base_image_seq_len"]:
        raise DCGenError(f"{file}: expected max_image_seq_len to differ from base_image_seq_len, found both "
                         f"{out['base_image_seq_len']}.")
    if not out["shift_terminal"]:
        out["shift_terminal"] = None  # 0 or null: no stretch (diffusers tests it for truth)
    elif not 0 < out["shift_terminal"] < 1:
        raise DCGenError(f"{file}: expected shift_terminal in (0, 1) or null, found {out['shift_terminal']}.")
    out["use_dynamic_shifting"] = bool(config.get("use_dynamic_shifting", DIFFUSERS_DEFAULTS["use_dynamic_shifting"]))
    out["time_shift_type"] = config.get("time_shift_type", DIFFUSERS_DEFAULTS["time_shift_type"])
    if out["time_shift_type"] not in ("exponential", "linear"):
        raise DCGenError(f"{file}: expected time_shift_type 'exponential' or 'linear', found "
                         f"{out['time_shift_type']!r}.")
    return out


def release_scheduler(path: str) -> tuple[dict, str]:
    """(schedule config, where it came from) for the release at ``path`` (pipeline folder, transformer folder or
    file): its scheduler/scheduler_config.json, else Qwen-Image-Edit's values."""
    config, file = read_scheduler_config(path)
    if config is None:
        logging.info("%s: no scheduler/scheduler_config.json beside it; Qwen-Image-Edit's schedule values %s.", path,
                     SCHEDULER)
        return dict(SCHEDULER), "Qwen-Image-Edit's values, no scheduler config found"
    scheduler = scheduler_from_config(config, file)
    logging.info("%s: schedule from %s: %s.", path, file, scheduler)
    return scheduler, file
