"""diffusers' UniPCMultistepScheduler on flow sigmas (Wan2.1's and DC-Gen-Wan's shipped scheduler) as a ComfyUI
sampler, and its sigmas.

The scheduler config Wan pipelines ship: ``use_flow_sigmas``, ``prediction_type="flow_prediction"``,
``solver_order=2``, ``solver_type="bh2"``, ``predict_x0``, ``lower_order_final``, ``final_sigmas_type="zero"``,
``flow_shift`` (5.0 at 720p). :func:`unipc_flow_sigmas` gives its sigmas: ``linspace(1, 1/1000, steps + 1)[:-1]``,
shifted, the first lowered by 1e-6, a final 0. :func:`sample_unipc_flow` is its predictor-corrector (UniP-2 /
UniC with B(h) = e^h - 1 on the flow log-SNR ``log((1 - sigma) / sigma)``), first order on the first and last
steps. As for SANA's DPM-Solver (:mod:`.dpm_flow`), the model sees diffusers' integer timesteps
``int(1000 sigma)`` and text-to-video starts from the noise itself, not ``sigma0 * noise``.
"""

from __future__ import annotations

import math

import torch

from .dpm_flow import check_flow, text_to_image_start, with_integer_timesteps
from .errors import DCGenError

NUM_TRAIN_TIMESTEPS = 1000


def unipc_flow_sigmas(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)``'s sigmas (+ 0)."""
    import numpy as np

    if steps < 1:
        raise DCGenError(f"steps: expected at least 1, found {steps}.")
    if shift <= 0:
        raise DCGenError(f"shift: expected a positive flow shift (DC-Gen-Wan / Wan2.1 720p: 5.0), found {shift}.")
    s = np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


def _lam(sigma: float) -> float:
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _coefficients(h: float, rks: list[float], order: int):
    """diffusers' R (powers of rk) and b for B(h) = expm1(-h) (bh2, predict_x0)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0
    b_h = math.expm1(hh)
    fact, big_r, b = 1, [], []
    for i in range(1, order + 1):
        big_r.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact if math.isfinite(hh) else -1 / fact
    return h_phi_1, b_h, big_r, b


def _predict(x, sigmas, i, outputs, order):
    """UniP: from sigmas[i] to sigmas[i + 1] with the last ``order`` converted outputs (x0 predictions)."""
    s0, t = float(sigmas[i]), float(sigmas[i + 1])
    m0 = outputs[-1]
    lam_s0 = _lam(s0)
    h = _lam(t) - lam_s0
    alpha_t = 1.0 - t
    h_phi_1, b_h, _, _ = _coefficients(h, [1.0], 1)
    x_t = (t / s0) * x - alpha_t * h_phi_1 * m0
    if order == 2:
        rk = (_lam(float(sigmas[i - 1])) - lam_s0) / h
        d1 = (outputs[-2] - m0) / rk
        x_t = x_t - alpha_t * b_h * 0.5 * d1
    return x_t


def _correct(x_last, x_this, model_t, sigmas, i, outputs, order):
    """UniC at sigmas[i] (the step just taken from sigmas[i - 1]) with the new model output ``model_t``."""
    s0, t = float(sigmas[i - 1]), float(sigmas[i])
    m0 = outputs[-1]
    lam_s0 = _lam(s0)
    h = _lam(t) - lam_s0
    alpha_t = 1.0 - t
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lam(float(sigmas[i - 1 - k])) - lam_s0) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    h_phi_1, b_h, big_r, b = _coefficients(h, rks, order)
    if order == 1:
        rhos = [0.5]
    else:
        rhos = torch.linalg.solve(torch.tensor(big_r, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        rhos = rhos.tolist()
    x_t = (t / s0) * x_last - alpha_t * h_phi_1 * m0
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - alpha_t * b_h * (corr + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc_flow(model, x, sigmas, extra_args=None, callback=None, disable=None,
                      num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2):
    """UniPCMultistepScheduler (bh2, predict_x0, solver_order 2, lower_order_final, final sigma 0) on flow sigmas
    as the Wan pipelines run it, as a KSAMPLER function (see the module docstring)."""
    from tqdm.auto import trange

    check_flow(model, sigmas)
    extra_args = dict(extra_args or {})
    extra_args["model_options"] = with_integer_timesteps(extra_args.get("model_options"), num_train_timesteps)
    x = text_to_image_start(model, x)
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    outputs: list = []
    lower_order_nums, this_order, last_sample = 0, 1, None
    for i in trange(steps, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if i > 0 and last_sample is not None:
            x = _correct(last_sample, x, denoised, sigmas, i, outputs, this_order)
        outputs = (outputs + [denoised])[-solver_order:]
        this_order = min(solver_order, steps - i, lower_order_nums + 1)
        last_sample = x
        x = _predict(x, sigmas, i, outputs, this_order)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
    return x


def unipc_flow_sampler():
    """A core SAMPLER (comfy.samplers.KSAMPLER) running :func:`sample_unipc_flow`."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_unipc_flow)
