"""Reading weight files: single safetensors, diffusers folders, sharded indexes.

Only safetensors are read (never pickles). The header is validated before any
tensor is touched so that a truncated or corrupt download gives a message that
names the file instead of a Rust panic. Tensors come from ``safe_open`` and are
memory-mapped, so loading a file costs page cache, not a private copy.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .errors import DCGenError

_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass
class Checkpoint:
    """A state dict plus what was found beside it."""

    path: str
    state_dict: dict[str, torch.Tensor]
    config: dict | None = None
    metadata: dict = field(default_factory=dict)


def read_safetensors_header(path: str) -> dict:
    """Parse and validate the JSON header of a safetensors file."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DCGenError(f"{path}: cannot read the file ({e}).") from e
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DCGenError(f"{path}: expected a safetensors file, found {size} bytes (empty or truncated).")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT or 8 + n > size:
            raise DCGenError(
                f"{path}: expected a safetensors header of {n} bytes, found a file of {size} bytes "
                "(not a safetensors file, or truncated)."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCGenError(f"{path}: expected a JSON safetensors header, found unreadable bytes (corrupt file).") from e
    data_size = size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_size:
        raise DCGenError(
            f"{path}: expected {end} bytes of tensor data, found {data_size} "
            f"(the file is truncated: {size} of {8 + n + end} bytes). Download it again."
        )
    return header


def load_safetensors(path: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load every tensor of one safetensors file; returns (state_dict, metadata)."""
    header = read_safetensors_header(path)
    sd = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise DCGenError(f"{path}: could not read tensors ({e}).") from e
    return sd, dict(header.get("__metadata__") or {})


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def is_shard(path: str) -> bool:
    """A shard of a sharded diffusers checkpoint (``...-00001-of-00003.safetensors`` beside an index)."""
    folder = os.path.dirname(path) or "."
    return bool(_SHARD.search(path)) and any(n.endswith(".safetensors.index.json") for n in os.listdir(folder))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DCGenError(f"{path}: expected a JSON file, could not parse it ({e}).") from e


def _folder_weights(folder: str) -> list[str]:
    names = sorted(os.listdir(folder))
    for index_name in names:
        if index_name.endswith(".safetensors.index.json"):
            index = _read_json(os.path.join(folder, index_name))
            shards = sorted(set(index.get("weight_map", {}).values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise DCGenError(
                    f"{folder}: expected the shards listed in {index_name}, found {len(shards) - len(missing)} "
                    f"of {len(shards)} (missing: {', '.join(missing)})."
                )
            return [os.path.join(folder, s) for s in shards]
    files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise DCGenError(f"{folder}: expected *.safetensors weights (or a diffusers index), found none.")
    return files


def resolve_component_folder(path: str, component: str) -> str:
    """A diffusers pipeline folder holds components in subfolders (transformer/, vae/)."""
    sub = os.path.join(path, component)
    if os.path.isdir(sub) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
        return sub
    return path


def load_checkpoint(path: str, component: str | None = None) -> Checkpoint:
    """Load a single safetensors file or a diffusers (possibly sharded) folder.

    A ``config.json`` next to the weights is returned as ``config``.
    ``component`` (``"transformer"``, ``"vae"``) selects the subfolder of a full
    diffusers pipeline folder.
    """
    if os.path.isdir(path):
        folder = resolve_component_folder(path, component) if component else path
        files = _folder_weights(folder)
    elif os.path.isfile(path):
        folder = os.path.dirname(path)
        files = [path]
        if not path.endswith((".safetensors", ".sft")):
            raise DCGenError(f"{path}: expected a .safetensors file, found '{os.path.splitext(path)[1] or 'no extension'}'. "
                             "Pickled checkpoints are not loaded for safety.")
        if is_shard(path):
            files = _folder_weights(folder)
    else:
        raise DCGenError(f"{path}: expected a safetensors file or a diffusers folder, found nothing at that path.")
    sd, metadata = {}, {}
    for f in files:
        part, meta = load_safetensors(f)
        sd.update(part)
        metadata.update(meta)
    config_path = os.path.join(folder, "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else None
    if config is None and metadata.get("config"):
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError:
            config = None
    return Checkpoint(path=path, state_dict=sd, config=config, metadata=metadata)
