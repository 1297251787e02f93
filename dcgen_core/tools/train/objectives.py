"""The DC-Gen training objectives as plain functions of tensors (and a denoiser callable).

* Flow matching: x_t = s * eps + (1 - s) * x0, target v* = eps - x0, s = the DC-Gen shift of a logit-normal t.
* Guidance-distilled (FLUX.1-dev/Krea bases): w ~ U[w_min, w_max]; v_w = F(x_t, s, c, guidance=w) with grad,
  v_u = F(x_t, s, null text, guidance=1) without; v_hat = (v_w - (1 - w) v_u) / w; loss = mean |v_hat - v*|^2.
* Embedding alignment: MSE between the frozen base embedder's tokens and the new embedder's after matching the
  token grids (bilinear upsampling of the student, average-pooling of the teacher, global means, or their sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...shared.errors import DCGenError
from ...shared.schedules import TimeShift, official_shift

ALIGN_MODES = ("upsample", "pool", "mean", "sum")


def shift_for_latent(x0: torch.Tensor) -> TimeShift:
    """The DC-Gen inference shift for a (B, C, h, w) DC-AE latent (rule chosen by C, as the pipelines do)."""
    _, c, h, w = x0.shape
    return official_shift(h, w, c)


def sample_sigmas(batch: int, generator: torch.Generator, shift: TimeShift, mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Logit-normal times t = sigmoid(N(mean, std)), shifted with the inference rule: sigma in (0, 1)."""
    t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, dtype=torch.float64))
    return shift.apply(t).clamp(1e-6, 1 - 1e-6).float()


def noisy_sample(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v*) of flow matching: x_t = s * eps + (1 - s) * x0, v* = eps - x0."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return s * eps + (1 - s) * x0, eps - x0


def flow_matching_loss(denoiser, x_t, sigma, context, pooled, v_target, guidance=None) -> torch.Tensor:
    """mean |F(x_t, sigma, text) - v*|^2; ``pooled``: the second text input (SANA: the caption's attention mask)."""
    v = denoiser(x_t, sigma, context, pooled, guidance)
    return F.mse_loss(v.float(), v_target.float())


def guidance_distilled_loss(denoiser, x_t, sigma, context, pooled, null_context, null_pooled, w, v_target):
    """mean |v_hat - v*|^2 with v_hat = (v_w - (1 - w) v_u) / w: the conditional velocity implied by a
    guidance-distilled model's output at guidance w and its unconditional output (null text, guidance 1)."""
    b = x_t.shape[0]
    v_w = denoiser(x_t, sigma, context, pooled, w)
    with torch.no_grad():
        v_u = denoiser(x_t, sigma, null_context.expand(b, *null_context.shape[1:]),
                       null_pooled.expand(b, *null_pooled.shape[1:]), torch.ones_like(w))
    wv = w.view(-1, *([1] * (x_t.ndim - 1))).to(v_w)
    v_hat = (v_w - (1 - wv) * v_u.detach()) / wv
    return F.mse_loss(v_hat.float(), v_target.float())


def sample_guidance(batch: int, generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator)


def matched_pairs(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) tensors to compare for the grid-matching ``mode``; grids are (B, hidden, h, w)."""
    if mode not in ALIGN_MODES:
        raise DCGenError(f"--mode: expected one of {', '.join(ALIGN_MODES)}, found {mode!r}.")
    pairs = []
    if mode in ("upsample", "sum"):
        up = student if student.shape[-2:] == teacher.shape[-2:] else \
            F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        pairs.append((up, teacher))
    if mode in ("pool", "sum"):
        pairs.append((student, F.adaptive_avg_pool2d(teacher, student.shape[-2:])))
    if mode in ("mean", "sum"):
        pairs.append((student.mean(dim=(2, 3)), teacher.mean(dim=(2, 3))))
    return pairs


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, mode: str = "upsample") -> torch.Tensor:
    """MSE after grid matching (summed over the comparisons of ``sum``)."""
    return sum(F.mse_loss(a.float(), b.float()) for a, b in matched_pairs(student, teacher, mode))


def alignment_regression(latent: torch.Tensor, teacher: torch.Tensor, mode: str):
    """The alignment loss is linear least squares in the embedder (grid matching is linear and keeps constants):
    for each comparison, rows X (DC-AE channels, grid-matched) and targets Y (teacher tokens), weighted by
    1 / (rows per image) so that the normal equations minimise the same mean squared error."""
    out = []
    for a, b in matched_pairs(latent, teacher, mode):
        if a.ndim == 4:
            x = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
            y = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1])
            per_image = a.shape[2] * a.shape[3]
        else:
            x, y, per_image = a, b, 1
        out.append((x, y, 1.0 / per_image))
    return out


def resolve_objective(objective: str, guidance_embeds: bool) -> str:
    """``auto``: the guidance-distilled objective for a base with a guidance embedding (FLUX.1-dev / Krea-dev),
    plain flow matching otherwise."""
    if objective == "auto":
        return "guidance-distilled" if guidance_embeds else "flow"
    if objective == "guidance-distilled" and not guidance_embeds:
        raise DCGenError("--objective guidance-distilled: expected a base with a guidance embedding "
                         "(config guidance_embeds true, e.g. FLUX.1-dev / Krea-dev), found none. Use flow.")
    return objective


def denoising_loss(denoiser, cache, cfg, device):
    """``loss_fn(indices, generator)`` of the flow-matching or guidance-distilled objective on cached DC-AE
    latents. Random draws, in order, from the step's CPU generator: sigmas, noise, guidance values."""
    objective = resolve_objective(cfg.objective, denoiser.guidance_embeds)
    null = cache.null_text(device) if objective == "guidance-distilled" else None
    text_keys = denoiser.text_keys  # FLUX: context, pooled; SANA: context, context_mask

    def loss_fn(indices, generator, part: slice | None = None):
        """The loss on ``indices[part]``; the draws are made for all of ``indices`` (the global batch), so any
        split of it over processes and micro-steps sees the same noise, times and guidance per item."""
        part = part if part is not None else slice(0, len(indices))
        b = cache.batch(indices[part], device, keys=("dcae_latents", *text_keys))
        x0 = b["dcae_latents"]
        n, total = x0.shape[0], len(indices)
        sigma = sample_sigmas(total, generator, denoiser.time_shift(x0), cfg.logit_mean, cfg.logit_std)[part]
        eps = torch.randn((total, *x0.shape[1:]), generator=generator)[part].to(device)
        sigma = sigma.to(device)
        x_t, v_target = noisy_sample(x0, eps, sigma)
        if objective == "guidance-distilled":
            w = sample_guidance(total, generator, cfg.guidance_min, cfg.guidance_max)[part].to(device)
            return guidance_distilled_loss(denoiser, x_t, sigma, b["context"], b["pooled"], null[0], null[1], w,
                                           v_target)
        guidance = torch.full((n,), float(cfg.guidance), device=device) if denoiser.guidance_embeds else None
        return flow_matching_loss(denoiser, x_t, sigma, *(b[k] for k in text_keys), v_target, guidance)

    loss_fn.objective = objective
    return loss_fn
