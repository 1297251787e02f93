"""Processes: one (``python -m dcgen_core.train``) or several under ``accelerate launch`` (Hugging Face accelerate:
its process group, device placement, collectives; DDP's data-parallel rule).

``accelerate launch --multi_gpu --num_processes N -m dcgen_core.train ...`` starts N processes (one per GPU; on a
machine without CUDA, or with ``--device cpu``, N CPU processes over gloo). Note: accelerate's ``--cpu`` launcher
starts a single process (several only through mpirun), so CPU data parallelism is launched with ``--multi_gpu``.

Every process holds the whole trained state (embedder/head, LoRA, optimizer, EMA, sampler), draws the same global
batch from the same seeded generator and computes its share of it; gradients are averaged over the processes
(``accelerate.utils.reduce``, the all-reduce DDP does) before clipping and the optimizer step, so the state stays
identical everywhere and the result equals a one-process run of the same global batch (up to float rounding).
Only the main process writes files and shows progress and logs. A checkpoint holds nothing per process, so a run
resumes with another process count as long as the global batch (per-device batch x processes x accumulation)
is the same.

With ``--sharding fsdp`` (fsdp.py) the transformer's weights are sharded instead of replicated: FSDP reduces the
sharded gradients itself, and :meth:`Processes.average_` is left the whole ones (the embedder/head).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("dcgen.train")


def launched_distributed() -> bool:
    """True under ``accelerate launch`` / torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Processes:
    """The process group as the training loop sees it."""

    def __init__(self, cpu: bool = False):
        self.state = None
        self.world, self.rank = 1, 0
        if launched_distributed():
            from accelerate import PartialState

            env_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
            # CPU processes (gloo): --device cpu, accelerate's --cpu, or no CUDA at all
            self.state = PartialState(cpu=cpu or env_cpu or not torch.cuda.is_available())
            self.world, self.rank = self.state.num_processes, self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.state.device if self.state is not None else None

    def describe(self) -> str:
        if self.state is None:
            return "1 process"
        return f"{self.world} processes ({self.state.distributed_type}, {self.state.backend or 'no backend'})"

    def average_(self, tensors: list[torch.Tensor]):
        """In place: every tensor becomes its mean over the processes (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        from accelerate.utils import reduce

        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        flat = reduce(flat, reduction="mean")
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.average_([t])
        return float(t.item())

    def barrier(self):
        if self.state is not None:
            self.state.wait_for_everyone()


_PROCESSES = None


def close_processes():
    """Leave the process group before the process exits: a gloo / NCCL group still alive at interpreter exit can
    abort the process ("terminate called without an active exception") after its work is done."""
    global _PROCESSES
    if _PROCESSES is not None and _PROCESSES.state is not None:
        _PROCESSES.state.destroy_process_group()
    _PROCESSES = None


def processes(cpu: bool = False) -> Processes:
    """The process group (made on the first call; ``cpu``: gloo processes on the CPU even with CUDA present)."""
    global _PROCESSES
    if _PROCESSES is None:
        _PROCESSES = Processes(cpu)
    return _PROCESSES


def micro_slices(global_batch: int, per_device: int, world: int, rank: int, accumulation: int) -> list[slice]:
    """This process's micro-batches of a global batch: micro-step k of process r takes items
    [(k * world + r) * per_device, ... + per_device)."""
    assert global_batch == per_device * world * accumulation
    return [slice((k * world + rank) * per_device, (k * world + rank + 1) * per_device) for k in range(accumulation)]
