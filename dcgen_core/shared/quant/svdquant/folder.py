"""nunchaku's pre-v1 SVDQuant folder layout, read as the single file nunchaku's merge_safetensors makes of it.

Before nunchaku 1.0 a quantized transformer was a folder (deepcompressor backend/nunchaku/convert.py writes the
two weight files; Hugging Face repos such as mit-han-lab/svdq-int4-flux.1-dev add the JSON files)::

    transformer_blocks.safetensors     the transformer_blocks.* / single_transformer_blocks.* tensors
    unquantized_layers.safetensors     everything else (x_embedder, time/text embedders, norm_out, proj_out)
    config.json                        the diffusers FLUX config
    comfy_config.json                  (ComfyUI-nunchaku's; optional here)

``python -m nunchaku.merge_safetensors`` (nunchaku/merge_safetensors.py) writes the union of the two weight files
to one safetensors with header metadata ``config`` (config.json's text), ``comfy_config``, ``model_class`` and
``quantization_config`` (fp4 when any tensor is fp8, else int4; "rank": the first lora_down's width, default 32).
:func:`read_folder` gives the same tensors and metadata without writing anything.
"""

from __future__ import annotations

import json
import os

from ...checkpoints import read_safetensors_header
from ...errors import DCGenError

__all__ = ["BLOCKS_FILE", "UNQUANTIZED_FILE", "is_svdquant_folder", "merge_command", "read_folder", "split_file_hint"]

BLOCKS_FILE = "transformer_blocks.safetensors"
UNQUANTIZED_FILE = "unquantized_layers.safetensors"
_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
_FP8 = {"F8_E4M3", "F8_E5M2", "F8_E8M0"}


def merge_command(folder: str) -> str:
    """nunchaku's command that merges ``folder`` into one file (``-m`` is required from nunchaku 1.1 on)."""
    out = os.path.join(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.normpath(folder)))
    return (f"python -m nunchaku.merge_safetensors -i {folder} -m NunchakuFluxTransformer2dModel "
            f"-o {out}.safetensors")


def is_svdquant_folder(path: str) -> bool:
    """A folder holding nunchaku's transformer_blocks.safetensors (the pre-v1 layout)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, BLOCKS_FILE))


def split_file_hint(path: str) -> str:
    """For one of the folder layout's two weight files chosen on its own: what to load instead; else ""."""
    if os.path.basename(path) not in (BLOCKS_FILE, UNQUANTIZED_FILE):
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    return (f" {os.path.basename(path)} is one half of nunchaku's pre-v1 folder layout ({BLOCKS_FILE} + "
            f"{UNQUANTIZED_FILE} + config.json): load the folder {folder} (it is listed once config.json is in it), "
            f"or merge it into one file with: {merge_command(folder)} (merge_safetensors also reads the folder's "
            f"comfy_config.json).")


def _read_text(folder: str, name: str) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DCGenError(f"{path}: expected a JSON file, could not read it ({e}).") from e
    return text


def read_folder(folder: str) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """``([(file, safetensors header)] for the two weight files, header metadata as merge_safetensors writes it)``.
    Refuses a folder that lacks a file, or whose two files share a tensor name."""
    missing = [n for n in (BLOCKS_FILE, UNQUANTIZED_FILE, "config.json") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise DCGenError(f"{folder}: expected nunchaku's pre-v1 SVDQuant folder ({BLOCKS_FILE}, {UNQUANTIZED_FILE}, "
                         f"config.json), found {', '.join(found) or 'nothing'}; missing {', '.join(missing)}. Copy "
                         f"them from the model's Hugging Face repository (nunchaku's own loader and its "
                         f"merge_safetensors need them too), or use the model's single-file release.")
    files = [(os.path.join(folder, n), read_safetensors_header(os.path.join(folder, n)))
             for n in (BLOCKS_FILE, UNQUANTIZED_FILE)]
    (blocks_path, blocks), (_, unq) = files
    twice = sorted((set(blocks) & set(unq)) - {"__metadata__"})
    if twice:
        raise DCGenError(f"{folder}: expected each tensor in one of {BLOCKS_FILE} / {UNQUANTIZED_FILE}, found "
                         f"{len(twice)} in both (e.g. '{twice[0]}'); refused rather than picking one.")
    misplaced = sorted(k for k in blocks if k != "__metadata__" and not k.startswith(_BLOCK_PREFIXES))
    if misplaced:
        raise DCGenError(f"{blocks_path}: expected only transformer_blocks.* / single_transformer_blocks.* tensors "
                         f"(deepcompressor's converter puts the rest in {UNQUANTIZED_FILE}), found "
                         f"{len(misplaced)} others (e.g. '{misplaced[0]}').")
    names = [k for h in (blocks, unq) for k in h if k != "__metadata__"]
    fp4 = any(h[k]["dtype"] in _FP8 for h in (blocks, unq) for k in h if k != "__metadata__")
    # merge_safetensors: the first lora_down in the (sorted) key order of transformer_blocks.safetensors
    rank = next((blocks[k]["shape"][1] for k in sorted(blocks) if ".lora_down" in k), 32)
    kind, group = ("fp4_e2m1_all", 16) if fp4 else ("int4", 64)
    quantization_config = {
        "method": "svdquant",
        "weight": {"dtype": kind, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": group},
        "activation": {"dtype": kind, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": group},
        "rank": rank}
    metadata = {"config": _read_text(folder, "config.json"), "model_class": "NunchakuFluxTransformer2dModel",
                "quantization_config": json.dumps(quantization_config)}
    comfy = _read_text(folder, "comfy_config.json")
    if comfy is not None:
        metadata["comfy_config"] = comfy
    if not any(n.endswith(".qweight") for n in names):
        raise DCGenError(f"{blocks_path}: expected nunchaku's 4-bit '<module>.qweight' tensors, found "
                         f"{len(names)} tensors and no qweight: not a nunchaku SVDQuant folder.")
    return files, metadata
