"""DC-Gen-SANA training at scale: the SANA `lora` stage under `accelerate launch --multi_gpu --num_processes 2` on CPU
(gloo) with the weights sharded by FSDP (one unit per SANA block) equals the one-process unsharded run of the same
global batch. Tiny SANA, f64c128 latents, a few steps.

Tolerance 1e-4 relative on the trained LoRA and embedding tensors: the runs differ only in how the global batch's
gradient is summed (reduce-scatter of the shards' gradients, all-reduce of the whole embedder/head ones,
accumulation over two micro-steps) and in the order the clipping norm's squares are added, so float32 rounding
only, but AdamW's first steps pass the rounding of gradient elements near its eps straight through: measured, the
largest difference is one tensor (block 0's ff.conv_point lora_B) at 3.0e-5 for FSDP and 3.0e-5 for plain data
parallelism (no sharding) alike; every other tensor is under 2e-6.
"""

from __future__ import annotations

import json
import re

import pytest
import tiny
import torch
from safetensors.torch import save_file
from test_train_distributed import COMMON, _accelerate, _max_rel, _outputs
from test_train_sana import C, _sana_items

from dcgen_core.tools.train.__main__ import main as train_main
from dcgen_core.tools.train.cache import write_cache
from dcgen_core.tools.train.sana_model import install_embedding, load_base_transformer, save_embedding

TOL = 1e-4


@pytest.fixture(scope="module")
def sana_run_files(tmp_path_factory):
    """(base single file, SANA cache of 4 items, a fresh 128-channel embedding file)."""
    root = tmp_path_factory.mktemp("train-sana-fsdp")
    base = tiny.tiny_sana()
    single = str(root / "sana-base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, single,
              metadata={"config": json.dumps(dict(base.config))})
    cache = str(root / "cache")
    write_cache(cache, _sana_items(), {"family": "sana", "resolution": [256, 256]}, shard_size=3,
                text_dtype=torch.float32)
    torch.manual_seed(7)
    model = load_base_transformer(single)
    install_embedding(model, C)
    emb = save_embedding(str(root / "sana-embedding.safetensors"), model)
    return single, cache, emb


def test_sana_lora_under_fsdp_equals_one_process(sana_run_files, tmp_path):
    single, cache, emb = sana_run_files
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    assert train_main(["lora", cache, single, emb, str(one), "--steps", "2", "--batch-size", "4", *COMMON]) == 0
    res = _accelerate("lora", cache, single, emb, sharded, "--steps", "2", "--batch-size", "1",
                      "--gradient-accumulation", "2", "--sharding", "fsdp", *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fsdp (weights sharded over 2); global batch 4 = 1 per device x 2 processes x 2 accumulation" in res.stderr
    assert res.stderr.count(": flow shift 3.0 (") == 1, res.stderr[-3000:]  # logs come from the main process only
    m = re.search(r"fsdp: parameter bytes held per process \[(\d+), (\d+)\] of the model's (\d+)", res.stderr)
    assert m, res.stderr[-2000:]
    assert max(int(m[1]), int(m[2])) < 0.75 * int(m[3])  # each process holds about half (+ the whole embedder/head)
    ref, got = _outputs(one), _outputs(sharded)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ref.items())  # it trained
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    err = _max_rel(got, ref)
    print(f"SANA lora, FSDP 2 processes vs 1 process: {err:.2e} relative")
    assert err <= TOL
