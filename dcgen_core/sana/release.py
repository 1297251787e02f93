"""What a SANA release tells beside its weights: the flow shift, and whether the resolution is known.

Flow shift. SANA's diffusers pipelines ship ``scheduler/scheduler_config.json`` (DPMSolverMultistepScheduler
``flow_shift``, or FlowMatchEulerDiscreteScheduler ``shift``). Without one the shift follows diffusers'
``scripts/convert_sana_to_diffusers.py``, which builds every SANA pipeline from NVlabs' checkpoints: flow shift 6.0
for 4096 px models, 3.0 for 512 px, 1K and 2K; its ``sample_size`` is image size / 32 (the DC-AE f32 grid).

Resolution. SANA 2K / 4K add a sin-cos position embedding (``interpolation_scale`` 1.0 / 2.0, ``sample_size`` 64 /
128). diffusers keeps it in a non-persistent buffer, so a diffusers-layout file holds the same tensors at 1K and 4K:
only its config.json tells. The original NVlabs files keep the buffer (read in keys.py).
"""

from __future__ import annotations

import logging
import os
import re

from ..shared.errors import DCGenError
from ..shared.latent_space import SPATIAL_COMPRESSION
from ..shared.scheduler_config import config_number, read_scheduler_config
from .model import SanaConfig

#: diffusers' converter: flow shift 6.0 at 4096 px, else 3.0
SANA_FLOW_SHIFT = 3.0
SANA_4K_FLOW_SHIFT = 6.0
_4K_SIDE = 4096

# "4K", "4Kpx", "2048", "2048px" as a word of a file or folder name (Sana_1600M_4Kpx_BF16_diffusers)
_RESOLUTION_IN_NAME = re.compile(r"(?i)(?:^|[^0-9a-z])(2k|4k|2048|4096)(?:px)?(?:[^0-9a-z]|$)")


def image_side(cfg: SanaConfig) -> int:
    """The image side the model was made for: sample_size latent pixels of its DC-AE (f32 for SANA)."""
    return cfg.sample_size * SPATIAL_COMPRESSION.get(cfg.in_channels, 32)


def sana_flow_shift(path: str, cfg: SanaConfig) -> tuple[float, str, str | None]:
    """(flow shift, why, the scheduler config file it came from or None) for the SANA at ``path``: the release's
    scheduler config, else by the model's sample size."""
    config, file = read_scheduler_config(path)
    missing = ""
    if config is not None:
        euler = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
        key = "shift" if euler else "flow_shift"
        if euler and config.get("use_dynamic_shifting"):
            raise DCGenError(f"{file}: expected a static flow shift for SANA (use_dynamic_shifting false), found "
                             "use_dynamic_shifting true, which no SANA pipeline uses and this loader does not follow.")
        shift = config_number(config, key, file, positive=True)
        if shift is not None:
            reason = f"{key} of {file}"
            logging.info("%s: flow shift %s (%s).", path, shift, reason)
            return shift, reason, file
        missing = f"{file} has no {key}; "
    side = image_side(cfg)
    shift = SANA_4K_FLOW_SHIFT if side >= _4K_SIDE else SANA_FLOW_SHIFT
    reason = (f"{missing}no scheduler config read: sample size {cfg.sample_size} = {side} px, diffusers' SANA "
              f"converter uses {shift} there")
    logging.info("%s: flow shift %s (%s).", path, shift, reason)
    return shift, reason, None


def resolution_signals(path: str, scheduler_shift: float | None) -> list[str]:
    """Hints that a SANA file without config.json is a 2K / 4K model: its (folder) name, a 4K scheduler shift."""
    signals = []
    folder = os.path.dirname(os.path.abspath(path))
    for name in (os.path.splitext(os.path.basename(path))[0], os.path.basename(folder),
                 os.path.basename(os.path.dirname(folder))):
        m = _RESOLUTION_IN_NAME.search(name)
        if m:
            signals.append(f"the name '{name}' says {m.group(1)}")
            break
    if scheduler_shift is not None and scheduler_shift >= SANA_4K_FLOW_SHIFT:
        signals.append(f"its scheduler config's flow shift {scheduler_shift} is the 4K models' one")
    return signals


def check_resolution_known(path: str, cfg: SanaConfig, scheduler_shift: float | None):
    """A diffusers-layout SANA without config.json loads as 512 px / 1K (no position embedding, as diffusers' default
    config); refused when anything says it is a 2K / 4K model, which would then sample wrong images silently."""
    signals = resolution_signals(path, scheduler_shift)
    if signals:
        raise DCGenError(
            f"{path}: expected the transformer's config.json (sample_size, interpolation_scale) beside this "
            f"diffusers-layout SANA, found none, and {' and '.join(signals)}. SANA 2K / 4K use a position embedding "
            "that diffusers does not store in the weights: without the config the file would load as a 1K model "
            "without it. Put the release's transformer/config.json beside the file, or load the diffusers folder.")
    logging.warning("%s: no config.json beside this diffusers-layout SANA; loaded as a 512 px / 1K model (sample size "
                    "%d, no position embedding). A SANA 2K / 4K file needs its config.json (sample_size, "
                    "interpolation_scale) beside it.", path, cfg.sample_size)
