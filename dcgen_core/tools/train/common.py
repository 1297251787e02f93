"""Training plumbing shared by the stages: options, device/precision, progress bars, the LR schedule, the batch
sampler and the step loop (optimizer, clipping, EMA, checkpoints, resume)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ...shared.errors import DCGenError
from .fsdp import SHARDINGS, clip_grad_norm_, is_sharded

log = logging.getLogger("dcgen.train")

OBJECTIVES = ("auto", "flow", "guidance-distilled")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Options common to every training stage (CLI: the flags of the same names)."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1  # per device (process) and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0
    checkpoint_every: int = 0  # 0: none before the end
    keep_checkpoints: int = 3  # 0: keep all
    resume: str | None = None  # None, "latest" or a checkpoint folder
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: str = "auto"  # auto: on with CUDA
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # the recipe merges an EMA of 0.999; 0 = off (the live weights are saved)
    objective: str = "auto"  # auto: guidance-distilled when the base has a guidance embedding
    guidance: float = 1.0  # guidance value for plain flow matching on a guidance-embedding base
    guidance_min: float = 1.0
    guidance_max: float = 14.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    overfit: bool = False  # the same batch, noise and timesteps every step (a sanity check)
    progress: bool = True
    sharding: str = "auto"  # none, fsdp (fsdp.py); auto: fsdp under `accelerate launch --use_fsdp`

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self):
        if self.steps < 0:
            raise DCGenError(f"--steps: expected 0 or more, found {self.steps}.")
        if self.batch_size < 1:
            raise DCGenError(f"--batch-size: expected 1 or more, found {self.batch_size}.")
        if self.grad_accum < 1:
            raise DCGenError(f"--gradient-accumulation: expected 1 or more, found {self.grad_accum}.")
        if self.lr <= 0:
            raise DCGenError(f"--lr: expected a positive learning rate, found {self.lr}.")
        if self.objective not in OBJECTIVES:
            raise DCGenError(f"--objective: expected one of {', '.join(OBJECTIVES)}, found {self.objective!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DCGenError(f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, found {self.lr_schedule!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DCGenError(f"--ema-decay: expected a value in [0, 1), found {self.ema_decay}.")
        if not 0 < self.guidance_min <= self.guidance_max:
            raise DCGenError(f"--guidance-range: expected 0 < min <= max, found {self.guidance_min}, "
                             f"{self.guidance_max}.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DCGenError(f"--precision: expected auto, fp32 or bf16, found {self.precision!r}.")
        if self.sharding not in SHARDINGS:
            raise DCGenError(f"--sharding: expected one of {', '.join(SHARDINGS)}, found {self.sharding!r}.")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise DCGenError(f"--gradient-checkpointing: expected auto, on or off, found "
                             f"{self.gradient_checkpointing!r}.")


@dataclass
class Runtime:
    """Where and how the model runs: frozen weights in ``dtype``, trainable ones always fp32; with bf16 the forward
    runs under autocast (CUDA; CPU for dry runs)."""

    device: torch.device
    dtype: torch.dtype
    gradient_checkpointing: bool
    procs: object = None  # distributed.Processes
    batch_size: int = 1
    grad_accum: int = 1
    sharding: str = "none"  # fsdp: the transformer's weights sharded over the processes (fsdp.py)

    @property
    def base_device(self) -> torch.device:
        """Where the frozen base is loaded: with FSDP on the CPU, each block's shard then moved to ``device``
        (no process ever holds the whole model on its GPU)."""
        return torch.device("cpu") if self.sharding == "fsdp" else self.device

    @property
    def global_batch(self) -> int:
        """Per-device batch x processes x accumulation: the items of one optimizer step."""
        return self.batch_size * self.procs.world * self.grad_accum

    @property
    def is_main(self) -> bool:
        return self.procs.is_main

    @property
    def autocast(self) -> bool:
        return self.dtype == torch.bfloat16

    def autocast_context(self):
        if self.autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return (f"{self.device} {'bf16 autocast' if self.autocast else 'fp32'}"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}; {self.procs.describe()}"
                f"{f', fsdp (weights sharded over {self.procs.world})' if self.sharding == 'fsdp' else ''}; "
                f"global batch {self.global_batch} = {self.batch_size} per device x {self.procs.world} processes x "
                f"{self.grad_accum} accumulation")


def check_outputs(outputs: list, inputs: dict):
    """Refuse when an output file would replace one of the run's inputs (``inputs``: what -> path); a stage that
    read its embedding from ``out/`` must not write its own embedding over it."""
    import os

    def same(a, b):
        a, b = os.path.realpath(a), os.path.realpath(b)
        return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))

    for out in outputs:
        for what, path in inputs.items():
            if isinstance(path, str) and same(out, path):
                raise DCGenError(f"{out}: expected an output path other than the {what} this run reads ({path}), "
                                 "found the same file. Write to another OUT folder or pass another --name.")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DCGenError(f"--device {name}: expected a CUDA device, found none (torch {torch.__version__}).")
    return device


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    from .distributed import processes
    from .fsdp import resolve_sharding

    procs = processes(cpu=cfg.device == "cpu")
    device = procs.device if (procs.device is not None and cfg.device == "auto") else resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        log.warning("--precision bf16 on %s: runs under CPU autocast (slow; meant for dry runs of the GPU setup).",
                    device)
    ckpt = cfg.gradient_checkpointing
    ckpt = (device.type == "cuda") if ckpt == "auto" else ckpt == "on"
    rt = Runtime(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                 gradient_checkpointing=ckpt, procs=procs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                 sharding=resolve_sharding(cfg.sharding, procs.world))
    if procs.is_main:
        print(f"training on {rt.describe()}", file=sys.stderr, flush=True)
    return rt


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar on stderr (a silent stand-in when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, initial=initial, unit=unit, file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm comes with diffusers/transformers
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def set_postfix(self, *args, **kwargs):
            pass

        def close(self):
            pass

    return _Silent()


def lr_at(step: int, total: int, base_lr: float, schedule: str, warmup: int) -> float:
    """The learning rate of (0-based) ``step``: linear warmup, then constant or cosine to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr


class BatchSampler:
    """Batch indices and the random draws of each step, from one seeded CPU generator.

    ``groups``: item indices per aspect-ratio bucket (or a count: one group). Each batch comes from one group, drawn
    with probability proportional to its size (no draw with one group). Within a group, epochs are seeded
    permutations; a batch larger than what is left of an epoch continues into the next. ``overfit``: the first
    batch and the same generator state every step (same noise, timesteps, guidance). The state (generator,
    permutations, positions) goes into checkpoints, so a resumed run continues identically.
    """

    def __init__(self, groups, batch_size: int, seed: int, overfit: bool = False):
        groups = [list(range(groups))] if isinstance(groups, int) else [list(g) for g in groups if len(g)]
        if not groups:
            raise DCGenError("training cache: expected at least one item, found none.")
        self.groups, self.batch_size, self.overfit = groups, batch_size, overfit
        self.count = sum(len(g) for g in groups)
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.tensor([float(len(g)) for g in groups], dtype=torch.float64)
        self.epochs = [0] * len(groups)
        self.perms = [torch.randperm(len(g), generator=self.generator) for g in groups]
        self.positions = [0] * len(groups)
        self._fixed = None
        if overfit:
            g = groups[0]
            self._fixed = ([g[int(i)] for i in (torch.arange(batch_size) % len(g))], self.generator.get_state())

    def next(self) -> tuple[list[int], torch.Generator]:
        if self._fixed is not None:
            indices, state = self._fixed
            self.generator.set_state(state)
            return list(indices), self.generator
        k = 0 if len(self.groups) == 1 else int(torch.multinomial(self.weights, 1, generator=self.generator))
        group, out = self.groups[k], []
        while len(out) < self.batch_size:
            if self.positions[k] >= len(group):
                self.epochs[k] += 1
                self.perms[k] = torch.randperm(len(group), generator=self.generator)
                self.positions[k] = 0
            take = min(self.batch_size - len(out), len(group) - self.positions[k])
            out.extend(group[int(i)] for i in self.perms[k][self.positions[k]:self.positions[k] + take])
            self.positions[k] += take
        return out, self.generator

    def state(self) -> tuple[dict, dict]:
        info = {"epochs": list(self.epochs), "positions": list(self.positions), "count": self.count,
                "groups": [len(g) for g in self.groups], "batch_size": self.batch_size}
        if len(self.groups) == 1:
            info.update(epoch=self.epochs[0], pos=self.positions[0])
        return ({"sampler.rng": self.generator.get_state(), "sampler.perm": torch.cat(self.perms)}, info)

    def load_state(self, tensors: dict, info: dict, source: str):
        sizes = [len(g) for g in self.groups]
        if info.get("count") != self.count or info.get("batch_size") != self.batch_size or \
                info.get("groups", [info.get("count")]) != sizes:
            raise DCGenError(f"{source}: expected a checkpoint of a run over {self.count} cached items in buckets of "
                             f"{sizes} with global batch {self.batch_size}, found {info.get('count')} items in "
                             f"{info.get('groups')}, global batch {info.get('batch_size')}. Resume with the same "
                             "cache and global batch (per-device batch x processes x accumulation).")
        self.generator.set_state(tensors["sampler.rng"])
        self.perms = [p.clone() for p in torch.split(tensors["sampler.perm"], sizes)]
        self.epochs = list(info.get("epochs", [info.get("epoch", 0)]))
        self.positions = list(info.get("positions", [info.get("pos", 0)]))


class EMA:
    """Exponential moving average of the trainable parameters (fp32)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]):
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter]):
        for k, p in params.items():
            p.copy_(self.shadow[k].to(p.dtype))


@dataclass
class Stage:
    """One optimisation stage: ``params`` (name -> parameter) trained for steps [start, end) of the run with
    ``loss_fn(indices, generator) -> loss``."""

    name: str
    params: dict
    loss_fn: object
    start: int
    end: int
    lr: float
    seed: int
    losses: list = field(default_factory=list)


def make_optimizer(params: dict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the same kernels (and so the same rounding) whatever the parameter count
    return torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=weight_decay, foreach=False)


def run_stage(stage: Stage, cfg: TrainConfig, cache, checkpoints=None, resume=None, on_step=None,
              saved_params: dict | None = None, extra_state: dict | None = None, rt: Runtime | None = None):
    """Train ``stage``; returns its EMA (or None). ``cache``: the training cache (its buckets) or an item count.
    ``checkpoints``: a :class:`~.state.CheckpointManager` (None: no checkpoint files; only the main process
    writes). ``resume``: a loaded checkpoint of this stage. ``saved_params``: every tensor a checkpoint keeps
    (defaults to the stage's parameters). ``on_step(step, loss, seconds)`` is called after each step.

    One optimizer step draws a global batch (per-device batch x processes x accumulation) and the random draws of
    all its items; each process computes ``loss_fn(indices, generator, part)`` on its micro-batches (``part``: a
    slice of ``indices``; the generator reset to the step's state for each, so the draws are those of the whole
    batch), gradients are summed over micro-steps and averaged over processes."""
    from .distributed import micro_slices, processes

    procs = rt.procs if rt is not None else processes()
    accum, per_device = cfg.grad_accum, cfg.batch_size
    global_batch = per_device * procs.world * accum
    params = stage.params
    saved_params = saved_params if saved_params is not None else params
    optimizer = make_optimizer(params, stage.lr, cfg.weight_decay)
    groups = cache.groups() if hasattr(cache, "groups") else cache
    sampler = BatchSampler(groups, global_batch, stage.seed, overfit=cfg.overfit)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    plist = list(params.values())
    # FSDP: every process takes part in gathering a checkpoint's shards; the main one alone writes
    checkpoints = checkpoints if procs.is_main or any(is_sharded(p) for p in [*plist, *saved_params.values()]) \
        else None
    step = stage.start
    if resume is not None:
        resume.load_params(saved_params)
        step = resume.restore(optimizer, sampler, ema, params)
    total = stage.end - stage.start
    bar = progress_bar(total, stage.name, cfg.progress and procs.is_main, initial=step - stage.start)
    ran = False
    try:
        while step < stage.end:
            lr = lr_at(step - stage.start, total, stage.lr, cfg.lr_schedule, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            indices, generator = sampler.next()
            start_state = generator.get_state()
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for part in micro_slices(global_batch, per_device, procs.world, procs.rank, accum):
                generator.set_state(start_state)
                loss = stage.loss_fn(indices, generator, part)
                if not torch.isfinite(loss):
                    raise DCGenError(f"{stage.name} step {step}: the loss is {loss.item()} (diverged). Lower --lr.")
                (loss / accum).backward()
                value += float(loss.detach()) / accum
            if procs.world > 1:
                for p in plist:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                procs.average_([p.grad for p in plist if not is_sharded(p.grad)])  # FSDP averaged the shards'
                value = procs.mean(value)
            if cfg.max_grad_norm > 0:
                clip_grad_norm_(plist, cfg.max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(params)
            stage.losses.append(value)
            step += 1
            ran = True
            if on_step is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                on_step(step, value, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", lr=f"{lr:.2g}")
            if checkpoints is not None and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 \
                    and step < stage.end:
                checkpoints.save(step, stage.name, saved_params, list(params), optimizer, sampler, ema,
                                 extra_state or {}, write=procs.is_main)
    finally:
        bar.close()
    # the end of a stage is always kept when checkpointing (live weights and EMA): a resumed run goes on with the
    # next stage, or with more steps of this one exactly as an uninterrupted run would
    if checkpoints is not None and cfg.checkpoint_every > 0 and ran:
        checkpoints.save(step, stage.name, saved_params, list(params), optimizer, sampler, ema, extra_state or {},
                         write=procs.is_main)
    procs.barrier()
    if ema is not None:  # the stage's result is the EMA (the recipe merges an EMA of the LoRA)
        ema.copy_to(params)
    return ema
