"""DC-Gen post-training for FLUX and SANA.

    python -m dcgen_core.train prepare DATA_DIR CACHE --dcae PATH [--base-vae PATH]
        (--text-encoder FLUX_OR_SANA_PIPELINE_DIR | --text-embeddings-from FILE|hash:D,P,T) [--resolution 1024]
        [--family auto|flux|sana]   (SANA: --base-vae its DC-AE f32c32, Gemma-2 context + mask, hash:D,0,T)
    python -m dcgen_core.train align CACHE BASE_TRANSFORMER OUT --channels C [--mode upsample|pool|mean|sum]
        [--embed-steps N --embed-lr LR --embed-solver adam|lstsq] [--steps N --lr LR] [--train-embedder]
    python -m dcgen_core.train lora CACHE BASE_TRANSFORMER EMBEDDING OUT [--rank 256 --alpha 256] [--embed-in-lora]
        (align / lora: the base transformer decides the family, FLUX or SANA, and the cache must be of the same;
        SANA: --channels 128 for DC-AE-1.5 f64c128, flow matching with the base's flow shift, no guidance objective)

Every stage also runs under `accelerate launch --multi_gpu --num_processes N -m dcgen_core.train ...` (data
parallel over GPUs, or CPU processes over gloo with --device cpu; only the main process writes and prints).
--sharding fsdp (or `accelerate launch --use_fsdp ...`) also shards the transformer's weights over the processes
(torch FSDP2, one unit per block: each process holds ~1/N of the base and the LoRA; checkpoints and outputs
stay whole tensors, resumable with any process count, sharded or not).

Common training flags: --steps --lr --batch-size --gradient-accumulation --seed --checkpoint-every N --resume [CHECKPOINT] --device
--precision --gradient-checkpointing --lr-schedule --ema-decay --objective --sharding --no-progress. bf16 autocast and
gradient checkpointing on CUDA, fp32 on CPU. Checkpoints: OUT/checkpoints/step-NNNNNNNN (safetensors + JSON).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ...shared.errors import DCGenError


def _add_common(p: argparse.ArgumentParser, steps: int, lr: float, steps_help: str):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=steps_help + f" (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (AdamW; default {lr})")
    g.add_argument("--batch-size", type=int, default=1, help="per device (process) and micro-step (default 1)")
    g.add_argument("--gradient-accumulation", type=int, default=1, metavar="N",
                   help="micro-steps per optimizer step; global batch = batch size x processes x N (printed at "
                        "start; a checkpoint resumes with any split of the same global batch)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data order, noise, timesteps, guidance")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint every N steps (and at each stage's end); 0: none")
    g.add_argument("--keep-checkpoints", type=int, default=3, metavar="N", help="keep the last N (0: all)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from OUT's latest checkpoint, or the checkpoint folder given")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA (frozen weights bf16, trained ones fp32), fp32 on CPU")
    g.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="auto: on with CUDA")
    g.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the trained weights, saved instead of the live ones (the recipe: 0.999); 0: off")
    g.add_argument("--objective", default="auto", choices=("auto", "flow", "guidance-distilled"),
                   help="auto: guidance-distilled when the base has a guidance embedding (FLUX.1-dev/Krea)")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="guidance embedding value for --objective flow on a guidance-distilled base")
    g.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 14.0), metavar=("MIN", "MAX"),
                   help="w ~ U[MIN, MAX] of the guidance-distilled objective")
    g.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal timestep mean")
    g.add_argument("--logit-std", type=float, default=1.0, help="logit-normal timestep std")
    g.add_argument("--overfit", action="store_true",
                   help="sanity check: the same batch, noise and timesteps every step (the loss should collapse)")
    g.add_argument("--name", default="dcgen", help="output file prefix: NAME-embedding / NAME-lora .safetensors")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--sharding", default="auto", choices=("auto", "none", "fsdp"),
                   help="fsdp: shard the transformer's weights (frozen base, LoRA) over the processes of an "
                        "accelerate launch (torch FSDP2, per block); none: every process holds the whole model "
                        "(data parallel); auto (default): fsdp under `accelerate launch --use_fsdp`, else none")


def _config(args):
    from .common import TrainConfig

    return TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.gradient_accumulation,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        device=args.device, precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, ema_decay=args.ema_decay, objective=args.objective,
        guidance=args.guidance, guidance_min=args.guidance_range[0], guidance_max=args.guidance_range[1],
        logit_mean=args.logit_mean, logit_std=args.logit_std, overfit=args.overfit, progress=not args.no_progress,
        sharding=args.sharding)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dcgen_core.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="image folder + captions -> latent cache")
    p.add_argument("data_dir", help="folder of images (png/jpg/webp) each with a caption file of the same stem (.txt)")
    p.add_argument("out", help="cache folder to write (shards + index.json)")
    p.add_argument("--dcae", required=True, help="the DC-AE (file or diffusers folder; any variant the pack loads)")
    p.add_argument("--dcae-variant", default="auto", help="DC-AE variant name when the file does not tell")
    p.add_argument("--base-vae", help="the base model's VAE (diffusers folder or file): FLUX's AutoencoderKL (16 ch) "
                                      "or SANA's DC-AE f32c32: the alignment teacher's latents (needed by align, "
                                      "not by lora)")
    p.add_argument("--text-encoder", help="diffusers pipeline folder: FLUX (text_encoder(_2)/tokenizer(_2)) or SANA "
                                          "(text_encoder/ Gemma-2, tokenizer/)")
    p.add_argument("--text-embeddings-from", metavar="FILE|hash:D,P,T",
                   help="precomputed embeddings (safetensors: FLUX <name>.context/.pooled and __null__.*; SANA "
                        "<name>.context and optional <name>.context_mask) or hash:D,P,T, a deterministic stand-in "
                        "encoder (tests, dry runs; P = 0: SANA's)")
    p.add_argument("--family", default="auto", choices=("auto", "flux", "sana"),
                   help="the base model: auto (from the text encoder folder, hash spec or embeddings file)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens (default: FLUX's T5 512, SANA's Gemma-2 300)")
    p.add_argument("--resolution", default="1024",
                   help="N or WxH: the area of every bucket (and a bucket itself); images are resized to cover their "
                        "bucket and centre-cropped")
    p.add_argument("--buckets", default="auto",
                   help="aspect-ratio buckets on the DC-AE grid: auto (area <= the resolution's, aspect <= "
                        "--max-aspect), none (the resolution only) or WxH,WxH,...")
    p.add_argument("--max-aspect", type=float, default=2.0, help="largest aspect ratio of an auto bucket (default 2)")
    p.add_argument("--strict", action="store_true",
                   help="refuse the folder when any image is bad (default: list the bad ones and skip them)")
    p.add_argument("--max-pixels", type=int, default=8192 * 8192,
                   help="largest image (width x height from its header) accepted (default 8192^2)")
    p.add_argument("--batch-size", type=int, default=4, help="images encoded at once")
    p.add_argument("--shard-size", type=int, default=256, help="items per shard file")
    p.add_argument("--text-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("align", help="embedding alignment: fit the embedder, then train the head")
    p.add_argument("cache")
    p.add_argument("base_transformer", help="the base FLUX or SANA transformer (file or diffusers folder; SANA also "
                                            "original NVlabs keys): it decides the family")
    p.add_argument("out", help="output folder (embedding file, checkpoints)")
    p.add_argument("--channels", type=int, required=True, help="DC-AE latent channels (32 f32c32, 128 f64c128)")
    p.add_argument("--mode", default="upsample", choices=("upsample", "pool", "mean", "sum"),
                   help="grid matching: bilinear upsampling of the student (default), teacher average-pooling, "
                        "global mean, or the sum of the three")
    p.add_argument("--embed-steps", type=int, default=1000, help="embedder alignment steps (default 1000)")
    p.add_argument("--embed-lr", type=float, default=1e-3, help="embedder alignment learning rate (default 1e-3)")
    p.add_argument("--embed-solver", default="adam", choices=("adam", "lstsq"),
                   help="adam: the recipe's MSE training; lstsq: the exact minimiser of the same loss in one pass")
    p.add_argument("--train-embedder", action="store_true", help="also train the embedder in the head stage")
    _add_common(p, steps=1000, lr=1e-4, steps_help="head-training steps")

    p = sub.add_parser("lora", help="LoRA fine-tuning with the embedder and head trained fully")
    p.add_argument("cache")
    p.add_argument("base_transformer", help="the base FLUX or SANA transformer align was given")
    p.add_argument("embedding", help="the aligned embedding (from align)")
    p.add_argument("out", help="output folder (LoRA, embedding, checkpoints)")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--alpha", type=float, default=256.0)
    p.add_argument("--embed-in-lora", action="store_true", help="the LoRA file also carries the embedder/head")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the saved LoRA matrices (the embedding is always float32)")
    _add_common(p, steps=2000, lr=1e-4, steps_help="LoRA steps")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import close_processes, processes

    procs = processes(cpu=getattr(args, "device", "auto") == "cpu")
    # logs come from the main process; the others report only warnings and errors
    logging.basicConfig(level=logging.INFO if procs.is_main else logging.WARNING, format="%(message)s")
    try:
        return _run(args, procs)
    finally:
        close_processes()


def _run(args, procs) -> int:
    say = print if procs.is_main else (lambda *a, **k: None)
    try:
        if args.command == "prepare":
            from .data import prepare

            if not procs.is_main:  # one process encodes the cache (the others wait for it)
                procs.barrier()
                return 0
            try:
                index = prepare(args.data_dir, args.out, dcae=args.dcae, base_vae=args.base_vae,
                                dcae_variant=args.dcae_variant, text_encoder=args.text_encoder,
                                text_embeddings_from=args.text_embeddings_from, resolution=args.resolution,
                                batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                                text_dtype=args.text_dtype, max_sequence_length=args.max_sequence_length,
                                progress=not args.no_progress, buckets=args.buckets, max_aspect=args.max_aspect,
                                strict=args.strict, max_pixels=args.max_pixels, family=args.family)
            finally:  # the waiting processes are released also when prepare fails
                procs.barrier()
            print(f"cache: {index}")
        elif args.command == "align":
            from .alignment import align

            r = align(args.cache, args.base_transformer, args.out, channels=args.channels, mode=args.mode,
                      embed_steps=args.embed_steps, embed_lr=args.embed_lr, solver=args.embed_solver,
                      train_embedder=args.train_embedder, cfg=_config(args), name=args.name)
            say(f"embedding: {r.embedding_path} (objective {r.objective})")
        else:
            from .finetune import train_lora

            r = train_lora(args.cache, args.base_transformer, args.embedding, args.out, rank=args.rank,
                           alpha=args.alpha, embed_in_lora=args.embed_in_lora, save_dtype=args.save_dtype,
                           cfg=_config(args), name=args.name)
            say(f"lora: {r.lora_path}\nembedding: {r.embedding_path} (objective {r.objective})")
    except DCGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cli():
    """``python -m dcgen_core.train``: exits with main()'s status. A process of an ``accelerate launch`` ends with
    ``os._exit`` once its output is flushed: torch's teardown of the distributed runtime at interpreter exit can
    abort a process whose work is done (SIGABRT, "terminate called without an active exception", seen about once in
    ten 2-process FSDP runs on CPU), which the launcher then reports as a failed run."""
    code = main()
    from .distributed import launched_distributed

    if launched_distributed():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
