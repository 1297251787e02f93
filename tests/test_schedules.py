"""The official DC-Gen schedule against diffusers' FlowMatchEulerDiscreteScheduler (torch only)."""

import math

import pytest
import torch

from dcgen_core.shared.schedules import (EXPONENTIAL, LINEAR, TimeShift, official_shift, official_sigmas,
                                         retarget_sigmas, rule_for_channels)

diffusers = pytest.importorskip("diffusers")


def _diffusers_sigmas(steps, rule, value):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = torch.linspace(1.0, 1.0 / steps, steps).numpy()
    if rule == LINEAR:
        s = FlowMatchEulerDiscreteScheduler(shift=value, use_dynamic_shifting=False)
        s.set_timesteps(sigmas=base)
    else:
        s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        s.set_timesteps(sigmas=base, mu=value)
    return s.sigmas.float()


@pytest.mark.parametrize("h,w,c", [(32, 32, 32), (24, 40, 32), (64, 64, 128), (32, 48, 128), (16, 16, 128)])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_official_sigmas_equal_diffusers(h, w, c, steps):
    shift = official_shift(h, w, c)
    ours = official_sigmas(steps, shift)
    theirs = _diffusers_sigmas(steps, shift.rule, shift.value)
    assert ours.shape == theirs.shape == (steps + 1,)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_rules_and_values_from_reference():
    assert rule_for_channels(32) == LINEAR and rule_for_channels(128) == EXPONENTIAL
    assert official_shift(32, 32, 32).value == pytest.approx(math.sqrt(8))  # 1024^2 with f32c32
    assert official_shift(64, 64, 128).value == pytest.approx(1.15)  # 4096^2 with f64c128: 4096 tokens
    assert official_shift(16, 16, 128).value == pytest.approx(0.5)  # 256 tokens


@pytest.mark.parametrize("shift", [TimeShift(LINEAR, 2.0), TimeShift(EXPONENTIAL, 0.8)])
def test_inverse_and_retarget(shift):
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert torch.allclose(shift.inverse(shift.apply(t)), t, atol=1e-12)
    other = official_shift(20, 30, 32 if shift.rule == LINEAR else 128)
    sig = official_sigmas(8, shift)
    assert torch.allclose(retarget_sigmas(sig, shift, other), official_sigmas(8, other), atol=1e-6)


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    shift = official_shift(32, 32, 32)
    assert torch.allclose(official_sigmas(5, shift, denoise=0.5), official_sigmas(10, shift)[-6:])
