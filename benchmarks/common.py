"""Helpers shared by the benchmarks: FLUX dimensions, the FLOP model, timing, random models.

Imported by ``bench_1k.py``, ``bench_4k.py`` and ``bench_4k_gpu.py`` (run as scripts, so this folder is on
``sys.path``). Functions that touch ComfyUI (``random_flux_state_dict``) need ``dcgen_core.tools.headless.boot``
to have run first.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# FLUX.1 (dev / Krea-dev) transformer width: hidden, heads, T5 context width, CLIP pooled width, MLP ratio.
HIDDEN, HEADS, CONTEXT, POOLED, MLP = 3072, 24, 4096, 768, 4.0
FULL_DOUBLE, FULL_SINGLE = 19, 38  # full-size FLUX.1 depth
OFFICIAL_STEPS = 20  # DC-Gen-FLUX official default


def _flux_step_counts(img_tokens, txt_tokens, double, single, channels, hidden, context, mlp) -> tuple[int, int]:
    h, m = hidden, int(hidden * mlp)
    n = img_tokens + txt_tokens
    linear = double * (img_tokens + txt_tokens) * (4 * h * h + 2 * h * m)
    linear += single * n * (h * (3 * h + m) + (h + m) * h)
    linear += img_tokens * 2 * h * channels + txt_tokens * context * h
    attention = (double + single) * 2 * n * n * h  # QK^T and AV
    return linear, attention


def flux_step_flops(img_tokens: int, txt_tokens: int, double: int, single: int, channels: int,
                    hidden: int = HIDDEN, context: int = CONTEXT, mlp: float = MLP) -> float:
    """FLOPs of one FLUX forward over the tokens: linears (qkv, proj, MLP, embedders) + attention."""
    linear, attention = _flux_step_counts(img_tokens, txt_tokens, double, single, channels, hidden, context, mlp)
    return 2.0 * (linear + attention)


def flux_step_flop_parts(img_tokens: int, txt_tokens: int, double: int, single: int, channels: int,
                         hidden: int = HIDDEN, context: int = CONTEXT, mlp: float = MLP) -> tuple[float, float]:
    """``flux_step_flops`` split into (linear, attention) FLOPs."""
    linear, attention = _flux_step_counts(img_tokens, txt_tokens, double, single, channels, hidden, context, mlp)
    return 2.0 * linear, 2.0 * attention


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Best-of-N times of two functions measured alternately, so neither pays for running first."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return min(a), min(b)


def marginal(run, extra: int, repeats: int, clock=None, warmup: bool = True,
             budget_s: float | None = None) -> tuple[float, float, int]:
    """Marginal cost of one unit of work: ``run(n)`` does n units (sampling steps, encoder layers...).

    ``run(1)`` and ``run(1 + extra)`` are timed alternately, up to ``repeats`` rounds (best of each), so the
    fixed per-call cost cancels; with ``budget_s``, no new round starts once that many seconds were spent
    (at least one round). Returns (per-unit time, fixed time of a 1-unit call, rounds). ``clock(fn)`` times
    one call (default: wall clock); ``warmup`` runs ``run(1)`` once untimed first.
    """
    one, many, _ = marginal_rounds(run, extra, repeats, clock=clock, warmup=warmup, budget_s=budget_s)
    unit = (min(many) - min(one)) / extra
    return unit, min(one) - unit, len(one)


def marginal_rounds(run, extra: int, repeats: int, clock=None, warmup: bool = True, budget_s: float | None = None,
                    beside=None) -> tuple[list[float], list[float], list[float]]:
    """The rounds behind ``marginal``: times of ``run(1)`` and ``run(1 + extra)`` per round, and of ``beside()``
    (another function timed in the same round, e.g. a bare forward to compare a step with), or [] without it."""
    clock = clock or _wall
    start = time.perf_counter()
    if warmup:
        run(1)
        if beside is not None:
            beside()
    one, many, other = [], [], []
    for _ in range(repeats):
        one.append(clock(lambda: run(1)))
        many.append(clock(lambda: run(1 + extra)))
        if beside is not None:
            other.append(clock(beside))
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            break
    return one, many, other


def spread(values) -> str:
    """'median (min..max)' of a list of numbers, for reporting a measurement with its spread over repeats."""
    return f"{statistics.median(values):+.1f} ({min(values):+.1f}..{max(values):+.1f})"


def cpu_time(fn) -> float:
    """CPU seconds this process spent in ``fn`` (all threads): a clock that other work on the machine moves less."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_models(double: int, single: int):
    """A diffusers FluxTransformer2DModel (64 in/out channels, 1x1 patches, random weights), its BFL
    state dict and FluxConfig."""
    from diffusers import FluxTransformer2DModel

    from dcgen_core.flux.keys import diffusers_to_bfl, flux_config_from_state_dict

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=double,
                                 num_single_layers=single, attention_head_dim=HIDDEN // HEADS,
                                 num_attention_heads=HEADS, joint_attention_dim=CONTEXT,
                                 pooled_projection_dim=POOLED, guidance_embeds=True,
                                 axes_dims_rope=(16, 56, 56)).eval()
    sd = diffusers_to_bfl(dict(ref.state_dict()))
    return ref, sd, flux_config_from_state_dict(sd)


# --- random models without diffusers (any size, any device) ------------------------------------------

def flux_config(double: int, single: int, channels: int = 64, hidden: int = HIDDEN, heads: int = HEADS,
                context: int = CONTEXT, pooled: int = POOLED, axes_dim=(16, 56, 56)):
    """The FluxConfig of a FLUX transformer (guidance-distilled, qkv bias) with ``channels`` in/out features."""
    from dcgen_core.flux.keys import FluxConfig

    return FluxConfig(hidden_size=hidden, num_heads=heads, head_dim=hidden // heads, depth=double,
                      depth_single_blocks=single, context_in_dim=context, vec_in_dim=pooled,
                      img_in_features=channels, out_features=channels, guidance_embed=True,
                      axes_dim=list(axes_dim), mlp_ratio=MLP)


def _fill_random_(name: str, t: torch.Tensor, g: torch.Generator):
    """Weights ~ N(0, 1/fan_in) (activations stay O(1) through depth), norm scales 1, biases 0."""
    if t.ndim >= 2:
        fan_in = t[0].numel()
        t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
    elif name.endswith("scale") or "norm" in name and name.endswith("weight"):
        t.fill_(1.0)
    else:
        t.zero_()


def random_flux_state_dict(cfg, device="cpu", dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A BFL/ComfyUI-keyed FLUX state dict of random weights for ``cfg``, created directly on ``device``.

    Keys and shapes come from ComfyUI's own Flux class built on the meta device (ComfyUI must be booted).
    """
    import comfy.ldm.flux.model
    import comfy.ops

    from dcgen_core.flux.comfy_model import flux_params_kwargs

    meta = comfy.ldm.flux.model.Flux(image_model="flux", dtype=dtype, device="meta",
                                     operations=comfy.ops.disable_weight_init,
                                     **flux_params_kwargs(cfg.comfy_flux_kwargs()))
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, t in meta.state_dict().items():
        sd[name] = torch.empty(t.shape, dtype=dtype, device=device)
        _fill_random_(name, sd[name], g)
    return sd


def random_aligned_embedding(channels: int, hidden: int = HIDDEN, seed: int = 1):
    """A random DC-Gen embedder/head pair for ``channels`` DC-AE latent channels (what the pack applies)."""
    from dcgen_core.shared.embedding import AlignedEmbedding

    g = torch.Generator().manual_seed(seed)
    return AlignedEmbedding(0.02 * torch.randn(hidden, channels, generator=g), torch.zeros(hidden),
                            0.02 * torch.randn(channels, hidden, generator=g), torch.zeros(channels),
                            f"benchmark embedding ({channels} ch)")


def randomize_module_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter/buffer of a module (e.g. one made with ``to_empty``) like ``_fill_random_``."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                g = torch.Generator(device=t.device).manual_seed(seed)
                _fill_random_(name, t, g)
                seed += 1
    return module


def random_dcae_decoder(config, device="cpu", dtype=torch.float32, seed: int = 0):
    """A dcgen_core DCAE for ``config`` whose decoder holds random weights; no encoder is materialised."""
    from dcgen_core.shared.dcae import DCAE

    with torch.device("meta"):
        dcae = DCAE(config)
    dcae.encoder = torch.nn.Identity()
    dcae.decoder.to_empty(device=device)
    randomize_module_(dcae.decoder, seed)
    for name, buf in dcae.decoder.named_buffers():  # batch-norm statistics: identity
        if name.endswith("running_var"):
            buf.fill_(1.0)
    return dcae.to(dtype).eval()


def dcae_decode_flops(config, latent_hw: tuple[int, int], tile: int | None = None,
                      overlap: int | None = None) -> tuple[float, int]:
    """(FLOPs, decoder calls) of decoding one latent of ``latent_hw``: untiled, or tiled like
    ``decode_tiled(tile, overlap)``. Counted by torch's FlopCounterMode on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dcgen_core.shared.dcae import DCAE, decode_tiled

    with torch.device("meta"):
        dcae = DCAE(config).eval()
    calls = [0]
    dcae.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    z = torch.empty(1, config.latent_channels, *latent_hw, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if tile is None:
            dcae.decoder(z)
        else:
            decode_tiled(dcae, z, tile, overlap)
    return float(counter.get_total_flops()), calls[0]


def loadavg() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def clocks(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def med_range(values, scale=1.0, fmt="{:,.0f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"
