"""FSDP (``--sharding fsdp``, torch FSDP2 per transformer block) under `accelerate launch --multi_gpu
--num_processes 2` on CPU (gloo): each process holds about half of the model's parameters; the trained LoRA and
embedding equal the one-process unsharded run of the same global batch; checkpoints hold whole tensors, so an FSDP
checkpoint resumes in one unsharded process and an unsharded one resumes under FSDP (launched with accelerate's
--use_fsdp, no --sharding flag). Tiny FLUX, CPU, a few steps.

Tolerance 3e-5 relative (trained tensors, and checkpoints' parameters, EMA and AdamW moments): as in
test_train_distributed.py the runs differ only in how the global batch's gradient is summed (FSDP reduce-scatters
the shards' gradients, the whole embedder/head ones are all-reduced) and in the order the clipping norm's squares
are added, so float32 rounding only; but the lora runs clip hard (--max-grad-norm 1e-3), which brings gradient
elements near AdamW's eps (1e-8), where the update g / (|g| + eps) passes their absolute rounding through. Measured:
the data-parallel run vs one process 1.5e-5, FSDP vs data parallel 5e-7; FSDP with a clipping norm over the local
shards only (no all-reduce) 5e-3.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from safetensors.torch import load_file
from test_train_distributed import COMMON, _accelerate, _max_rel, _outputs, write_files

from dcgen_core.tools.train.__main__ import main as train_main

TOL = 3e-5
# the EMA is kept on the shards and gathered into checkpoints and outputs; the gradient norms are ~0.2-0.6, so the
# clipping (the global norm over shards and whole tensors) scales every step, and AdamW's eps makes its scale matter
EMA = ["--ema-decay", "0.5", "--max-grad-norm", "1e-3"]


def _checkpoint(folder) -> dict:
    out = {f"model.{k}": v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    out.update({f"state.{k}": v for k, v in load_file(os.path.join(folder, "state.safetensors")).items()
                if k.startswith("optim.")})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dcgen):
    return write_files(tmp_path_factory.mktemp("train-fsdp"), tiny_dcgen)


@pytest.fixture(scope="module")
def unsharded(files, tmp_path_factory):
    """One-process unsharded runs with the global batch 4: 4 steps, and 2 steps with checkpoints."""
    _, base, cache, emb = files
    root = tmp_path_factory.mktemp("unsharded")
    full, half = root / "full", root / "half"
    assert train_main(["lora", cache, base, emb, str(full), "--steps", "4", "--batch-size", "4", *EMA, *COMMON]) == 0
    assert train_main(["lora", cache, base, emb, str(half), "--steps", "2", "--batch-size", "4", "--checkpoint-every",
                       "1", *EMA, *COMMON]) == 0
    return full, half


def test_fsdp_lora_equals_one_process_and_resumes_unsharded(files, unsharded, tmp_path):
    _, base, cache, emb = files
    full, half = unsharded
    sharded = tmp_path / "fsdp"
    res = _accelerate("lora", cache, base, emb, sharded, "--steps", "2", "--batch-size", "1",
                      "--gradient-accumulation", "2", "--checkpoint-every", "1", "--sharding", "fsdp", *EMA, *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("fsdp (weights sharded over 2); global batch 4 = 1 per device x 2 processes x 2 "
                            "accumulation") == 1, res.stderr[-2000:]
    # each process holds half of the sharded parameters; the embedder/head (whole on both) are counted twice
    m = re.search(r"fsdp: parameter bytes held per process \[(\d+), (\d+)\] of the model's (\d+)", res.stderr)
    assert m, res.stderr[-2000:]
    held, total = [int(m[1]), int(m[2])], int(m[3])
    whole = sum(v.numel() * v.element_size() for v in load_file(emb).values())
    assert sum(held) == total + whole
    assert all(abs(h - (total - whole) / 2 - whole) <= 0.02 * total for h in held), (held, total, whole)

    ref = _outputs(half)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ref.items())  # it trained
    got = _outputs(sharded)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert _max_rel(got, ref) <= TOL
    assert sorted(os.listdir(sharded)) == sorted(os.listdir(half))
    # the checkpoints hold whole tensors: those of the unsharded run (parameters, EMA, AdamW moments)
    for step in ("step-00000001", "step-00000002"):
        a, b = _checkpoint(sharded / "checkpoints" / step), _checkpoint(half / "checkpoints" / step)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert _max_rel({k: v for k, v in a.items() if not k.endswith(".step")},
                        {k: v for k, v in b.items() if not k.endswith(".step")}) <= TOL
    # the FSDP checkpoint goes on in one unsharded process (4 per device) to the uninterrupted run's weights
    assert train_main(["lora", cache, base, emb, str(sharded), "--steps", "4", "--batch-size", "4", "--resume", *EMA,
                       *COMMON]) == 0
    assert _max_rel(_outputs(sharded), _outputs(full)) <= TOL


def test_unsharded_checkpoint_resumes_under_accelerate_fsdp(files, unsharded, tmp_path):
    """`accelerate launch --use_fsdp` alone selects FSDP; the whole tensors of a one-process checkpoint are cut
    into each process's shards."""
    _, base, cache, emb = files
    full, half = unsharded
    resumed = tmp_path / "resumed"
    shutil.copytree(half, resumed)
    res = _accelerate("lora", cache, base, emb, resumed, "--steps", "4", "--batch-size", "2", "--resume", *EMA,
                      *COMMON, mode="--use_fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fsdp (weights sharded over 2)" in res.stderr, res.stderr[-2000:]
    assert _max_rel(_outputs(resumed), _outputs(full)) <= TOL


def test_fsdp_alignment_equals_one_process(files, tmp_path):
    """align (embedder by Adam, then head + embedder, backpropagating through the sharded frozen blocks, with
    gradient checkpointing: FSDP gathers a block again for its recomputation) under FSDP."""
    _, base, cache, _ = files
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    args = ["--channels", "32", "--embed-steps", "2", "--embed-lr", "1e-2", "--steps", "2", "--lr", "1e-3",
            "--train-embedder", "--gradient-checkpointing", "on", "--seed", "3", "--no-progress", "--device", "cpu"]
    assert train_main(["align", cache, base, str(one), "--batch-size", "4", *args]) == 0
    res = _accelerate("align", cache, base, sharded, "--batch-size", "2", "--sharding", "fsdp", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fsdp (weights sharded over 2)" in res.stderr
    ref = load_file(os.path.join(one, "dcgen-embedding.safetensors"))
    got = load_file(os.path.join(sharded, "dcgen-embedding.safetensors"))
    assert _max_rel(got, ref) <= TOL


def test_sharding_option(monkeypatch, tiny_dcgen):
    """--sharding auto follows accelerate's FSDP environment; one process has nothing to shard; the blocks FSDP
    wraps are the children of the model's block lists."""
    from dcgen_core.shared.errors import DCGenError
    from dcgen_core.tools.train.common import TrainConfig
    from dcgen_core.tools.train.fsdp import block_modules, resolve_sharding

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert resolve_sharding("auto", 2) == "none"
    assert resolve_sharding("fsdp", 2) == "fsdp"
    assert resolve_sharding("fsdp", 1) == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_sharding("auto", 2) == "fsdp"
    assert resolve_sharding("none", 2) == "none"
    with pytest.raises(DCGenError, match="--sharding: expected one of auto, none, fsdp, found 'zero3'"):
        TrainConfig(sharding="zero3").validate()
    model = tiny_dcgen.base
    assert block_modules(model) == [*model.transformer_blocks, *model.single_transformer_blocks]
    with pytest.raises(DCGenError, match="expected transformer blocks"):
        block_modules(model.x_embedder)
