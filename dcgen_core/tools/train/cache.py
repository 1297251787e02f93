"""The latent cache: safetensors shards of stacked tensors + ``index.json`` (CacheWriter / LatentCache), or the same
in memory (MemoryCache); the empty caption's embeddings in ``null_text.safetensors``."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...shared.checkpoints import read_json
from ...shared.errors import DCGenError


INDEX = "index.json"
NULL_TEXT = "null_text.safetensors"
FORMAT = "dcgen-train-cache"
VERSION = 1


class CacheWriter:
    """Writes items to shards of ``shard_size`` (stacked tensors per shard, one bucket per shard) and rewrites the
    index after each shard (``complete`` false until :meth:`close`). ``resume``: an index already at ``out_dir``
    written with the same ``meta`` is continued (its items are in :attr:`done`); one with other settings is
    refused."""

    def __init__(self, out_dir: str, meta: dict, shard_size: int = 256, text_dtype: torch.dtype = torch.bfloat16,
                 resume: bool = False):
        self.out, self.meta, self.shard_size, self.text_dtype = out_dir, meta, max(1, shard_size), text_dtype
        os.makedirs(out_dir, exist_ok=True)
        self.items, self.shards, self.pending = [], [], {}
        self.shapes, self.bucket_shapes = {}, {}
        path = os.path.join(out_dir, INDEX)
        if resume and os.path.isfile(path):
            self._resume(path)
        self.done = {it["name"] for it in self.items}

    def _resume(self, path: str):
        old = read_json(path, "a training cache index")
        old.setdefault("family", "flux")  # caches from before the field were FLUX's
        differ = sorted(k for k in set(self.meta) | {"text_dtype"}
                        if (old.get("text_dtype") if k == "text_dtype" else old.get(k)) !=
                        (str(self.text_dtype).replace("torch.", "") if k == "text_dtype" else
                         json.loads(json.dumps(self.meta.get(k)))))
        if old.get("format") != FORMAT or differ:
            raise DCGenError(f"{self.out}: expected a new folder or a cache of the same settings to resume, found "
                             f"one made with other settings ({', '.join(differ) or 'format'}). Use another folder.")
        self.items = [it for it in old["items"] if os.path.isfile(os.path.join(self.out,
                                                                                old["shards"][it["shard"]]["file"]))]
        self.shards = old["shards"]
        self.shapes = {k: tuple(v) for k, v in old.get("shapes", {}).items()}
        self.bucket_shapes = {b: {k: tuple(v) for k, v in sh.items()}
                              for b, sh in old.get("bucket_shapes", {}).items()}

    def add(self, name: str, caption: str, tensors: dict, bucket: tuple[int, int] | None = None):
        key = f"{bucket[0]}x{bucket[1]}" if bucket else "default"
        known = self.bucket_shapes.setdefault(key, {})
        for k, v in tensors.items():
            if v is None:
                continue
            shape = tuple(v.shape)
            if known.setdefault(k, shape) != shape:
                raise DCGenError(f"cache item '{name}': expected '{k}' of shape {list(known[k])} like the items "
                                 f"of bucket {key} before it (one size and text length per bucket), found "
                                 f"{list(shape)}.")
            first = self.shapes.setdefault(k, shape)
            if first[:1] != shape[:1] or (k in ("context", "pooled") and first != shape):
                raise DCGenError(f"cache item '{name}': expected '{k}' of shape like {list(first)} (the channels "
                                 f"and text length of every item), found {list(shape)}.")
        pending = self.pending.setdefault(key, [])
        pending.append((name, caption, tensors))
        if len(pending) >= self.shard_size:
            self._flush(key)

    def _flush(self, key: str):
        pending = self.pending.pop(key, [])
        if not pending:
            return
        file = f"shard-{len(self.shards):05d}.safetensors"
        keys = [k for k, v in pending[0][2].items() if v is not None]
        out = {}
        for k in keys:
            stacked = torch.stack([t[k] for _, _, t in pending])
            out[k] = (stacked.to(self.text_dtype) if k in ("context", "pooled") else stacked.float()).contiguous()
        save_file(out, os.path.join(self.out, file), metadata={"format": FORMAT})
        for row, (name, caption, _) in enumerate(pending):
            self.items.append({"name": name, "caption": caption, "shard": len(self.shards), "row": row,
                               "bucket": key})
        self.shards.append({"file": file, "count": len(pending), "bucket": key})
        self._write_index(complete=False)

    def _write_index(self, complete: bool, null_text: str | None = None, skipped=None) -> str:
        buckets = {}
        for it in self.items:
            buckets[it["bucket"]] = buckets.get(it["bucket"], 0) + 1
        index = {"format": FORMAT, "version": VERSION, "complete": complete, "count": len(self.items), **self.meta,
                 "text_dtype": str(self.text_dtype).replace("torch.", ""),
                 "shapes": {k: list(v) for k, v in self.shapes.items()},
                 "bucket_shapes": {b: {k: list(v) for k, v in sh.items()} for b, sh in self.bucket_shapes.items()
                                   if b in buckets},
                 "bucket_counts": buckets, "null_text": null_text, "skipped": skipped or [],
                 "shards": self.shards, "items": self.items}
        path = os.path.join(self.out, INDEX)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    def close(self, null_text: tuple[torch.Tensor, torch.Tensor] | None, skipped=None) -> str:
        for key in sorted(self.pending):
            self._flush(key)
        if null_text is not None:
            save_file({"context": null_text[0].to(self.text_dtype).contiguous(),
                       "pooled": null_text[1].to(self.text_dtype).contiguous()}, os.path.join(self.out, NULL_TEXT))
        return self._write_index(True, NULL_TEXT if null_text is not None else None, skipped)


def write_cache(out_dir: str, items, meta: dict, null_text=None, shard_size: int = 256,
                text_dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a cache from ``items``: (name, caption, {"base_latents": [16, H/8, W/8] or None, "dcae_latents":
    [C, H/f, W/f], "context": [T, D], "pooled": [P]}; SANA: "base_latents" [32, H/32, W/32], "context" [T, 2304],
    "context_mask" [T], no "pooled"). ``meta`` goes into the index (see :func:`prepare`); its "family" ("sana";
    absent: "flux") is :attr:`LatentCache.family`."""
    writer = CacheWriter(out_dir, meta, shard_size, text_dtype)
    for name, caption, tensors in items:
        writer.add(name, caption, tensors)
    return writer.close(null_text)


class LatentCache:
    """Reads a cache written by :func:`prepare` / :func:`write_cache`; items are read per batch from the
    memory-mapped shards."""

    def __init__(self, folder: str):
        path = os.path.join(folder, INDEX) if os.path.isdir(folder) else folder
        self.folder = os.path.dirname(os.path.abspath(path))
        self.index = read_json(path, "a training cache index (made by `python -m dcgen_core.train prepare`)")
        if self.index.get("format") != FORMAT:
            raise DCGenError(f"{path}: expected a {FORMAT} index, found format {self.index.get('format')!r}.")
        if self.index.get("complete") is False:
            raise DCGenError(f"{path}: expected a finished cache, found one that prepare did not finish "
                             f"({self.index['count']} items so far). Run the same prepare command again: it resumes.")
        for shard in self.index["shards"]:
            if not os.path.isfile(os.path.join(self.folder, shard["file"])):
                raise DCGenError(f"{path}: expected the shard {shard['file']} beside it, found none.")
        self._handles = {}

    def __len__(self) -> int:
        return int(self.index["count"])

    def groups(self) -> list[list[int]]:
        """Item indices per bucket (batches are drawn within one), in bucket-name order."""
        out = {}
        for i, item in enumerate(self.index["items"]):
            out.setdefault(item.get("bucket", "default"), []).append(i)
        return [out[k] for k in sorted(out)]

    @property
    def dcae_channels(self) -> int:
        return int(self.index["shapes"]["dcae_latents"][0])

    @property
    def has_base_latents(self) -> bool:
        return "base_latents" in self.index["shapes"]

    @property
    def family(self) -> str:
        """The model family the cache was prepared for (its text embeddings): "flux" (caches without the field) or
        "sana"."""
        return self.index.get("family", "flux")

    def _handle(self, shard: int):
        if shard not in self._handles:
            file = os.path.join(self.folder, self.index["shards"][shard]["file"])
            self._handles[shard] = safe_open(file, framework="pt")
        return self._handles[shard]

    def batch(self, indices, device="cpu", keys=("base_latents", "dcae_latents", "context", "pooled")) -> dict:
        out = {k: [] for k in keys}
        for i in indices:
            item = self.index["items"][i]
            h = self._handle(item["shard"])
            for k in keys:
                if k not in self.index["shapes"]:
                    raise DCGenError(f"{self.folder}: expected '{k}' in the cache, found none (prepared without "
                                     f"{'--base-vae' if k == 'base_latents' else 'it'}).")
                out[k].append(h.get_slice(k)[item["row"]:item["row"] + 1])
        return {k: torch.cat(v).float().to(device) for k, v in out.items()}

    def null_text(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        if not self.index.get("null_text"):
            raise DCGenError(f"{self.folder}: expected the empty caption's embeddings ({NULL_TEXT}) for the "
                             "guidance-distilled objective, found none.")
        with safe_open(os.path.join(self.folder, self.index["null_text"]), framework="pt") as f:
            ctx, pooled = f.get_tensor("context"), f.get_tensor("pooled")
        return ctx.float().unsqueeze(0).to(device), pooled.float().unsqueeze(0).to(device)


class MemoryCache:
    """A cache held in memory ({key: stacked tensor}); same interface as :class:`LatentCache` (GPU sizing, tests)."""

    def __init__(self, tensors: dict, null_text: tuple[torch.Tensor, torch.Tensor] | None = None,
                 family: str = "flux"):
        self.tensors = tensors
        self._null = null_text
        self.family = family
        self.index = {"shapes": {k: list(v.shape[1:]) for k, v in tensors.items()}}

    def __len__(self):
        return int(next(iter(self.tensors.values())).shape[0])

    def groups(self) -> list[list[int]]:
        return [list(range(len(self)))]

    @property
    def dcae_channels(self) -> int:
        return int(self.tensors["dcae_latents"].shape[1])

    @property
    def has_base_latents(self) -> bool:
        return "base_latents" in self.tensors

    def batch(self, indices, device="cpu", keys=("base_latents", "dcae_latents", "context", "pooled")) -> dict:
        idx = torch.tensor(list(indices))
        return {k: self.tensors[k][idx].float().to(device) for k in keys}

    def null_text(self, device="cpu"):
        if self._null is None:
            raise DCGenError("in-memory cache: expected the empty caption's embeddings, found none.")
        return self._null[0].float().unsqueeze(0).to(device), self._null[1].float().unsqueeze(0).to(device)


def open_cache(cache):
    return cache if hasattr(cache, "batch") else LatentCache(cache)
