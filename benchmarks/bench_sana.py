"""DC-Gen-SANA vs SANA at 4K on this machine: image tokens, per-step time, speedup against the FLOP ratio.

Side by side in one run, SANA-1.6B at full width (hidden 2240 = 70 heads x 32, cross-attention 20 heads x 112,
caption 2304, Mix-FFN ratio 2.5) and reduced depth (--layers blocks; random weights, fp32, CPU) in its two latent
spaces:

- SANA: its own DC-AE f32c32 (32 channels in/out, 1x1 patches: one token per 32x32 px; 16,384 tokens at 4096x4096);
- DC-Gen-SANA: DC-AE-1.5 f64c128 (128 channels in/out, 1x1 patches: one token per 64x64 px; 4,096 tokens at
  4096x4096);

each with SANA 2K/4K's positional embedding for its latent grid at the largest --sizes (interpolation scale
max(grid / 64, 1): SANA-4K's 2.0 on 128x128, 1.0 on 64x64);

both built through ComfyUI by the pack's ``build_comfy_sana`` (ComfyUI's ops, BaseModel and model patcher; the
blocks of both hold the same random weights). One step = one diffusion-model call, as a sampler makes it:
``mm.load_models_gpu([m])`` then ``m.model.apply_model(x, sigma, c_crossattn=..., attention_mask=...,
transformer_options=...)``, batch 1 (CFG doubles it in real use: both kinds alike), --text caption tokens
(SANA's 300) with a mask whose tail is padding. The two models are timed alternately (the order swapped each
round, one untimed warm-up call each first), --repeats rounds; reported: wall time, best of the rounds and
median (min..max), the speedup of the best times and the median (min..max) of the per-round speedups (both calls
of a round ran under about the same machine load), and the speedup in process CPU time (best/best; all threads;
less moved by other jobs on a shared machine than wall time).

Default depth 1 layer: on 2 shared CPU cores a SANA step at 4096x4096 took about 35 s per layer (16,384 tokens,
2.3 TFLOP per layer), so 2 layers passed a minute per step.

The FLOP count (``sana_step_flop_parts``) is analytic: matmul / convolution multiply-adds x 2 of every layer -
self-attention q/k/v/out projections and ReLU linear attention (K^T V and its product with Q, the value padded by
a row of ones: linear in image tokens), cross-attention projections (image side and caption side) and softmax
attention over the caption (linear in image tokens), Mix-FFN (1x1 expand to 2 x mlp, depthwise 3x3, 1x1 back),
patch embedding, output projection, caption projection and timestep embedding. Elementwise work (norms,
modulation, activations, positional embedding, the mask) is not counted.

    python benchmarks/bench_sana.py [--layers 1 --sizes 2048 4096 --repeats 3 --text 300]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import clocks, loadavg, med_range, randomize_module_

from dcgen_core.tools.headless import boot, comfyui_version_at

KINDS = {  # latent channels, spatial compression (1x1 patches), label
    "sana": (32, 32, "SANA (DC-AE f32c32)"),
    "dcgen": (128, 64, "DC-Gen-SANA (f64c128)"),
}
FULL_LAYERS = 20  # SANA-1.6B
TEXT_TOKENS = 300  # SANA's caption length (Gemma-2, 300-token selection)
SIGMA = 0.6


def sana_config(layers: int, channels: int, grid: int):
    """SANA-1.6B's width (SanaConfig defaults) with ``layers`` blocks and ``channels`` latent channels in/out;
    positional embedding as SANA 2K/4K has it, for a ``grid`` x ``grid`` latent (interpolation max(grid / 64, 1))."""
    from dcgen_core.sana.model import SanaConfig

    return SanaConfig(in_channels=channels, out_channels=channels, num_layers=layers, sample_size=grid,
                      interpolation_scale=max(grid / 64.0, 1.0))


def sana_step_flop_parts(cfg, img_tokens: int, txt_tokens: int, layers: int | None = None) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one SANA forward at batch 1, by part; ``layers`` overrides cfg.num_layers.

    Per block, N image tokens, L caption tokens, D hidden, d self-attention head dim, C cross-attention inner
    width (heads x head dim), K cross_attention_dim (the projected caption's width), M mlp hidden:
      self-attention projections  q, k, v, out: 4 N D^2
      linear attention            (V|1) K^T per head, then x Q: 2 x heads x (d + 1) x d x N = 2 N D (d + 1)
      cross-attention projections q and out: 2 N D C; k and v (caption): 2 L K C
      cross-attention             Q K^T and A V over the caption: 2 N L C
      Mix-FFN                     1x1 D -> 2M, depthwise 3x3 on 2M, 1x1 M -> D: N (2 D M + 18 M + M D)
    Outside the blocks: patch embedding N Cin D, output projection N D Cout, caption projection
    L (caption_channels D + D D), timestep embedding 256 D + D D + 6 D D.
    """
    n, length = img_tokens, txt_tokens
    depth = cfg.num_layers if layers is None else layers
    d_model, head = cfg.hidden_size, cfg.attention_head_dim
    cross = cfg.num_cross_attention_heads * cfg.cross_attention_head_dim
    kv_in, mlp, p2 = cfg.cross_attention_dim, cfg.mlp_hidden_channels, cfg.patch_size ** 2
    macs = {
        "self-attn projections": depth * 4 * n * d_model * d_model,
        "linear attention": depth * 2 * n * d_model * (head + 1),
        "cross-attn projections": depth * (2 * n * d_model * cross + 2 * length * kv_in * cross),
        "cross-attention": depth * 2 * n * length * cross,
        "Mix-FFN": depth * n * (2 * d_model * mlp + 2 * mlp * 9 + mlp * d_model),
        "embed/out/caption/time": (n * cfg.in_channels * p2 * d_model + n * d_model * p2 * cfg.out_channels
                                   + length * (cfg.caption_channels * d_model + d_model * d_model)
                                   + 256 * d_model + d_model * d_model + 6 * d_model * d_model),
    }
    return {k: 2.0 * v for k, v in macs.items()}


def sana_step_flops(cfg, img_tokens: int, txt_tokens: int, layers: int | None = None) -> float:
    return sum(sana_step_flop_parts(cfg, img_tokens, txt_tokens, layers).values())


def build_models(layers: int, grids: dict[str, int]):
    """{kind: ComfyUI ModelPatcher} built by the pack's build_comfy_sana from random state dicts; every block
    tensor (and the caption/timestep embedders) is the same in both, only patch_embed/proj_out differ."""
    import comfy.ops

    from dcgen_core.shared.latent_space import DEFAULT_SCALING
    from dcgen_core.sana.comfy_model import build_comfy_sana
    from dcgen_core.sana.model import SanaTransformer

    shared = None
    models, cfgs = {}, {}
    for kind, (channels, _, label) in KINDS.items():
        cfg = sana_config(layers, channels, grids[kind])
        with torch.device("meta"):
            ref = SanaTransformer(cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        ref.to_empty(device="cpu")
        sd = dict(randomize_module_(ref).state_dict())
        del ref
        if shared is None:
            shared = {k: v for k, v in sd.items() if not k.startswith(("patch_embed.", "proj_out."))}
        else:
            sd.update(shared)
        models[kind] = build_comfy_sana(sd, cfg, "fp32", f"benchmark {label}", DEFAULT_SCALING[channels])
        cfgs[kind] = cfg
        del sd
        gc.collect()
    return models, cfgs


def make_step(model, size: int, channels: int, f: int, text: int, valid: int):
    """One diffusion-model call on a 1 x channels x size/f x size/f latent, as a sampler step makes it."""
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(size)
    x = torch.randn(1, channels, size // f, size // f, generator=g)
    context = torch.randn(1, text, 2304, generator=g)
    mask = torch.zeros(1, text)
    mask[:, :valid] = 1.0  # the rest is padding
    sigma = torch.tensor([SIGMA])

    def step():
        mm.load_models_gpu([model])
        out = model.model.apply_model(x, sigma, c_crossattn=context, attention_mask=mask,
                                      transformer_options={})
        assert out.shape == x.shape
        return out

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help=f"SANA blocks built and timed (full size: {FULL_LAYERS})")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096], help="image sides (multiples of 64)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (after one warm-up call each)")
    ap.add_argument("--text", type=int, default=TEXT_TOKENS, help="caption tokens (SANA: 300)")
    ap.add_argument("--text-valid", type=int, default=120, help="caption tokens the mask keeps (the rest: padding)")
    a = ap.parse_args()
    if a.layers < 1 or a.repeats < 1 or not 0 < a.text_valid <= a.text or any(s % 64 or s <= 0 for s in a.sizes):
        ap.error("expected --layers >= 1, --repeats >= 1, 0 < --text-valid <= --text and sizes that are multiples of 64")
    torch.set_grad_enabled(False)
    wall = time.perf_counter()

    rt = boot(cpu=True)
    from comfy.ldm.modules import attention

    big = max(a.sizes)
    models, cfgs = build_models(a.layers, {k: big // f for k, (_, f, _) in KINDS.items()})
    c = cfgs["sana"]
    print(f"ComfyUI {comfyui_version_at(rt.path)} ({rt.path}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; cross-attention {attention.optimized_attention.__name__}; {loadavg()}")
    print(f"SANA-1.6B width: hidden {c.hidden_size} ({c.num_attention_heads} x {c.attention_head_dim}), cross-attention "
          f"{c.num_cross_attention_heads} x {c.cross_attention_head_dim}, caption {c.caption_channels}, mlp "
          f"{c.mlp_hidden_channels} (ratio {c.mlp_ratio}); {a.layers} of {FULL_LAYERS} layers, random weights, fp32, "
          f"CPU, built by build_comfy_sana ({type(models['sana'].model).__name__} / "
          f"{type(models['sana'].model.diffusion_model).__name__}); batch 1, {a.text} caption tokens "
          f"({a.text_valid} unmasked); {a.repeats} alternating rounds after a warm-up")

    results = {}
    for size in a.sizes:
        tokens = {k: (size // f) ** 2 for k, (_, f, _) in KINDS.items()}
        steps = {k: make_step(models[k], size, ch, f, a.text, a.text_valid) for k, (ch, f, _) in KINDS.items()}
        warm = {k: clocks(steps[k])[0] for k in KINDS}
        print(f"[warm-up]  {size}x{size}: " + ", ".join(f"{KINDS[k][2]} {warm[k]:.1f} s" for k in KINDS)
              + f"; {loadavg()}", flush=True)
        times, cpu = {k: [] for k in KINDS}, {k: [] for k in KINDS}
        for r in range(a.repeats):
            order = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
            for k in order:
                w, c = clocks(steps[k])
                times[k].append(w)
                cpu[k].append(c)
        results[size] = (tokens, times, cpu)
        del steps
        gc.collect()

    print(f"[result]   per step = one apply_model call, batch 1; best of {a.repeats} and median (min..max) in ms; "
          f"FLOPs analytic (layers: {a.layers})")
    for size in a.sizes:
        tokens, times, cpu = results[size]
        for k, (ch, f, label) in KINDS.items():
            fl = sana_step_flops(cfgs[k], tokens[k], a.text)
            print(f"[step]     {size}x{size} {label:22s} {ch:3d} ch {size // f:3d}x{size // f:<3d} {tokens[k]:6,d} tokens "
                  f"{fl / 1e12:7.3f} TFLOP  best {min(times[k]) * 1000:9,.0f} ms  median {med_range(times[k], 1000)} ms"
                  f"  ({fl / min(times[k]) / 1e9:.0f} GFLOP/s; CPU best {min(cpu[k]):,.1f} s)")
        speed = min(times["sana"]) / min(times["dcgen"])
        rounds = [s / d for s, d in zip(times["sana"], times["dcgen"])]
        flop_ratio = sana_step_flops(cfgs["sana"], tokens["sana"], a.text) / \
            sana_step_flops(cfgs["dcgen"], tokens["dcgen"], a.text)
        full_ratio = sana_step_flops(cfgs["sana"], tokens["sana"], a.text, FULL_LAYERS) / \
            sana_step_flops(cfgs["dcgen"], tokens["dcgen"], a.text, FULL_LAYERS)
        print(f"[speedup]  {size}x{size}: {speed:.2f}x (best/best; per round {med_range(rounds, fmt='{:.2f}')}x) | "
              f"tokens {tokens['sana'] / tokens['dcgen']:.0f}x | FLOP ratio {flop_ratio:.3f}x "
              f"({FULL_LAYERS} layers: {full_ratio:.3f}x) | speedup / FLOP ratio {100 * speed / flop_ratio:.0f}% "
              f"(per round {med_range([100 * x / flop_ratio for x in rounds])}%) | CPU-time speedup "
              f"{min(cpu['sana']) / min(cpu['dcgen']):.2f}x ({100 * min(cpu['sana']) / min(cpu['dcgen']) / flop_ratio:.0f}%)")
    size = big
    tokens = results[size][0]
    parts = {k: sana_step_flop_parts(cfgs[k], tokens[k], a.text) for k in KINDS}
    print(f"[flops]    {size}x{size}, layers: {a.layers}, GFLOP by part (SANA / DC-Gen-SANA = ratio): " + "; ".join(
        f"{name} {parts['sana'][name] / 1e9:,.1f} / {parts['dcgen'][name] / 1e9:,.1f} = "
        f"{parts['sana'][name] / parts['dcgen'][name]:.2f}x" for name in parts["sana"]))
    print(f"wall time {time.perf_counter() - wall:.0f} s; {loadavg()}")


if __name__ == "__main__":
    main()
