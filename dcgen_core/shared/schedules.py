"""The official DC-Gen sampling schedule (flow matching, Euler, shifted sigmas).

Authors' pipeline: sigmas = linspace(1, 1/steps, steps), then shifted, then 0.
Two shift rules, chosen by the latent space the model was moved into:

* 1K models (DC-AE-f32c32): r = sqrt(tokens * C / 4096),
  sigma' = r*s / (1 + (r - 1)*s)                          ("dcgen-1k")
* 4K models (DC-AE-1.5-f64c128, and deeper): FLUX's resolution shift,
  mu linear in the token count between (256, 0.5) and (4096, 1.15),
  sigma' = e^mu / (e^mu + 1/s - 1)                        ("flux-resolution")

ComfyUI's "simple" scheduler samples the model's sigma table at
t = 1 - i/steps, which is exactly linspace(1, 1/steps, steps), so installing a
model-sampling object with this shift makes core KSampler reproduce the
official schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DCGenError

LINEAR = "dcgen-1k"
EXPONENTIAL = "flux-resolution"
#: The rules by what users call them: "flux2" (REFERENCE.md; the 1K models') and FLUX's resolution shift "mu".
RULES = {LINEAR: "flux2: r = sqrt(tokens * C / 4096) (1K models)",
         EXPONENTIAL: "mu: FLUX resolution shift, linear in tokens (4K models)"}

_BASE_TOKENS, _BASE_MU = 256, 0.5
_MAX_TOKENS, _MAX_MU = 4096, 1.15


@dataclass(frozen=True)
class TimeShift:
    rule: str
    value: float  # r for LINEAR, mu for EXPONENTIAL

    def apply(self, t):
        """Shift flow-matching time(s) t in (0, 1]."""
        if self.rule == LINEAR:
            r = self.value
            return r * t / (1 + (r - 1) * t)
        if self.rule == EXPONENTIAL:
            e = math.exp(self.value)
            return e / (e + (1 / t - 1))
        raise ValueError(f"unknown time-shift rule {self.rule!r}")

    def inverse(self, s):
        """The unshifted time of a shifted sigma s (inverse of ``apply``)."""
        if self.rule == LINEAR:
            r = self.value
            return s / (r - (r - 1) * s)
        if self.rule == EXPONENTIAL:
            e = math.exp(self.value)
            return 1 / (1 + e * (1 / s - 1))
        raise ValueError(f"unknown time-shift rule {self.rule!r}")

    def describe(self) -> str:
        name = "r" if self.rule == LINEAR else "mu"
        return f"{self.rule} ({name}={self.value:.4f})"


def rule_for_channels(latent_channels: int) -> str:
    """1K DC-Gen models live in f32c32 latents; 4K ones in f64c128."""
    return LINEAR if latent_channels <= 32 else EXPONENTIAL


def resolution_mu(tokens: int) -> float:
    m = (_MAX_MU - _BASE_MU) / (_MAX_TOKENS - _BASE_TOKENS)
    return tokens * m + (_BASE_MU - m * _BASE_TOKENS)


def official_shift(latent_height: int, latent_width: int, latent_channels: int, rule: str | None = None) -> TimeShift:
    """The authors' shift for a DC-AE latent grid of (C, h, w); one token per latent pixel."""
    tokens = latent_height * latent_width
    rule = rule or rule_for_channels(latent_channels)
    if rule == LINEAR:
        return TimeShift(LINEAR, math.sqrt(tokens * latent_channels / 4096))
    return TimeShift(EXPONENTIAL, resolution_mu(tokens))


def official_sigmas(steps: int, shift: TimeShift, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas of the official pipeline, with the trailing 0 (length steps + 1).

    ``denoise`` < 1 keeps the last ``steps`` of a longer schedule, as ComfyUI's
    KSampler does for img2img.
    """
    if steps < 1:
        raise ValueError(f"steps: expected at least 1, found {steps}")
    total = steps if denoise >= 1.0 else int(steps / max(denoise, 1e-4))
    t = torch.linspace(1.0, 1.0 / total, total, dtype=torch.float64)
    sigmas = torch.cat([shift.apply(t), torch.zeros(1, dtype=torch.float64)])
    return sigmas[-(steps + 1):].float()


def retarget_sigmas(sigmas: torch.Tensor, source: TimeShift, target: TimeShift) -> torch.Tensor:
    """Sigmas made with ``source``'s shift, re-made with ``target``'s (same unshifted times)."""
    s = sigmas.double()
    out = torch.where(s > 0, target.apply(source.inverse(s.clamp(min=1e-12))), torch.zeros_like(s))
    return out.to(sigmas.dtype)


def comfy_model_sampling(shift: TimeShift):
    """A ComfyUI model-sampling object (flow matching, timestep = sigma) with this shift."""
    import comfy.model_sampling as ms

    class DCGenModelSampling(ms.ModelSamplingFlux, ms.CONST):
        def __init__(self, time_shift: TimeShift):
            torch.nn.Module.__init__(self)
            self.time_shift = time_shift
            self.set_parameters()

        def set_parameters(self, shift=None, timesteps=10000):
            self.shift = self.time_shift.value
            ts = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)
            self.register_buffer("sigmas", ts)

        def sigma(self, timestep):
            return self.time_shift.apply(timestep)

        def percent_to_sigma(self, percent):
            if percent <= 0.0:
                return 1.0
            if percent >= 1.0:
                return 0.0
            return float(self.time_shift.apply(1.0 - percent))

    return DCGenModelSampling(shift)


FLOW_SCHEDULES = ("flow-match euler (diffusers)", "dpm-solver++ flow (diffusers)")


def flow_match_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`` (SANA's
    pipelines; a final 0 appended): the shifted sigma range of the 1000-step training table, spaced linearly and
    shifted again, in diffusers' dtypes (float32 table, float64 spacing, float32 result)."""
    import numpy as np

    if steps < 1:
        raise DCGenError(f"steps: expected at least 1, found {steps}.")
    if shift <= 0:
        raise DCGenError(f"shift: expected a positive flow shift (SANA: 3.0), found {shift}.")
    table = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    table = table / num_train_timesteps
    table = shift * table / (1 + (shift - 1) * table)
    t = np.linspace(float(table[0]) * num_train_timesteps, float(table[-1]) * num_train_timesteps, steps)
    s = t / num_train_timesteps
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])


def dpm_flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas of diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
    prediction_type="flow_prediction").set_timesteps(steps)`` (SANA's default scheduler; its final sigma 0 included,
    length steps + 1): t = 1 - linspace(1, 1/num_train_timesteps, steps + 1), shifted, reversed, the last (t = 0)
    dropped, then 0 appended; float64 numpy arithmetic, float32 result, as diffusers does.

    The first sigma is shift(1 - 1/num_train_timesteps) (0.99967 for shift 3), not 1; ComfyUI's flow noise scaling
    therefore starts from that sigma times the noise, where diffusers' pipelines start from the noise itself.
    """
    import numpy as np

    if steps < 1:
        raise DCGenError(f"steps: expected at least 1, found {steps}.")
    if shift <= 0:
        raise DCGenError(f"shift: expected a positive flow shift (SANA: 3.0), found {shift}.")
    t = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
    s = np.flip(shift * t / (1 + (shift - 1) * t))[:-1].copy()
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


_FLOW_SCHEDULE_FUNCTIONS = {FLOW_SCHEDULES[0]: flow_match_sigmas, FLOW_SCHEDULES[1]: dpm_flow_sigmas}


def flow_schedule_sigmas(schedule: str, steps: int, shift: float) -> torch.Tensor:
    """The sigmas of one of ``FLOW_SCHEDULES`` (with the final 0)."""
    try:
        make = _FLOW_SCHEDULE_FUNCTIONS[schedule]
    except KeyError:
        raise DCGenError(f"schedule: expected one of {', '.join(FLOW_SCHEDULES)}, found {schedule!r}.") from None
    return make(steps, shift)
