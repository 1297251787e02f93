"""Reading weight files: single safetensors, diffusers folders, sharded indexes.

Only safetensors are read (never pickles). The header and any index are validated
before a tensor is touched, so a truncated, corrupt or inconsistent download gives a
message that names the file instead of a Rust panic. Tensors come from ``safe_open``
as views of the memory-mapped file; whatever a model keeps is copied into private
memory with :func:`owned` (one tensor at a time, so a load peaks near the final
size), so a file overwritten or truncated later cannot change or crash a loaded model.
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
    if not isinstance(header, dict):
        raise DCGenError(f"{path}: expected a safetensors header that is a JSON object, found a JSON "
                         f"{type(header).__name__} (not a safetensors file, or corrupt).")
    for k, v in header.items():
        if k == "__metadata__":
            if v is not None and not isinstance(v, dict):
                raise DCGenError(f"{path}: expected __metadata__ to be a JSON object of strings, found a "
                                 f"{type(v).__name__}.")
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DCGenError(f"{path}: expected tensor '{k}' to have data_offsets [begin, end], found "
                             f"{json.dumps(v)[:120]} (corrupt header).")
    data_size = size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_size:
        raise DCGenError(
            f"{path}: expected {end} bytes of tensor data, found {data_size} "
            f"(the file is truncated: {size} of {8 + n + end} bytes). Download it again."
        )
    return header


def load_safetensors(path: str, device: str = "cpu", copy: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Load every tensor of one safetensors file; returns (state_dict, metadata).

    The tensors are views of the memory-mapped file unless ``copy`` (small files kept whole: LoRAs, embeddings).
    """
    header = read_safetensors_header(path)
    sd = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k).clone() if copy else f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise DCGenError(f"{path}: could not read tensors ({e}).") from e
    return sd, dict(header.get("__metadata__") or {})


def weight_format(keys, metadata: dict) -> str:
    """``nvfp4`` (ComfyUI's 4-bit format), ``svdquant`` (nunchaku's) or ``plain`` (bf16/fp16/fp32/fp8) from a
    file's tensor names and header metadata."""
    if any(k.endswith(".comfy_quant") for k in keys) or metadata.get("_quantization_metadata"):
        return "nvfp4"
    if any(k.endswith(".qweight") for k in keys):
        return "svdquant"
    return "plain"


def check_tensors_match(expected: dict, found: dict, source: str, what: str):
    """``found`` holds exactly ``expected``'s tensor names and shapes (a model's state dict); else an error naming
    the file, the missing, unexpected and wrongly shaped tensors."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    if missing or unexpected or wrong:
        raise DCGenError(f"{source}: expected the tensors of {what}, found missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {wrong[:4]}.")


def owned(value, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor in private memory, in ``dtype``: from a view of a mapped file (copied), or from a callable that
    computes a new tensor (a fused weight; converted, the intermediate dropped at once)."""
    if hasattr(value, "into"):  # flux/keys.py FusedTensor: built straight into the target dtype
        return value.into(dtype)
    fresh = callable(value)
    t = value() if fresh else value
    out = t.to(dtype) if dtype is not None else t
    if out is t and not fresh:
        out = t.clone(memory_format=torch.contiguous_format)
    return out


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def is_shard(path: str) -> bool:
    """A shard of a sharded diffusers checkpoint (``...-00001-of-00003.safetensors`` beside an index)."""
    folder = os.path.dirname(path) or "."
    return bool(_SHARD.search(path)) and any(n.endswith(".safetensors.index.json") for n in os.listdir(folder))


def read_json(path: str, expected: str = "a JSON file", missing_ok: bool = False):
    """The parsed JSON file at ``path`` (None when it is absent and ``missing_ok``); a file that cannot be read or
    parsed is an error naming it and ``expected``."""
    if missing_ok and not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DCGenError(f"{path}: expected {expected}, could not read it ({e}).") from e


def _index_shards(folder: str, index_name: str, names: list[str]) -> list[str]:
    """The shards an index names, checked: inside the folder, all present, none on disk left out."""
    path = os.path.join(folder, index_name)
    index = read_json(path, "a diffusers index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DCGenError(f"{path}: expected a diffusers index (a JSON object with a 'weight_map' of tensor name -> "
                         f"shard file), found {json.dumps(index)[:120]}.")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if os.path.isabs(s) or os.path.normpath(s).split(os.sep)[0] == ".."]
    if outside:
        raise DCGenError(f"{path}: expected shard file names inside {folder}, found {', '.join(outside[:3])} "
                         "(refused: an index may not point outside its folder).")
    prefix = index_name[: -len(".index.json")].rsplit(".", 1)[0]  # "diffusion_pytorch_model"
    on_disk = [n for n in names if n.startswith(prefix) and _SHARD.search(n)]
    left_out = sorted(set(on_disk) - set(shards))
    if left_out:
        raise DCGenError(f"{path}: expected it to list every shard in the folder, found {len(left_out)} it leaves out "
                         f"({', '.join(left_out[:3])}): the index and the shards are from different downloads.")
    return shards


def _folder_weights(folder: str) -> list[str]:
    names = sorted(os.listdir(folder))
    for index_name in names:
        if index_name.endswith(".safetensors.index.json"):
            shards = _index_shards(folder, index_name, names)
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
    sd, metadata, origin = {}, {}, {}
    for f in files:
        part, meta = load_safetensors(f)
        twice = sorted(set(part) & set(sd))
        if twice:
            raise DCGenError(f"{f}: expected each tensor in one shard only, found {len(twice)} also in "
                             f"{origin[twice[0]]} (e.g. '{twice[0]}'); refused rather than picking one.")
        origin.update(dict.fromkeys(part, os.path.basename(f)))
        sd.update(part)
        metadata.update(meta)
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path, "the model's config", missing_ok=True)
    if config is None and metadata.get("config"):
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError:
            config = None
    return Checkpoint(path=path, state_dict=sd, config=config, metadata=metadata)
