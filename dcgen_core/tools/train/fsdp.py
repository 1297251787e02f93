"""FSDP: the transformer's weights sharded over the processes (``--sharding fsdp``; torch's FSDP2,
``torch.distributed.fsdp.fully_shard``).

Each transformer block (the children of the model's block lists, :func:`block_modules`) is one FSDP unit and the
root holds the rest, so every process keeps ~1/N of the frozen base and of the LoRA on it (sharded DTensors along
dim 0), gathers a block's weights just before the block runs and frees them after. The DC-Gen embedder and head
stay whole on every process (small; their gradients are averaged like DDP's), so the alignment's embedder stage,
which calls the embedder alone, runs unchanged.

The step loop stays the data-parallel one: FSDP reduce-scatters (averages) the sharded gradients itself,
:func:`clip_grad_norm_` takes the global norm over shards and whole tensors, AdamW and the EMA work on the shards.
Checkpoints and final files gather the shards into whole tensors (:func:`full_cpu`, one tensor at a time, kept by
the writer only), so they have the unsharded format; loading cuts whole tensors into this process's shard
(:func:`like`), so a run resumes with another process count, with or without FSDP.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from torch import nn

from ...shared.errors import DCGenError

log = logging.getLogger("dcgen.train")

SHARDINGS = ("auto", "none", "fsdp")


def accelerate_fsdp() -> bool:
    """True under ``accelerate launch --use_fsdp`` (or an accelerate config with FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def resolve_sharding(name: str, world: int) -> str:
    """``none`` or ``fsdp`` for ``--sharding`` (one of SHARDINGS; ``auto``: fsdp when accelerate was launched with
    FSDP)."""
    wanted = "fsdp" if name == "fsdp" or (name == "auto" and accelerate_fsdp()) else "none"
    if wanted == "fsdp" and world == 1:
        log.warning("--sharding fsdp with one process: nothing to shard over, training unsharded.")
        return "none"
    return wanted


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the model's top-level block lists (FLUX: transformer_blocks and
    single_transformer_blocks; SANA: transformer_blocks)."""
    blocks = [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]
    if not blocks:
        raise DCGenError(f"{type(model).__name__}: expected transformer blocks (a ModuleList of them) to shard, "
                         "found none.")
    return blocks


def is_sharded(t) -> bool:
    if not torch.distributed.is_available():  # a torch build without distributed support
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_model(model: nn.Module, rt, keep=()) -> nn.Module:
    """With ``rt.sharding == "fsdp"``: shard every block, then the root, over all processes; the parameters of the
    modules in ``keep`` (the trained embedder/head) stay whole. Call it after every parameter is in place (the
    embedding, the LoRA): parameters are replaced by sharded ones, so read them from the model afterwards."""
    if getattr(rt, "sharding", "none") != "fsdp":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.procs.world,))
    for block in block_modules(model):
        fully_shard(block, mesh=mesh)  # moves the block to the mesh's device, keeping this process's shard
    fully_shard(model, mesh=mesh, ignored_params={p for m in keep for p in m.parameters()})
    report_parameter_bytes(model, rt)
    return model


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the parameters this process holds, bytes of the whole model's parameters)."""
    local = total = 0
    for p in model.parameters():
        size = p.element_size()
        local += (p.to_local() if is_sharded(p) else p).numel() * size
        total += p.numel() * size
    return local, total


def report_parameter_bytes(model: nn.Module, rt):
    """The main process prints every process's share of the parameters (one line on stderr)."""
    from accelerate.utils import gather

    local, total = parameter_bytes(model)
    held = gather(torch.tensor([local], dtype=torch.int64, device=rt.device)).tolist()
    if rt.is_main:
        print(f"fsdp: parameter bytes held per process {held} of the model's {total}", file=sys.stderr, flush=True)


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of ``t`` (a sharded DTensor is gathered: every process must call this, in the same order)."""
    with torch.no_grad():
        t = t.detach()
        if is_sharded(t):
            t = t.full_tensor()
        return t.contiguous().cpu()


def gather_full(tensors: dict, keep: bool = True) -> dict:
    """``tensors`` (name -> tensor or tuple of tensors) as whole CPU tensors, gathered one at a time; ``keep``
    False (a process that writes nothing): takes part in the gathering and returns {}."""
    out = {}
    for k, v in tensors.items():
        full = tuple(full_cpu(t) for t in v) if isinstance(v, tuple) else full_cpu(v)
        if keep:
            out[k] = full
    return out


def like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``ref``: this process's shard when ``ref`` is sharded (cut locally, no
    communication: every process holds ``src``), else ``src`` on ``ref``'s device."""
    if is_sharded(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(src.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                                 src_data_rank=None)
    return src.to(ref.device)


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (foreach=False) over whole and sharded gradients alike: torch's refuses a
    mix of DTensors and plain tensors, so with shards the squared norms are summed locally, the shards' part
    all-reduced once, and every gradient scaled by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    import torch.distributed as dist

    with torch.no_grad():
        local = [g.to_local() for g in sharded]
        sq = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in local]).sum()
        dist.all_reduce(sq, group=sharded[0].device_mesh.get_group())
        whole = [g for g in grads if not is_sharded(g)]
        if whole:
            sq = sq + torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in whole]).sum().to(sq.device)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for t in local + whole:
            t.mul_(coef.to(t.device, t.dtype))
    return total
