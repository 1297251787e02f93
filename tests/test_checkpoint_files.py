"""Hostile or inconsistent weight files give a clear error naming the file (torch only, no ComfyUI)."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from dcgen_core.shared.checkpoints import load_checkpoint
from dcgen_core.shared.errors import DCGenError


def _raw_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _sharded(folder, index=None, extra_shard=False, duplicate=False):
    os.makedirs(folder, exist_ok=True)
    save_file({"a": torch.ones(2)}, os.path.join(folder, "diffusion_pytorch_model-00001-of-00002.safetensors"))
    second = {"b": torch.ones(2)}
    if duplicate:
        second["a"] = torch.zeros(2)
    save_file(second, os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors"))
    if extra_shard:
        save_file({"c": torch.ones(2)}, os.path.join(folder, "diffusion_pytorch_model-00003-of-00003.safetensors"))
    if index is None:
        index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


@pytest.mark.parametrize("case,expect", [
    ("header-list", "a JSON list"),
    ("no-offsets", "expected tensor 'w' to have data_offsets"),
    ("bad-offsets", "expected tensor 'w' to have data_offsets"),
    ("metadata-list", "__metadata__"),
])
def test_corrupt_headers(tmp_path, case, expect):
    header = {"header-list": [1, 2],
              "no-offsets": {"w": {"dtype": "F32", "shape": [2]}},
              "bad-offsets": {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
              "metadata-list": {"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
              }[case]
    path = _raw_safetensors(tmp_path / f"{case}.safetensors", header, b"\0" * 8)
    with pytest.raises(DCGenError) as err:
        load_checkpoint(path)
    assert path in str(err.value) and expect in str(err.value)


def test_index_that_is_a_list(tmp_path):
    folder = _sharded(tmp_path / "m", index=[{"a": "x"}])
    with pytest.raises(DCGenError, match=r"index.json: expected a diffusers index .*weight_map"):
        load_checkpoint(folder)


def test_index_that_leaves_out_a_shard(tmp_path):
    folder = _sharded(tmp_path / "m", extra_shard=True)
    with pytest.raises(DCGenError, match=r"leaves out \(diffusion_pytorch_model-00003-of-00003.safetensors\)"):
        load_checkpoint(folder)


def test_index_pointing_outside_the_folder(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "secret.safetensors"))
    folder = _sharded(tmp_path / "m", index={"weight_map": {"a": "../secret.safetensors"}})
    with pytest.raises(DCGenError, match=r"refused: an index may not point outside its folder"):
        load_checkpoint(folder)


def test_tensor_in_two_shards(tmp_path):
    folder = _sharded(tmp_path / "m", duplicate=True)
    with pytest.raises(DCGenError, match=r"00002-of-00002.safetensors: expected each tensor in one shard only.*'a'"):
        load_checkpoint(folder)


def test_consistent_folder_loads(tmp_path):
    ckpt = load_checkpoint(_sharded(tmp_path / "m"))
    assert sorted(ckpt.state_dict) == ["a", "b"]
