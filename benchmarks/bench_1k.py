"""DC-Gen-FLUX at 1K on this machine: speedup, sampling overhead, DC-AE decode.

Side by side in one run, on a reduced-depth FLUX of full width (hidden 3072,
24 heads, context 4096; random weights):

1. per-step time of base FLUX (16-ch latent /8, 2x2 patches: 4096 image tokens
   at 1024x1024) vs DC-Gen (DC-AE f32c32, 1x1 patches: 1024 tokens), both
   through ComfyUI's sampler, against the analytic FLOP ratio of the two token
   counts (text length printed);
2. our ComfyUI sampling path (KSampler internals, wrappers, model sampling) vs
   the bare ComfyUI FLUX forward on the same tensors, and vs diffusers'
   FluxTransformer2DModel forward on the same weights;
3. our DC-AE decode vs diffusers AutoencoderDC.decode, full-size SANA f32c32.

    python benchmarks/bench_1k.py [--double 1 --single 2 --text 512 --steps 3 --decode-size 1024]

Per-step times are marginal: (time of a 1+steps call - time of a 1-step call) / steps, the two calls
alternated, best of --repeats rounds; forwards are timed alternately, best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    CONTEXT,
    HIDDEN,
    POOLED,
    build_models,
    flux_step_flops,
    marginal,
    cpu_time,
    marginal_rounds,
    spread,
    timed_pair,
)

from dcgen_core.tools.headless import boot, comfyui_version_at  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--text", type=int, default=512, help="text tokens (T5 sequence length)")
    ap.add_argument("--steps", type=int, default=3, help="extra steps timed beyond a 1-step call")
    ap.add_argument("--repeats", type=int, default=2, help="rounds for the base/DC-Gen speed and diffusers rows")
    ap.add_argument("--overhead-rounds", type=int, default=5,
                    help="rounds of (1-step call, 1+steps call, bare forward) for the overhead row and its spread")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--decode-size", type=int, default=1024)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--only-decode", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="skip the base FLUX vs DC-Gen speed rows")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="overhead rounds timed by wall clock, or by this process's CPU time (steadier where other "
                         "work shares the cores)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.only_decode:
        return bench_decode(a.decode_size, max(a.repeats, 3))

    rt = boot(cpu=True)
    import comfy.sample
    import comfy.samplers

    from comfyui_dc_gen.dcgen_core.shared.embedding import AlignedEmbedding
    from comfyui_dc_gen.dcgen_core.flux.dcgen import apply_aligned_embedding
    from comfyui_dc_gen.dcgen_core.flux.comfy_model import build_comfy_flux

    ref, sd, cfg = build_models(a.double, a.single)
    base = build_comfy_flux(sd, cfg, "fp32", source="benchmark FLUX")
    g = torch.Generator().manual_seed(1)
    emb = AlignedEmbedding(0.02 * torch.randn(HIDDEN, 32, generator=g), torch.zeros(HIDDEN),
                           0.02 * torch.randn(32, HIDDEN, generator=g), torch.zeros(32), "benchmark embedding")
    dcgen = apply_aligned_embedding(base, emb)
    cond = [[torch.randn(1, a.text, CONTEXT, generator=g), {"pooled_output": torch.randn(1, POOLED, generator=g),
                                                           "guidance": 3.5}]]
    size, f = a.size, 32
    base_latent = torch.zeros(1, 16, size // 8, size // 8)
    dc_latent = torch.zeros(1, 32, size // f, size // f)

    def sample(model, latent, steps):
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                                   disable_pbar=True, seed=0)

    def per_step(model, latent):
        """Marginal time of one sampling step, and the fixed per-call setup (noise, conds, loading)."""
        step, setup, _ = marginal(lambda n: sample(model, latent, n), a.steps, a.repeats)
        return step, setup

    print(f"ComfyUI {comfyui_version_at(rt.path)} ({rt.path})")
    print(f"FLUX hidden {HIDDEN}, {a.double} double + {a.single} single blocks, fp32, CPU "
          f"({torch.get_num_threads()} threads); {size}x{size}; text length {a.text} tokens")
    base_tokens, dc_tokens = (size // 16) ** 2, (size // f) ** 2
    t_dc, _ = per_step(dcgen, dc_latent)
    if not a.skip_speed:
        t_base, _ = per_step(base, base_latent)
        flop_ratio = flux_step_flops(base_tokens, a.text, a.double, a.single, 64) / \
            flux_step_flops(dc_tokens, a.text, a.double, a.single, 32)
        speedup = t_base / t_dc
        print(f"[speed]    base FLUX   {base_tokens:5d} image tokens  {t_base * 1000:9.1f} ms/step")
        print(f"[speed]    DC-Gen f32  {dc_tokens:5d} image tokens  {t_dc * 1000:9.1f} ms/step")
        print(f"[speed]    speedup {speedup:.2f}x vs FLOP ratio {flop_ratio:.2f}x -> {100 * speedup / flop_ratio:.0f}% "
              f"of the FLOP ratio (target >= 90%)")
        full = flux_step_flops(base_tokens, a.text, 19, 38, 64) / flux_step_flops(dc_tokens, a.text, 19, 38, 32)
        print(f"[speed]    (full-size FLUX, 19+38 blocks, same text length: FLOP ratio {full:.2f}x)")

    # overhead: sampler path vs the bare ComfyUI FLUX forward vs diffusers
    import torch.nn.functional as F

    dm = base.model.diffusion_model
    x = torch.randn(1, 32, size // f, size // f, generator=g)
    ts = torch.tensor([0.7])
    context, y = cond[0][0], cond[0][1]["pooled_output"]
    guidance = torch.tensor([3.5])
    from comfyui_dc_gen.dcgen_core.shared.latent_space import linear_like

    bare_in = linear_like(dm.img_in, emb.img_in_weight, emb.img_in_bias, None)
    bare_out = linear_like(dm.final_layer.linear, emb.out_weight, emb.out_bias, None)
    orig_in, orig_out = dm.img_in, dm.final_layer.linear

    def bare():
        return F.pixel_unshuffle(dm(F.pixel_shuffle(x, 2), ts, context, y, guidance), 2)

    ref_dc = ref
    ref_dc.x_embedder = torch.nn.Linear(32, HIDDEN)
    ref_dc.proj_out = torch.nn.Linear(HIDDEN, 32)
    h = w = size // f
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    packed = x.permute(0, 2, 3, 1).reshape(1, h * w, 32)

    def diffusers_forward():
        return ref_dc(hidden_states=packed, timestep=ts, guidance=guidance, pooled_projections=y,
                      encoder_hidden_states=context, txt_ids=torch.zeros(a.text, 3), img_ids=ids.reshape(-1, 3),
                      return_dict=False)

    def swapped(fn):
        """``fn`` with the bare model's embedder/head swapped in (ours patches them per sampling call)."""
        def run():
            dm.img_in, dm.final_layer.linear = bare_in, bare_out
            try:
                return fn()
            finally:
                dm.img_in, dm.final_layer.linear = orig_in, orig_out
        return run

    t_bare, t_diff = timed_pair(swapped(bare), swapped(diffusers_forward), a.repeats)
    # overhead: each round times a 1-step call, a (1+steps)-step call and a bare forward back to back, so the
    # per-step overhead and the fixed per-call cost come with their spread over rounds
    one, many, bare_t = marginal_rounds(lambda n: sample(dcgen, dc_latent, n), a.steps, a.overhead_rounds,
                                        beside=swapped(bare), clock=cpu_time if a.clock == "cpu" else None)
    steps = [(m - o) / a.steps for o, m in zip(one, many)]
    fixed_ms = [1000 * (o - st) for o, st in zip(one, steps)]
    overhead_pct = [100 * (st / b - 1) for st, b in zip(steps, bare_t)]
    print(f"[overhead] bare ComfyUI FLUX forward       {t_bare * 1000:9.1f} ms (best of {a.repeats})")
    print(f"[overhead] our sampling path, per step     {t_dc * 1000:9.1f} ms (best of {a.repeats})")
    print(f"[overhead] per step vs the bare forward in the same round ({a.clock} clock): median (min..max) over "
          f"{len(one)} rounds {spread(overhead_pct)} % (target <= 3%)")
    print(f"[overhead] fixed cost once per sampling call (noise, conds, model load, wrappers; {a.clock} clock): "
          f"{spread(fixed_ms)} ms over {len(one)} rounds")

    print(f"[overhead] diffusers FluxTransformer2DModel {t_diff * 1000:9.1f} ms  -> ours/diffusers "
          f"{t_dc / t_diff:.2f}x")

    if not a.skip_decode:
        bench_decode(a.decode_size, max(a.repeats, 3))


@torch.inference_mode()  # as ComfyUI runs a VAE
def bench_decode(size: int, repeats: int):
    from diffusers import AutoencoderDC

    from dcgen_core.shared.dcae import DCAE, VARIANTS

    cfg = VARIANTS["dc-ae-f32c32-sana-1.1"]
    torch.manual_seed(0)
    theirs = AutoencoderDC(**cfg.to_diffusers_dict()).eval()
    ours = DCAE(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(1, 32, size // 32, size // 32)
    t_ours, t_theirs = timed_pair(lambda: ours.decode(z), lambda: theirs.decode(z), repeats)
    diff = (ours.decode(z) - theirs.decode(z).sample).abs().max().item()
    print(f"[decode]   DC-AE f32c32 (SANA 1.1, full size) {size}x{size}: ours {t_ours * 1000:.0f} ms, "
          f"diffusers {t_theirs * 1000:.0f} ms -> ours/diffusers {t_ours / t_theirs:.2f}x (target <= 1.0); "
          f"max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
