"""diffusers' DPMSolverMultistepScheduler on flow sigmas (SANA's official scheduler) as a ComfyUI sampler.

SANA's pipelines (diffusers ``SanaPipeline``, and NVlabs' own DPM-Solver++ flow sampler) differ from core ComfyUI
samplers on the same sigmas in two model inputs, not in the solver:

* the transformer sees the scheduler's integer timesteps ``int(1000 * sigma)`` (diffusers:
  ``timesteps = (sigmas * num_train_timesteps).astype(int64)``), while ComfyUI feeds ``1000 * sigma``;
* text-to-image starts from the noise itself (the scheduler's ``init_noise_sigma`` is 1), while ComfyUI's flow
  noise scaling starts from ``sigma0 * noise`` (sigma0 = 0.99967 for SANA's schedule).

:func:`sample_dpmpp_2m_flow` is a k-diffusion style sampler function for ``comfy.samplers.KSAMPLER`` that does both,
with diffusers' DPM-Solver++ (order 2, midpoint or heun) update on ``alpha = 1 - sigma``: first-order first step
and, to a final sigma 0, first-order last step (diffusers' ``lower_order_final`` / ``final_sigmas_type="zero"``).

The integer timestep reaches the model through a ComfyUI APPLY_MODEL wrapper added to the model options of this
sampling only: the model runs at sigma_q = floor(1000 sigma) / 1000 (so a model whose timestep is 1000 sigma, like
SANA, sees the integer) and its flow velocity v = (x - denoised_q) / sigma_q is returned as the denoised of the
true sigma, x - sigma v. Guidance, inpainting masks, previews and the solver all see the true sigmas.
"""

from __future__ import annotations

import math

import torch

from .errors import DCGenError

NUM_TRAIN_TIMESTEPS = 1000
SOLVER_TYPES = ("midpoint", "heun")
WRAPPER_KEY = "dcgen_diffusers_integer_timesteps"


def diffusers_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The integer timesteps diffusers' flow DPM-Solver feeds the model for these sigmas: int(N * sigma).

    diffusers truncates its float64 sigmas; SIGMAS are float32, so where N * sigma lies within about 3e-5 of an
    integer the two can differ by one on that step (at shift 3 first at 333 steps; at shift 1 at 3, 6, 9, ... steps).
    """
    return torch.floor(sigmas.detach().to("cpu", torch.float64) * num_train_timesteps).to(torch.int64)


def _quantized_sigma(sigma: torch.Tensor, num_train_timesteps: int):
    """(sigma_q, ratio sigma / sigma_q) per batch entry; below timestep 1 the model keeps its sigma (ratio 1)."""
    s = sigma.detach().to("cpu", torch.float64)
    q = diffusers_timesteps(s, num_train_timesteps).to(torch.float64) / num_train_timesteps
    keep = q <= 0
    q = torch.where(keep, s, q)
    return q.to(sigma.dtype), torch.where(keep, torch.ones_like(s), s / q)


def integer_timestep_wrapper(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """An APPLY_MODEL wrapper: the model evaluated at diffusers' integer timestep, denoised for the true sigma."""

    def wrapper(executor, x, t, *args, **kwargs):
        sigma_q, ratio = _quantized_sigma(t, num_train_timesteps)
        if bool((ratio == 1).all()):
            return executor(x, t, *args, **kwargs)
        denoised_q = executor(x, sigma_q.to(t.device), *args, **kwargs)
        ratio = ratio.to(device=denoised_q.device, dtype=denoised_q.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return x + ratio * (denoised_q - x)  # flow: x - sigma * v, with v = (x - denoised_q) / sigma_q

    return wrapper


def with_integer_timesteps(model_options: dict, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> dict:
    """A copy of ``model_options`` whose model evaluations use diffusers' integer timesteps."""
    import comfy.model_patcher
    import comfy.patcher_extension as pe

    options = comfy.model_patcher.create_model_options_clone(model_options or {})
    pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, integer_timestep_wrapper(num_train_timesteps),
                            options, is_model_options=True)
    return options


def _model_sampling(model):
    """The model sampling of the model a KSAMPLER function receives (KSamplerX0Inpaint -> guider -> BaseModel)."""
    guider = getattr(model, "inner_model", None)
    return getattr(getattr(guider, "inner_model", None), "model_sampling", None)


def check_flow(model, sigmas: torch.Tensor):
    import comfy.model_sampling

    sampling = _model_sampling(model)
    if sampling is not None and not isinstance(sampling, comfy.model_sampling.CONST):
        raise DCGenError(f"DC-Gen DPM++ Flow: expected a flow-matching model (SANA, DC-Gen, FLUX, SD3), found "
                         f"{type(sampling).__name__} sampling; use a core sampler for this model.")
    s = sigmas.detach().to("cpu", torch.float64)
    if s.numel() and (float(s.max()) > 1.0 or float(s.min()) < 0.0):
        raise DCGenError(f"DC-Gen DPM++ Flow: expected flow sigmas in [0, 1] (DC-Gen Flow Sigmas), found "
                         f"{float(s.min()):.4g} .. {float(s.max()):.4g}.")
    if s.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise DCGenError(f"DC-Gen DPM++ Flow: expected strictly decreasing sigmas (DC-Gen Flow Sigmas), found "
                         f"{[round(v, 4) for v in s.tolist()]}.")


def text_to_image_start(model, x: torch.Tensor) -> torch.Tensor:
    """diffusers' text-to-image start: the noise itself when the latent is empty (all zeros); otherwise ComfyUI's
    start (sigma0 * noise + (1 - sigma0) * latent, which is diffusers' img2img ``add_noise``)."""
    noise, latent = getattr(model, "noise", None), getattr(model, "latent_image", None)
    if noise is None or latent is None or noise.shape != x.shape or bool(latent.any()):
        return x
    return noise.to(device=x.device, dtype=x.dtype)


def _lambda(sigma: float) -> float:
    """Flow log-SNR log((1 - sigma) / sigma)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


@torch.no_grad()
def sample_dpmpp_2m_flow(model, x, sigmas, extra_args=None, callback=None, disable=None, solver_type="midpoint",
                         num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """DPMSolverMultistepScheduler(use_flow_sigmas, algorithm_type="dpmsolver++", solver_order=2, solver_type,
    final_sigmas_type="zero") as SanaPipeline runs it, as a KSAMPLER function (see the module docstring)."""
    from tqdm.auto import trange

    if solver_type not in SOLVER_TYPES:
        raise DCGenError(f"solver_type: expected one of {', '.join(SOLVER_TYPES)}, found {solver_type!r}.")
    check_flow(model, sigmas)
    extra_args = dict(extra_args or {})
    extra_args["model_options"] = with_integer_timesteps(extra_args.get("model_options"), num_train_timesteps)
    x = text_to_image_start(model, x)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_next == 0.0:  # first order to sigma 0 lands on the prediction (diffusers' lower_order_final)
            x = denoised
            old_denoised = None
            continue
        lam_s, lam_t = _lambda(sigma), _lambda(sigma_next)
        h = lam_t - lam_s
        alpha_t = 1.0 - sigma_next
        phi = math.expm1(-h)  # exp(-h) - 1
        x_new = (sigma_next / sigma) * x - (alpha_t * phi) * denoised
        if old_denoised is not None:
            d1 = (h / h_last) * (denoised - old_denoised)  # (m0 - m1) / r0, r0 = h_0 / h
            if solver_type == "midpoint":
                x_new = x_new - (0.5 * alpha_t * phi) * d1
            else:
                x_new = x_new + (alpha_t * (phi / h + 1.0)) * d1
        x, old_denoised, h_last = x_new, denoised, h
    return x


def dpm_flow_sampler(solver_type: str = "midpoint"):
    """A core SAMPLER (comfy.samplers.KSAMPLER) running :func:`sample_dpmpp_2m_flow`."""
    import comfy.samplers

    if solver_type not in SOLVER_TYPES:
        raise DCGenError(f"solver_type: expected one of {', '.join(SOLVER_TYPES)}, found {solver_type!r}.")
    return comfy.samplers.KSAMPLER(sample_dpmpp_2m_flow, extra_options={"solver_type": solver_type})
