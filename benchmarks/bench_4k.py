"""DC-Gen-FLUX at 2K and 4K on this machine: image tokens, per-step time, end-to-end breakdown.

Side by side in one run, base FLUX (16-ch latent /8, 2x2 patches: one token per 16x16 px) vs DC-Gen-f64
(DC-AE-1.5 f64c128, 1x1 patches: one token per 64x64 px) at 2048x2048 and 4096x4096:

1. image tokens of both (text length printed);
2. per-step time on a reduced-depth FLUX of full width (hidden 3072, 24 heads, context 4096; 1 double +
   2 single blocks; random weights) built through ComfyUI by the pack's build_comfy_flux, sampled by
   ComfyUI's sampler; DC-Gen-f64 is that transformer with a 128-channel embedder/head, built the way the
   pack's loader builds the official Res4K model (build_comfy_flux + the pack's DC-AE latent space: token
   wrapper, latent format, official shift), sharing the block weights. Per-step times are marginal:
   (time of a 1+steps call - time of a 1-step call) / steps, the two calls alternated for up to --repeats
   rounds (best of each) within --round-budget seconds. DC-Gen is measured; base FLUX is measured only
   where a step is predicted to take under --measure-limit seconds, otherwise it is analytic: its linear
   and attention FLOPs times the seconds per FLOP fitted to the measured DC-Gen points (the estimate at a
   single FLOP rate is printed too). FLOPs, FLOP ratios and analytic times are also given for full-size
   FLUX (19 double + 38 single blocks);
3. end-to-end time of DC-Gen-f64 at each size: text encoding (ComfyUI's CLIP-L at full size, measured;
   ComfyUI's T5-XXL at full width and reduced depth, measured, extrapolated to its 24 layers), the official
   20 sampling steps, and decode with the full-size DC-AE-1.5 f64c128 decoder (random weights), measured
   at --decode-size and extrapolated to 2048x2048 and 4096x4096 (untiled, and tiled as
   dcgen_core.shared.dcae.decode_tiled with 32-latent-pixel tiles) by exact FLOP counts; shares in %.

    python benchmarks/bench_4k.py [--double 1 --single 2 --text 512 --steps 2 --sizes 2048 4096 --decode-size 1024]

bench_4k_gpu.py runs the same comparison at full FLUX size on a CUDA GPU (latency, peak VRAM).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    CONTEXT,
    FULL_DOUBLE,
    FULL_SINGLE,
    HIDDEN,
    OFFICIAL_STEPS,
    POOLED,
    dcae_decode_flops,
    flux_config,
    flux_step_flop_parts,
    flux_step_flops,
    loadavg,
    marginal,
    random_aligned_embedding,
    random_dcae_decoder,
    random_flux_state_dict,
    randomize_module_,
    timed,
)

from dcgen_core.shared.dcae.tiling import DEFAULT_TILE_LATENT, default_overlap
from dcgen_core.tools.headless import boot

DC_CHANNELS, DC_F = 128, 64  # DC-AE-1.5 f64c128
BASE_CHANNELS, BASE_F, BASE_PATCH = 16, 8, 2  # FLUX VAE latent, 2x2 patches
DCAE_VARIANT = "dc-ae-1.5-f64c128"
TILE_LATENT = DEFAULT_TILE_LATENT  # decode_tiled's tile where the free memory is unknown (2048 px for f64)


def base_tokens(size: int) -> int:
    return (size // (BASE_F * BASE_PATCH)) ** 2


def dc_tokens(size: int) -> int:
    return (size // DC_F) ** 2


def fmt_s(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds >= 10 else f"{seconds * 1000:,.0f} ms"


# --- FLUX through ComfyUI ------------------------------------------------------------------------------

def build_flux_pair(cfg, device, dtype, weight_dtype: str, hidden: int):
    """Base FLUX and DC-Gen-f64 ComfyUI MODELs (random weights) sharing every transformer-block tensor.

    Base: the pack's build_comfy_flux on a 64-feature (16 ch x 2x2) state dict. DC-Gen-f64: what the pack's
    load_flux_transformer does with the official Res4K transformer (128-channel embedder and head):
    build_comfy_flux, then the DC-AE latent space (latent format, official shift, token wrappers), minus
    reading a file (the released Res4K checkpoint is a full transformer, so this is the route users time).
    """
    from dataclasses import replace

    from comfyui_dc_gen.dcgen_core.flux import dcgen as pack_flux
    from comfyui_dc_gen.dcgen_core.flux import comfy_model as pack_flux_comfy_model

    sd = random_flux_state_dict(cfg, device, dtype)
    base = pack_flux_comfy_model.build_comfy_flux(sd, cfg, weight_dtype, source="benchmark FLUX")
    emb = random_aligned_embedding(DC_CHANNELS, hidden)
    sd_dc = {**sd, **{k: v.to(device=device, dtype=dtype) for k, v in emb.to_bfl_state_dict().items()}}
    cfg_dc = replace(cfg, img_in_features=DC_CHANNELS, out_features=DC_CHANNELS)
    dcgen = pack_flux_comfy_model.build_comfy_flux(sd_dc, cfg_dc, weight_dtype, source="benchmark DC-Gen-f64")
    pack_flux._install_latent_space(dcgen, DC_CHANNELS, pack_flux.resolve_scaling(DC_CHANNELS), own_model=True)
    del sd, sd_dc
    return base, dcgen


def make_cond(text: int, context: int = CONTEXT, pooled: int = POOLED, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, text, context, generator=g),
             {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}]]


def make_sampler(cond):
    import comfy.sample

    def sample(model, latent, steps):
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                                   disable_pbar=True, seed=0)

    return sample


def latents(size: int) -> dict[str, torch.Tensor]:
    return {"base": torch.zeros(1, BASE_CHANNELS, size // BASE_F, size // BASE_F),
            "dcgen": torch.zeros(1, DC_CHANNELS, size // DC_F, size // DC_F)}


def attention_name() -> str:
    from comfy.ldm.modules import attention

    return attention.optimized_attention.__name__


def fit_rates(points: list[tuple[float, float, float]]) -> tuple[float, float, str]:
    """Seconds per linear FLOP and per attention FLOP from (linear, attention, seconds) points.

    Two or more points: least squares through the origin; if that gives a non-positive rate (noise), or
    with one point, a single seconds-per-FLOP for both."""
    if len(points) >= 2:
        a = torch.tensor([[p[0], p[1]] for p in points], dtype=torch.float64)
        t = torch.tensor([p[2] for p in points], dtype=torch.float64)
        sol = torch.linalg.lstsq(a, t[:, None]).solution[:, 0]
        if bool((sol > 0).all()):
            return float(sol[0]), float(sol[1]), "linear and attention FLOP rates fitted separately"
    lin, att, sec = max(points, key=lambda p: p[0] + p[1])
    r = sec / (lin + att)
    return r, r, "one FLOP rate (fitted per-part rates were not both positive)"


def predict(rates, parts) -> float:
    return rates[0] * parts[0] + rates[1] * parts[1]


# --- text encoders (ComfyUI's own modules) ---------------------------------------------------------------

def t5_xxl_config(layers: int | None = None) -> dict:
    """ComfyUI's T5-XXL config, with ``layers`` encoder layers when given."""
    import json

    import comfy.text_encoders.t5

    path = os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if layers is not None:
        cfg["num_layers"] = layers
    return cfg


def clip_l_config() -> dict:
    import json

    import comfy.sd1_clip

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json"), encoding="utf-8") as f:
        return json.load(f)


def build_text_encoder(kind: str, cfg: dict, device, dtype):
    """ComfyUI's T5 or CLIP text model with random weights, built with the ops ComfyUI's text encoders use."""
    import comfy.clip_model
    import comfy.ops
    import comfy.text_encoders.t5

    cls = comfy.text_encoders.t5.T5 if kind == "t5" else comfy.clip_model.CLIPTextModel
    with torch.device("meta"):
        model = cls(cfg, dtype, "meta", comfy.ops.manual_cast)
    model.to_empty(device=device)
    return randomize_module_(model).eval()


def run_text_encoder(model, ids):
    """What ComfyUI's SDClipModel does: fp32 activations, weights cast per layer (manual_cast ops)."""
    return model(ids, None, dtype=torch.float32)


def t5_layer_runner(t5, ids):
    blocks = t5.encoder.block

    def run(n):
        t5.encoder.block = blocks[:n]
        try:
            return run_text_encoder(t5, ids)
        finally:
            t5.encoder.block = blocks

    return run


# --- main ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--text", type=int, default=512, help="text tokens (T5 sequence length)")
    ap.add_argument("--steps", type=int, default=2, help="extra steps timed beyond a 1-step call")
    ap.add_argument("--repeats", type=int, default=3, help="alternating (1-step, 1+steps) timing rounds, best of")
    ap.add_argument("--round-budget", type=float, default=60.0,
                    help="no new timing round once a measurement has taken this long (seconds; >= 1 round)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--measure-limit", type=float, default=60.0,
                    help="measure base FLUX only where one step is predicted to take less (seconds)")
    ap.add_argument("--t5-layers", type=int, default=2, help="T5-XXL layers built and timed (>= 2)")
    ap.add_argument("--decode-size", type=int, default=1024,
                    help="image size of the measured DC-AE decode (2048: about 6 min here)")
    ap.add_argument("--decode-repeats", type=int, default=1, help="timed decodes at --decode-size, best of")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    a = ap.parse_args()
    if a.steps < 1 or a.t5_layers < 2 or any(s % (2 * DC_F) for s in a.sizes + [a.decode_size]):
        ap.error(f"expected --steps >= 1, --t5-layers >= 2 and sizes that are multiples of {2 * DC_F}")
    torch.set_grad_enabled(False)
    wall = time.perf_counter()

    boot(cpu=True)
    cfg = flux_config(a.double, a.single)
    models = dict(zip(("base", "dcgen"), build_flux_pair(cfg, "cpu", torch.float32, "fp32", HIDDEN)))
    sample = make_sampler(make_cond(a.text))
    print(f"FLUX hidden {HIDDEN}, {a.double} double + {a.single} single blocks (full-size: {FULL_DOUBLE} + "
          f"{FULL_SINGLE}), random weights, fp32, CPU ({torch.get_num_threads()} threads), ComfyUI attention "
          f"{attention_name()}; text length {a.text} tokens; {loadavg()}")

    # 1. tokens
    for size in a.sizes:
        print(f"[tokens]   {size}x{size}: base FLUX {base_tokens(size):6d} image tokens (f8 latent, 2x2 patches), "
              f"DC-Gen-f64 {dc_tokens(size):5d} (f64c128, 1x1) -> {base_tokens(size) // dc_tokens(size)}x fewer; "
              f"+ {a.text} text tokens each")

    # 2. per-step time: DC-Gen measured at every size, then base FLUX measured or analytic
    def step_parts(kind, size, double=a.double, single=a.single):
        tokens, ch = (base_tokens(size), 4 * BASE_CHANNELS) if kind == "base" else (dc_tokens(size), DC_CHANNELS)
        return flux_step_flop_parts(tokens, a.text, double, single, ch)

    def measure(kind, size, warmup):
        run = partial(sample, models[kind], latents(size)[kind])
        sec, setup, rounds = marginal(run, a.steps, a.repeats, warmup=warmup, budget_s=a.round_budget)
        # the fixed cost of a sampling call is well under a second: a large one means a noisy measurement
        noisy = "; NOISY: other load during the timed calls" if abs(setup) > max(2.0, 0.25 * sec) else ""
        return sec, f"measured (best of {rounds}; setup {setup:+.1f} s per call{noisy})"

    step = {}  # (kind, size) -> (seconds, how)
    for i, size in enumerate(a.sizes):
        step["dcgen", size] = measure("dcgen", size, warmup=i == 0)
    points = [(*step_parts("dcgen", s), step["dcgen", s][0]) for s in a.sizes]
    rates = fit_rates(points)
    for size in a.sizes:
        predicted = predict(rates, step_parts("base", size))
        if predicted <= a.measure_limit:
            step["base", size] = measure("base", size, warmup=True)
        else:
            big = max(a.sizes)  # the most compute-bound measured point
            flat = step["dcgen", big][0] * sum(step_parts("base", size)) / sum(step_parts("dcgen", big))
            how = (f"analytic (> {a.measure_limit:.0f} s/step predicted: not run; "
                   f"at DC-Gen {big}x{big}'s FLOP rate: {flat:,.0f} s)")
            step["base", size] = (predicted, how)

    print(f"[step]     reduced-depth FLUX ({a.double}+{a.single} blocks), marginal over {a.steps} step(s):")
    for size in a.sizes:
        for kind, label in (("base", "base FLUX "), ("dcgen", "DC-Gen-f64")):
            tokens = base_tokens(size) if kind == "base" else dc_tokens(size)
            sec, how = step[kind, size]
            print(f"[step]     {label} {size}x{size} {tokens:6d} img tokens  {sum(step_parts(kind, size)) / 1e12:8.2f} "
                  f"TFLOP  {sec * 1000:12,.0f} ms/step  {how}")
    print(f"[step]     analytic = linear FLOPs / {1e-9 / rates[0]:.1f} GFLOP/s + attention FLOPs / "
          f"{1e-9 / rates[1]:.1f} GFLOP/s ({rates[2]}, from the measured DC-Gen points)")
    for size in a.sizes:
        t_base, t_dc = step["base", size][0], step["dcgen", size][0]
        ratio = flux_step_flops(base_tokens(size), a.text, a.double, a.single, 4 * BASE_CHANNELS) / \
            flux_step_flops(dc_tokens(size), a.text, a.double, a.single, DC_CHANNELS)
        how = "measured" if step["base", size][1].startswith("measured") else "analytic base / measured DC-Gen"
        print(f"[speedup]  {size}x{size}: {t_base / t_dc:6.1f}x ({how}) vs FLOP ratio {ratio:6.1f}x")

    print(f"[full]     full-size FLUX ({FULL_DOUBLE}+{FULL_SINGLE} blocks, hidden {HIDDEN}), same text length; "
          f"analytic time on this CPU with the rates above:")
    full_step = {}
    for size in a.sizes:
        fb = step_parts("base", size, FULL_DOUBLE, FULL_SINGLE)
        fd = step_parts("dcgen", size, FULL_DOUBLE, FULL_SINGLE)
        tb, td = predict(rates, fb), predict(rates, fd)
        full_step[size] = td
        print(f"[full]     {size}x{size}: base FLUX {sum(fb) / 1e12:8.1f} TFLOP {tb:10,.0f} s/step | DC-Gen-f64 "
              f"{sum(fd) / 1e12:6.1f} TFLOP {td:7,.1f} s/step | FLOP ratio {sum(fb) / sum(fd):5.1f}x, "
              f"time ratio {tb / td:5.1f}x")

    models.clear()
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()

    # 3. end-to-end for DC-Gen-f64
    text_time, text_how = None, "skipped"
    if not a.skip_text:
        text_time, text_how = bench_text(a)
    decode = {} if a.skip_decode else bench_decode(a.decode_size, a.sizes, a.decode_repeats)
    print(f"[e2e]      DC-Gen-f64, {OFFICIAL_STEPS} steps (official default); text encoding: {text_how}; "
          f"sampling: {OFFICIAL_STEPS} x per-step above (reduced: measured step; full-size: analytic step); "
          f"decode: see [decode]")
    for size in a.sizes:
        reduced = [("text encoding", text_time), ("sampling", OFFICIAL_STEPS * step["dcgen", size][0]),
                   ("decode", decode.get(size, (None, ""))[0])]
        full = [("text encoding", text_time), ("sampling", OFFICIAL_STEPS * full_step[size]),
                ("decode", decode.get(size, (None, ""))[0])]
        for label, parts in ((f"reduced FLUX ({a.double}+{a.single})", reduced),
                             (f"full-size FLUX ({FULL_DOUBLE}+{FULL_SINGLE})", full)):
            known = sum(t for _, t in parts if t is not None)
            cells = "  ".join(f"{name} {fmt_s(t)} ({100 * t / known:.1f}%)" if t is not None else f"{name} n/a"
                              for name, t in parts)
            print(f"[e2e]      {size}x{size} {label:24s} total {fmt_s(known):>10s}: {cells}")
    print(f"wall time {time.perf_counter() - wall:.0f} s; {loadavg()}")


def bench_text(a) -> tuple[float, str]:
    """CLIP-L (full size) + T5-XXL (full width; --t5-layers measured, extrapolated to 24), fp32 CPU."""
    g = torch.Generator().manual_seed(2)
    clip_cfg = clip_l_config()
    clip = build_text_encoder("clip", clip_cfg, "cpu", torch.float32)
    clip_ids = torch.randint(0, clip_cfg["vocab_size"], (1, clip_cfg["max_position_embeddings"]), generator=g)
    t_clip = timed(partial(run_text_encoder, clip, clip_ids), max(a.repeats, 2))
    del clip
    full_layers = t5_xxl_config()["num_layers"]
    t5_cfg = t5_xxl_config(a.t5_layers)
    t5 = build_text_encoder("t5", t5_cfg, "cpu", torch.float32)
    ids = torch.randint(0, t5_cfg["vocab_size"], (1, a.text), generator=g)
    per_layer, fixed, _ = marginal(t5_layer_runner(t5, ids), a.t5_layers - 1, a.repeats, budget_s=a.round_budget)
    del t5
    gc.collect()
    t_t5 = fixed + full_layers * per_layer
    print(f"[text]     CLIP-L (ComfyUI clip_model, full size, {clip_cfg['max_position_embeddings']} tokens): "
          f"{t_clip * 1000:,.0f} ms measured")
    print(f"[text]     T5-XXL (ComfyUI t5, d_model {t5_cfg['d_model']}, d_ff {t5_cfg['d_ff']}, {t5_cfg['num_heads']} "
          f"heads; {a.text} tokens): 1 vs {a.t5_layers} layers measured -> {per_layer * 1000:,.0f} ms/layer + "
          f"{fixed * 1000:,.0f} ms fixed -> {full_layers} layers {fmt_s(t_t5)} (extrapolated)")
    return t_clip + t_t5, f"CLIP-L measured + T5-XXL {full_layers} layers extrapolated from {a.t5_layers}"


def bench_decode(decode_size: int, sizes: list[int], repeats: int) -> dict[int, tuple[float, str]]:
    """Full-size DC-AE-1.5 f64c128 decoder (random weights), fp32 CPU: one size measured, the rest by FLOPs."""
    from dcgen_core.shared.dcae import VARIANTS, estimate_decode_bytes

    cfg = VARIANTS[DCAE_VARIANT]
    dcae = random_dcae_decoder(cfg)
    params = sum(p.numel() for p in dcae.decoder.parameters())
    lat = decode_size // DC_F
    dcae.decode(torch.randn(1, DC_CHANNELS, 1, 1), tiled=False)  # warm-up (library init), tiny
    z = torch.randn(1, DC_CHANNELS, lat, lat)
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        dcae.decode(z, tiled=False)
        times.append(time.perf_counter() - t)
    measured = min(times)
    del dcae
    gc.collect()
    flops, _ = dcae_decode_flops(cfg, (lat, lat))
    per_flop = measured / flops
    print(f"[decode]   DC-AE-1.5 f64c128 decoder (full size, {params / 1e6:.0f} M params, random weights), fp32 CPU: "
          f"{decode_size}x{decode_size} {flops / 1e12:.2f} TFLOP, {fmt_s(measured)} measured "
          f"({flops / measured / 1e9:.0f} GFLOP/s)")
    out = {}
    for size in sizes:
        hw = (size // DC_F, size // DC_F)
        f_full, _ = dcae_decode_flops(cfg, hw)
        overlap = default_overlap(TILE_LATENT)
        f_tiled, tiles = dcae_decode_flops(cfg, hw, TILE_LATENT, overlap)
        mem = estimate_decode_bytes(cfg, (1, DC_CHANNELS, *hw), torch.float32) / 2**30
        t_full, t_tiled = f_full * per_flop, f_tiled * per_flop
        how = "measured" if size == decode_size else f"extrapolated by FLOPs from {decode_size}x{decode_size}"
        tiled = (f"tiled: one {TILE_LATENT}x{TILE_LATENT}-latent tile = untiled" if tiles == 1 else
                 f"tiled ({tiles} tiles of {TILE_LATENT}x{TILE_LATENT} latent, overlap {overlap}) "
                 f"{f_tiled / 1e12:.1f} TFLOP {fmt_s(t_tiled)} (extrapolated)")
        print(f"[decode]   {size}x{size}: untiled {f_full / 1e12:.1f} TFLOP {fmt_s(t_full)} ({how}; "
              f"activation estimate {mem:.1f} GiB fp32) | {tiled}")
        if tiles > 1:
            out[size] = (t_tiled, "tiled")
        else:
            out[size] = (t_full, "untiled")
    return out


if __name__ == "__main__":
    main()
