"""Post-training under Hugging Face accelerate: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) gives the result of
one process with the same global batch; gradient accumulation is the same global batch again; a checkpoint of the
two-process run resumes in one process. Tiny FLUX, CPU, a few steps.

Tolerances: the runs differ only in how the global batch's gradient is summed (one mean over 4 items, or means over
2 averaged by an all-reduce, or accumulated over 2 micro-steps), so float32 rounding only: trained tensors agree to
1e-5 relative (AdamW's first steps normalise gradients, which amplifies rounding little at lr 1e-3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors.torch import load_file

from dcgen_core.tools.train.__main__ import main as train_main
from dcgen_core.tools.train.cache import write_cache

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = tiny.LATENT_CHANNELS
TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dcgen):
    return write_files(tmp_path_factory.mktemp("train-dist"), tiny_dcgen)


def write_files(root, tiny_dcgen):
    """(root, base transformer file, cache folder, aligned embedding file) of a tiny FLUX under ``root``."""
    base = tiny_dcgen.save_base_single_file(str(root / "base.safetensors"))
    g = torch.Generator().manual_seed(0)
    items = [(f"img{i}", f"caption {i}", {
        "base_latents": torch.randn(16, 16, 16, generator=g), "dcae_latents": torch.randn(C, 4, 4, generator=g),
        "context": torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g),
        "pooled": torch.randn(tiny.POOLED_DIM, generator=g)}) for i in range(6)]
    null = (torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g), torch.randn(tiny.POOLED_DIM, generator=g))
    cache = str(root / "cache")
    write_cache(cache, items, {"resolution": [128, 128]}, null_text=null, shard_size=4, text_dtype=torch.float32)
    emb = str(root / "embedding.safetensors")
    tiny_dcgen.save_embedding(emb)
    return root, base, cache, emb


COMMON = ["--rank", "4", "--alpha", "8", "--lr", "1e-3", "--seed", "3", "--save-dtype", "float32", "--no-progress",
          "--device", "cpu"]


def _accelerate(*args, processes: int = 2, mode: str = "--multi_gpu") -> subprocess.CompletedProcess:
    """``mode``: accelerate's launch mode, --multi_gpu or --use_fsdp (the same launcher, with FSDP's environment)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PACK_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # --multi_gpu: torch's elastic launcher, N processes; on CPU (--device cpu) they join over gloo. accelerate's
    # --cpu launcher starts one process only (several need mpirun), so it cannot test two.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dcgen_core.train", *map(str, args)]
    return subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=600, check=False)


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item() for k in a)


def _outputs(folder) -> dict:
    out = {f"lora.{k}": v for k, v in load_file(os.path.join(folder, "dcgen-lora.safetensors")).items()}
    out.update({f"emb.{k}": v for k, v in load_file(os.path.join(folder, "dcgen-embedding.safetensors")).items()})
    return out


def test_two_processes_equal_one_with_the_same_global_batch(files, tmp_path):
    _, base, cache, emb = files
    one, accum, two = tmp_path / "one", tmp_path / "accum", tmp_path / "two"
    assert train_main(["lora", cache, base, emb, str(one), "--steps", "3", "--batch-size", "4", *COMMON]) == 0
    assert train_main(["lora", cache, base, emb, str(accum), "--steps", "3", "--batch-size", "2",
                       "--gradient-accumulation", "2", *COMMON]) == 0
    res = _accelerate("lora", cache, base, emb, two, "--steps", "3", "--batch-size", "2", *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    # the main process alone prints: one start line naming the split, one result
    assert res.stderr.count("global batch 4 = 2 per device x 2 processes x 1 accumulation") == 1, res.stderr[-2000:]
    assert res.stdout.count("lora: ") == 1
    ref = _outputs(one)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ref.items())  # it trained
    assert _max_rel(_outputs(accum), ref) <= TOL
    assert _max_rel(_outputs(two), ref) <= TOL
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))


def test_checkpoint_resumes_with_another_process_count(files, tmp_path):
    """Two processes (2 per device) to step 2 with a checkpoint, then one process (4 per device) on to step 4: the
    weights of an uninterrupted one-process run; another global batch is refused."""
    _, base, cache, emb = files
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_main(["lora", cache, base, emb, str(full), "--steps", "4", "--batch-size", "4", *COMMON]) == 0
    res = _accelerate("lora", cache, base, emb, parts, "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
                      *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(parts / "checkpoints")) == ["step-00000001", "step-00000002"]
    bad = tmp_path / "bad"
    shutil.copytree(parts, bad)
    assert train_main(["lora", cache, base, emb, str(bad), "--steps", "4", "--batch-size", "2", "--resume",
                       *COMMON]) == 1
    assert train_main(["lora", cache, base, emb, str(parts), "--steps", "4", "--batch-size", "4", "--resume",
                       *COMMON]) == 0
    assert _max_rel(_outputs(parts), _outputs(full)) <= TOL
