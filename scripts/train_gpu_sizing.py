"""GPU sizing of `python -m dcgen_core.train`: a few steps of each stage on a full-width FLUX with random weights.

    python scripts/train_gpu_sizing.py [--depth 2 --single-depth 4] [--resolution 1024] [--channels 32]
                                       [--batch-size 1] [--steps 3] [--rank 256] [--stages prepare,embed,head,...]
    python scripts/train_gpu_sizing.py --tiny      # dry run on CPU with tiny widths (checks the script itself)
    python scripts/train_gpu_sizing.py --estimate [--gpus 1 2 4 8 --tflops 989 --mfu 0.35] [--sharding none fsdp]
                                                   # the formulas below for full FLUX.1, no GPU (README's table)

Stages (the package's own code paths, bf16 autocast + gradient checkpointing as the CLI uses on CUDA):
  prepare      FLUX VAE encoder (full width) + DC-AE encoder (the variant of --channels) on one batch of images
  embed        embedder alignment (teacher tokens on base latents vs the new embedder)
  head         head training, DiT frozen (guidance-distilled objective)
  head+embed   head and embedder training (backprop through the frozen DiT)
  lora         PEFT LoRA of --rank on the recipe's targets + embedder/head (guidance-distilled objective)

Prints per stage: median step time after the first step, peak CUDA memory, and the weights' share. FLUX.1 has 19
double and 38 single blocks; the DiT stages grow about linearly with depth (give --depth/--single-depth to fit).
Exit status 2 without CUDA (unless --tiny or --estimate).

Formulas (--estimate; P base parameters, L LoRA + embedder/head parameters, n = image tokens + text tokens per
sample, F = forward FLOPs per sample (2 x multiply-adds of every linear + attention's QK^T and AV), b per-device
batch, N GPUs; data parallel, or FSDP with --sharding fsdp):

  memory per GPU  = 2 P (bf16 frozen weights) + 16 L (fp32 trained weights, gradients, AdamW m and v) [+ 4 L EMA]
                    + b * n * hidden * 2 B * (blocks + 12)   (gradient checkpointing: each block's bf16 input kept,
                    about 12 hidden-widths of one block's activations live while it is recomputed)
                    -- the same for every N: data parallelism replicates the model
                  FSDP: (2 P + 16 L) / N + the largest block gathered in bf16 + the same activations
  FLOPs per sample = head: 2 F (conditional forward; the frozen DiT needs no backward to reach the head; plus the
                    guidance-distilled objective's unconditional forward)
                    head+embed, lora: 5 F (forward, recomputation, backward 2 F, unconditional forward)
  step time       = b * FLOPs per sample / (peak bf16 FLOP/s x MFU) + all-reduce 2 (N - 1) / N * 4 L B / bandwidth
                  FSDP: + (N - 1) / N * (all-gathers of 2 P B, twice with recomputation + once per extra forward,
                    and reduce-scatter of 4 L B) / bandwidth (no overlap with compute assumed)
  images per second = N * b / step time; GPU-hours = steps * step time * N
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL_STAGES = ("prepare", "embed", "head", "head+embed", "lora")


def flux_config(args) -> dict:
    if args.tiny:
        return dict(patch_size=1, in_channels=64, num_layers=args.depth, num_single_layers=args.single_depth,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(patch_size=1, in_channels=64, num_layers=args.depth, num_single_layers=args.single_depth,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def dcae_config(args):
    from dcgen_core.shared.dcae import VARIANTS

    name = {32: "dc-ae-f32c32-sana-1.1", 128: "dc-ae-1.5-f64c128", 512: "dc-ae-f128c512-mix-1.0"}[args.channels]
    cfg = VARIANTS[name]
    if args.tiny:
        from dataclasses import replace

        n = cfg.num_stages
        widths = tuple(min(8 * 2 ** (i // 2), 64) for i in range(n - 1)) + (args.channels,)
        cfg = replace(cfg, encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                      encoder_layers_per_block=(1,) * n, decoder_layers_per_block=(1,) * n, attention_head_dim=8)
    return cfg


def flux_vae(args):
    from diffusers import AutoencoderKL

    from dcgen_core.tools.train.encoders import FLUX_VAE_CONFIG

    cfg = dict(FLUX_VAE_CONFIG)
    if args.tiny:
        cfg.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    return AutoencoderKL(**cfg)


def flux_counts(res: int, channels: int, rank: int, tokens: int, double: int = 19, single: int = 38,
                h: int = 3072, m: int = 12288, context: int = 4096) -> dict:
    """Parameters (base P, trained L), tokens n and forward FLOPs F per sample of FLUX.1 on a DC-AE latent."""
    f = {32: 32, 128: 64, 512: 128}[channels]
    img = (res // f) ** 2
    n = img + tokens
    per_double = 2 * (10 * h * h + 2 * h * m)  # img and txt: qkv, out, mlp in/out, adaLN (6 h)
    per_single = 7 * h * h + 2 * h * m  # linear1 (3h + m), linear2 (h + m -> h), adaLN (3 h)
    base = double * per_double + single * per_single
    lora_double = 2 * (4 * 2 * h * rank + 2 * (h + m) * rank)  # q/k/v/out + ff in/out, image and context sides
    lora_single = 3 * 2 * h * rank + (h + m) * rank + (h + m + h) * rank  # q/k/v, proj_mlp, proj_out
    trained = double * lora_double + single * lora_single + 2 * channels * h + h + channels  # + embedder, head
    linear = double * (img + tokens) * (4 * h * h + 2 * h * m) + single * n * (h * (3 * h + m) + (h + m) * h)
    linear += img * 2 * h * channels + tokens * context * h
    attention = (double + single) * 2 * n * n * h
    return {"P": base, "L": trained, "n": n, "img": img, "F": 2.0 * (linear + attention), "blocks": double + single,
            "h": h, "block": max(per_double, per_single)}


def estimate(args) -> int:
    res = args.resolution or 1024
    rank = args.rank or 256
    tokens = args.text_tokens or 512
    c = flux_counts(res, args.channels, rank, tokens)
    b = args.batch_size
    gib = 2 ** 30
    weights = 2 * c["P"] / gib
    trained = 16 * c["L"] / gib
    acts = b * c["n"] * c["h"] * 2 * (c["blocks"] + 12) / gib
    print(f"FLUX.1 ({c['P'] / 1e9:.2f} B parameters), {res}x{res}, DC-AE C={args.channels} ({c['img']} image + "
          f"{tokens} text tokens), LoRA rank {rank} ({c['L'] / 1e6:.0f} M trained), per-device batch {b}; "
          f"{args.tflops:g} TFLOP/s peak x MFU {args.mfu:g}, all-reduce {args.bandwidth:g} GB/s. Formula estimates, "
          "not measurements.")
    print(f"{'stage':<11} {'sharding':>8} {'GPUs':>4} {'memory/GPU GiB':>15} {'step s':>8} {'images/s':>9} "
          f"{'GPU-h per 10k steps':>20}")
    for stage, mult, gathers in (("head", 2, 2), ("head+embed", 5, 4), ("lora", 5, 4)):
        trained_bytes = c["L"] if stage == "lora" else 2 * args.channels * c["h"]
        compute = b * mult * c["F"] / (args.tflops * 1e12 * args.mfu)
        for sharding in args.sharding:
            for n_gpu in args.gpus:
                if sharding == "fsdp" and n_gpu == 1:
                    continue  # one process trains unsharded
                share = (n_gpu - 1) / n_gpu
                if sharding == "fsdp":
                    mem = (weights + 16 * trained_bytes / gib) / n_gpu + 2 * c["block"] / gib + acts
                    # all-gathers of the bf16 weights per forward pass (gathers: forwards + recomputation), the
                    # reduce-scatter of the fp32 gradients of the trained tensors
                    comm = share * (gathers * 2 * c["P"] + 4 * trained_bytes) / (args.bandwidth * 1e9)
                else:
                    mem = weights + 16 * trained_bytes / gib + acts
                    comm = 2 * share * 4 * trained_bytes / (args.bandwidth * 1e9)
                t = compute + comm
                print(f"{stage:<11} {sharding:>8} {n_gpu:>4} {mem:>15.1f} {t:>8.3f} {n_gpu * b / t:>9.2f} "
                      f"{10000 * t * n_gpu / 3600:>20.1f}")
    return 0


class Meter:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> float:
        return self.torch.cuda.memory_allocated() / 2 ** 30 if self.cuda else 0.0

    def peak(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="dry run on CPU with tiny widths")
    ap.add_argument("--depth", type=int, default=2, help="double blocks (FLUX.1: 19)")
    ap.add_argument("--single-depth", type=int, default=4, help="single blocks (FLUX.1: 38)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default 1024; --tiny 128)")
    ap.add_argument("--channels", type=int, default=32, choices=(32, 128, 512), help="DC-AE latent channels")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default 256; --tiny 4)")
    ap.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; --tiny 7)")
    ap.add_argument("--stages", default=",".join(ALL_STAGES))
    ap.add_argument("--estimate", action="store_true", help="print the formulas' table for full FLUX.1 (no GPU)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="--estimate: GPU counts")
    ap.add_argument("--tflops", type=float, default=989.0, help="--estimate: peak dense bf16 TFLOP/s (H100 SXM 989)")
    ap.add_argument("--mfu", type=float, default=0.35, help="--estimate: model FLOP utilisation assumed")
    ap.add_argument("--bandwidth", type=float, default=100.0, help="--estimate: all-reduce bus GB/s per GPU")
    ap.add_argument("--sharding", nargs="+", default=["none", "fsdp"], choices=("none", "fsdp"),
                    help="--estimate: rows for data parallelism (none) and FSDP")
    args = ap.parse_args(argv)
    if args.estimate:
        return estimate(args)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("train_gpu_sizing: needs a CUDA GPU (or --tiny for a CPU dry run).", file=sys.stderr)
        return 2
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        print(f"--stages: expected some of {', '.join(ALL_STAGES)}, found {bad}", file=sys.stderr)
        return 1
    res = args.resolution or (128 if args.tiny else 1024)
    rank = args.rank or (4 if args.tiny else 256)
    tokens = args.text_tokens or (7 if args.tiny else 512)
    device = torch.device("cpu" if args.tiny else "cuda")
    logging.getLogger("dcgen.train").setLevel(logging.ERROR)  # (--tiny: the bf16-on-CPU notice, once per stage)
    dtype = torch.bfloat16
    meter = Meter(torch, device)

    from dcgen_core.shared.dcae import DCAE
    from dcgen_core.tools.train.alignment import align
    from dcgen_core.tools.train.common import TrainConfig
    from dcgen_core.tools.train.encoders import BaseVAE, DCAEEncoder
    from dcgen_core.tools.train.cache import MemoryCache
    from dcgen_core.tools.train.finetune import train_lora
    from dcgen_core.tools.train.model import new_linear, random_base_transformer

    cfg_flux = flux_config(args)
    dc_cfg = dcae_config(args)
    f = dc_cfg.spatial_compression
    if res % f:
        print(f"--resolution {res}: expected a multiple of the DC-AE's f{f}", file=sys.stderr)
        return 1
    rows = []

    def report(stage, times, peak, note=""):
        t = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else float("nan"))
        rows.append((stage, len(times), t, peak, note))
        mem = f"peak {peak:7.2f} GiB" if device.type == "cuda" else "peak     n/a"
        print(f"{stage:<11} steps {len(times):>2}  step {t:8.3f} s  {mem}  {note}", flush=True)

    print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), "
          f"{'tiny' if args.tiny else 'full-width'} FLUX {args.depth} double + {args.single_depth} single blocks, "
          f"{res}x{res}, DC-AE {dc_cfg.variant} (C={args.channels}, f{f}), batch {args.batch_size}, "
          f"rank {rank}, {tokens} text tokens", flush=True)

    g = torch.Generator().manual_seed(0)
    n = max(2, args.batch_size)
    h = res // f
    hidden = cfg_flux["num_attention_heads"] * cfg_flux["attention_head_dim"]
    cache = MemoryCache({
        "base_latents": torch.randn(n, 16, res // 8, res // 8, generator=g),
        "dcae_latents": torch.randn(n, args.channels, h, h, generator=g),
        "context": torch.randn(n, tokens, cfg_flux["joint_attention_dim"], generator=g).to(torch.bfloat16),
        "pooled": torch.randn(n, cfg_flux["pooled_projection_dim"], generator=g)},
        null_text=(torch.randn(tokens, cfg_flux["joint_attention_dim"], generator=g),
                   torch.randn(cfg_flux["pooled_projection_dim"], generator=g)))

    if "prepare" in stages:
        meter.reset()
        with torch.device(device):
            vae = BaseVAE.from_model(flux_vae(args), device, dtype)
            dc = DCAEEncoder(None, "auto", device, dtype, model=DCAE(dc_cfg).to(dtype).eval().requires_grad_(False))
        images = torch.rand(args.batch_size, 3, res, res, generator=g) * 2 - 1
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            b, d = vae.encode(images), dc.encode(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert b.shape[1:] == (16, res // 8, res // 8) and d.shape[1:] == (args.channels, h, h)
        report("prepare", times, meter.peak(), f"{args.batch_size} image(s) per step, both encoders")
        del vae, dc
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meter.reset()
    t0 = time.perf_counter()
    model = random_base_transformer(cfg_flux, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    weights = meter.allocated()
    print(f"base model: {params / 1e9:.3f} B parameters, {weights:.2f} GiB on the device, built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    base_in, base_out = model.x_embedder, model.proj_out
    # --tiny runs the GPU setup itself (bf16 weights, autocast, gradient checkpointing), under CPU autocast
    common = dict(batch_size=args.batch_size, progress=False, device=str(device), precision="bf16",
                  gradient_checkpointing="on")

    def restore():
        model.x_embedder, model.proj_out = base_in, base_out
        model.register_to_config(in_channels=64, out_channels=64)

    for stage, kw in (("embed", dict(embed_steps=args.steps, cfg=TrainConfig(steps=0, **common))),
                      ("head", dict(embed_steps=0, cfg=TrainConfig(steps=args.steps, **common))),
                      ("head+embed", dict(embed_steps=0, train_embedder=True,
                                          cfg=TrainConfig(steps=args.steps, **common)))):
        if stage not in stages:
            continue
        restore()
        meter.reset()
        times = []
        align(cache, model, None, channels=args.channels, on_step=lambda s, loss, dt, t=times: t.append(dt), **kw)
        report(stage, times, meter.peak(), f"weights {weights:.2f} GiB")
    if "lora" in stages:
        restore()
        embedder, head = new_linear(args.channels, hidden), new_linear(hidden, args.channels)
        emb = {"x_embedder.weight": embedder.weight.detach(), "x_embedder.bias": embedder.bias.detach(),
               "proj_out.weight": head.weight.detach(), "proj_out.bias": head.bias.detach()}
        meter.reset()
        times = []
        r = train_lora(cache, model, emb, None, rank=rank, alpha=rank, on_step=lambda s, loss, dt: times.append(dt),
                       cfg=TrainConfig(steps=args.steps, **common))
        lora = sum(p.numel() for n_, p in r.model.named_parameters() if ".lora_" in n_)
        trained = {str(p.dtype) for n_, p in r.model.named_parameters()
                   if ".lora_" in n_ or n_.startswith(("x_embedder.", "proj_out."))}
        frozen = {str(p.dtype) for n_, p in r.model.named_parameters()
                  if not (".lora_" in n_ or n_.startswith(("x_embedder.", "proj_out.")))}
        report("lora", times, meter.peak(), f"{lora / 1e6:.1f} M LoRA parameters (rank {rank}), objective "
                                            f"{r.objective}, trained {sorted(trained)}, frozen {sorted(frozen)}")
    print("summary:", "; ".join(f"{s}: {t:.3f} s/step, {p:.2f} GiB" for s, _, t, p, _ in rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
