"""DC-Gen-Qwen-Image-Edit vs Qwen-Image-Edit at 1024x1024 on this machine: tokens, per-step time, speedup against the
FLOP ratio.

Side by side in one run, Qwen-Image-Edit's transformer at full width (hidden 3072 = 24 heads x 128, text 3584,
MLP ratio 4) and reduced depth (--layers blocks; random weights, fp32, CPU), built through ComfyUI by the pack's
``build_comfy_qwen_image`` (core's QwenImageTransformer2DModel, BaseModel and model patcher; both hold the same
block weights, only the embedder and head differ), in its two latent spaces:

- Qwen-Image-Edit: the Wan VAE (16 channels at 1/8) in 2x2 patches: one token per 16x16 px; at 1024x1024 4,096
  noise tokens + 4,096 reference tokens;
- DC-Gen-Qwen-Image-Edit: DC-AE f32c32 in 1x1 patches (the pack's token view and the authors' positions): one token
  per 32x32 px; 1,024 + 1,024 tokens.

One step = one diffusion-model call as a sampler makes it (``mm.load_models_gpu`` then ``apply_model`` with the
reference latent and the wrappers core merges in), batch 1 (true CFG doubles both alike), --text text tokens
(default 1,400: the edit template with the ~1,369 Qwen2.5-VL vision tokens of a 1 MP reference). The models are
timed alternately (order swapped each round, one untimed warm-up call each first), --repeats rounds; reported: best
and median (min..max) wall time, the speedup best/best and per round, process CPU time. FLOPs are analytic:
per block and token 12 D^2 multiply-adds (q, k, v, out and the 4x MLP, image and text streams alike), joint
attention 2 N^2 D, plus embedders and head; modulation, norms and RoPE not counted.

    python benchmarks/bench_qwen_edit.py [--layers 1 --size 1024 --repeats 2 --text 1400]
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

HIDDEN, HEADS, HEAD_DIM, TEXT_DIM, FULL_LAYERS = 3072, 24, 128, 3584, 60
KINDS = {  # latent channels, spatial compression, patch, label
    "base": (16, 8, 2, "Qwen-Image-Edit (Wan, 2x2)"),
    "dcgen": (32, 32, 1, "DC-Gen-Qwen-Image-Edit (f32c32)"),
}
SIGMA = 0.6


def step_flops(img_tokens: int, txt_tokens: int, layers: int, in_features: int) -> float:
    n = img_tokens + txt_tokens
    macs = layers * (n * 12 * HIDDEN * HIDDEN + 2 * n * n * HIDDEN)
    macs += img_tokens * 2 * in_features * HIDDEN + txt_tokens * TEXT_DIM * HIDDEN
    return 2.0 * macs


def build_models(layers: int):
    import comfy.ldm.qwen_image.model as qm
    import comfy.ops

    from dcgen_core.qwen_image.dcgen import install_latent_space
    from dcgen_core.qwen_image.comfy_model import build_comfy_qwen_image
    from dcgen_core.qwen_image.keys import QwenImageConfig
    from dcgen_core.shared.latent_space import DEFAULT_SCALING

    shared, models = None, {}
    for kind, (channels, _, patch, label) in KINDS.items():
        cfg = QwenImageConfig(in_features=channels * patch * patch, out_features=channels * patch * patch,
                              num_layers=layers, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                              joint_attention_dim=TEXT_DIM, axes_dims_rope=(16, 56, 56), patch_size=patch)
        with torch.device("meta"):
            ref = qm.QwenImageTransformer2DModel(operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                                 **{k: v for k, v in cfg.comfy_kwargs().items() if k != "image_model"})
        ref.to_empty(device="cpu")
        sd = dict(randomize_module_(ref).state_dict())
        del ref
        if shared is None:
            shared = {k: v for k, v in sd.items() if not k.startswith(("img_in.", "proj_out."))}
        else:
            sd.update(shared)
        m = build_comfy_qwen_image(sd, cfg, "fp32", f"benchmark {label}")
        if kind == "dcgen":
            install_latent_space(m, DEFAULT_SCALING[32], own_model=True)
        models[kind] = m
        del sd
        gc.collect()
    return models


def make_step(model, size: int, channels: int, f: int, text: int):
    import comfy.model_management as mm
    import comfy.patcher_extension

    g = torch.Generator().manual_seed(size)
    shape = (1, channels, size // f, size // f) if channels == 32 else (1, channels, 1, size // f, size // f)
    x, ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    context = torch.randn(1, text, TEXT_DIM, generator=g)
    sigma = torch.tensor([SIGMA])
    options = dict(model.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)

    def step():
        mm.load_models_gpu([model])
        out = model.model.apply_model(x, sigma, c_crossattn=context, ref_latents=[ref], transformer_options=options)
        assert out.shape == x.shape
        return out

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help=f"blocks built and timed (full size: {FULL_LAYERS})")
    ap.add_argument("--size", type=int, default=1024, help="output and reference side (a multiple of 64)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timing rounds (after one warm-up call each)")
    ap.add_argument("--text", type=int, default=1400, help="text tokens (template + vision tokens of the reference)")
    a = ap.parse_args()
    if a.layers < 1 or a.repeats < 1 or a.text < 1 or a.size % 64 or a.size <= 0:
        ap.error("expected --layers, --repeats, --text >= 1 and a size that is a multiple of 64")
    torch.set_grad_enabled(False)
    wall = time.perf_counter()
    rt = boot(cpu=True)
    models = build_models(a.layers)
    print(f"ComfyUI {comfyui_version_at(rt.path)} ({rt.path}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {loadavg()}")
    print(f"Qwen-Image width: hidden {HIDDEN} ({HEADS} x {HEAD_DIM}), text {TEXT_DIM}; {a.layers} of {FULL_LAYERS} "
          f"layers, random weights, fp32, CPU, built by build_comfy_qwen_image; batch 1, {a.text} text tokens, "
          f"output and reference {a.size}x{a.size}; {a.repeats} alternating rounds after a warm-up")
    tokens = {k: 2 * (a.size // f // p) ** 2 for k, (_, f, p, _) in KINDS.items()}  # noise + reference
    steps = {k: make_step(models[k], a.size, ch, f, a.text) for k, (ch, f, _, _) in KINDS.items()}
    warm = {k: clocks(steps[k])[0] for k in KINDS}
    print("[warm-up]  " + ", ".join(f"{KINDS[k][3]} {warm[k]:.1f} s" for k in KINDS) + f"; {loadavg()}", flush=True)
    times, cpu = {k: [] for k in KINDS}, {k: [] for k in KINDS}
    for r in range(a.repeats):
        for k in (list(KINDS) if r % 2 == 0 else list(reversed(KINDS))):
            w, c = clocks(steps[k])
            times[k].append(w)
            cpu[k].append(c)
    flops = {k: step_flops(tokens[k], a.text, a.layers, ch * p * p) for k, (ch, _, p, _) in KINDS.items()}
    full = {k: step_flops(tokens[k], a.text, FULL_LAYERS, ch * p * p) for k, (ch, _, p, _) in KINDS.items()}
    for k, (ch, f, p, label) in KINDS.items():
        print(f"[step]     {label:32s} {tokens[k]:6,d} image tokens (+{a.text} text) {flops[k] / 1e12:7.3f} TFLOP  "
              f"best {min(times[k]) * 1000:9,.0f} ms  median {med_range(times[k], 1000)} ms  "
              f"({flops[k] / min(times[k]) / 1e9:.0f} GFLOP/s; CPU best {min(cpu[k]):,.1f} s)")
    speed = min(times["base"]) / min(times["dcgen"])
    rounds = [b / d for b, d in zip(times["base"], times["dcgen"])]
    ratio, full_ratio = flops["base"] / flops["dcgen"], full["base"] / full["dcgen"]
    print(f"[speedup]  {a.size}x{a.size}: {speed:.2f}x (best/best; per round {med_range(rounds, fmt='{:.2f}')}x) | "
          f"image tokens {tokens['base'] / tokens['dcgen']:.0f}x | FLOP ratio {ratio:.3f}x ({FULL_LAYERS} layers: "
          f"{full_ratio:.3f}x) | speedup / FLOP ratio {100 * speed / ratio:.0f}% (per round "
          f"{med_range([100 * x / ratio for x in rounds])}%) | CPU-time speedup "
          f"{min(cpu['base']) / min(cpu['dcgen']):.2f}x ({100 * min(cpu['base']) / min(cpu['dcgen']) / ratio:.0f}%)")
    print(f"wall time {time.perf_counter() - wall:.0f} s; {loadavg()}")


if __name__ == "__main__":
    main()
