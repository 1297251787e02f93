"""Training data: an image folder with captions -> a latent cache (safetensors shards + ``index.json``).

Each item holds the image's base-VAE latent (the alignment teacher's input: FLUX's 16-channel AutoencoderKL,
``(z - shift) * scale``, or SANA's DC-AE f32c32, ``z * scaling_factor``), its DC-AE latent (the pack's DC-AE, any
variant, ``z * scaling_factor``: the spaces the models sample in) and its caption's text embeddings (FLUX: T5
``context`` + CLIP ``pooled``; SANA: Gemma-2 ``context`` + ``context_mask``). The index records the ``family``. For
FLUX the embeddings of the empty caption, which the guidance-distilled objective needs, are stored once in
``null_text.safetensors``; SANA's training is CFG-free and SANA has no pooled embedding, so none is stored.

Text encoders: ``--text-encoder`` a FLUX diffusers pipeline folder (CLIP-L ``text_encoder``/``tokenizer``, T5-XXL
``text_encoder_2``/``tokenizer_2``) or a SANA one (Gemma-2 ``text_encoder``/``tokenizer``: sana_text.py), or
``--text-embeddings-from`` a safetensors of precomputed embeddings (``<image stem>.context`` [T, D],
``<image stem>.pooled`` [P], and ``__null__.context``/``__null__.pooled``; SANA: ``.context``, ``.context_mask``), or
``hash:D,P,T``: a deterministic stand-in (embeddings drawn from a generator seeded by the caption's SHA-256), for
tests and dry runs without T5/CLIP weights (``hash:D,0,T``: SANA's). The family: prepare_family.py.
"""

from __future__ import annotations

import math
import os

import torch

from ...shared.errors import DCGenError
from .cache import CacheWriter
from .encoders import DCAEEncoder
from .images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, nearest_bucket, parse_buckets, report_bad, scan_folder,
                     validate)
from .prepare_family import TEXT_KEYS, base_token, make_base, make_text, resolve_family

__all__ = ["IMAGE_EXTENSIONS", "load_image", "parse_resolution", "prepare", "scan_images"]


def parse_resolution(text) -> tuple[int, int]:
    """``1024`` or ``1024x768`` (width x height)."""
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[1])
    s = str(text).lower().strip()
    try:
        if "x" in s:
            w, h = s.split("x", 1)
            return int(w), int(h)
        return int(s), int(s)
    except ValueError:
        raise DCGenError(f"--resolution: expected N or WxH (e.g. 1024 or 1024x768), found {text!r}.") from None


def scan_images(data_dir: str) -> list[tuple[str, str, str]]:
    """(name, image path, caption) for every image under ``data_dir`` with a caption file of the same stem; a
    missing caption is an error (:func:`prepare` lists and skips such items instead)."""
    items = scan_folder(data_dir)
    bad = [it for it in items if it.problem]
    if bad:
        raise DCGenError(f"{data_dir}: expected a caption for every image, found {len(bad)} problems, e.g. "
                         f"{[f'{it.path}: {it.problem}' for it in bad[:3]]}.")
    return [(it.name, it.path, it.caption) for it in items]


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """An RGB image resized to cover width x height and centre-cropped, as (3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # validated first (images.check_image), against --max-pixels
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = max(width / im.width, height / im.height)
            size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC)
            left, top = (im.width - width) // 2, (im.height - height) // 2
            im = im.crop((left, top, left + width, top + height))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except OSError as e:
        raise DCGenError(f"{path}: expected a readable image, could not open it ({e}).") from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def prepare(data_dir: str, out: str, *, dcae: str, base_vae: str | None = None, dcae_variant: str = "auto",
            text_encoder: str | None = None, text_embeddings_from: str | None = None, resolution="1024",
            batch_size: int = 4, shard_size: int = 256, device: str = "auto", text_dtype: str = "bfloat16",
            max_sequence_length: int | None = None, progress: bool = True, buckets: str = "auto",
            max_aspect: float = 2.0, strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, family: str = "auto",
            log=print) -> str:
    """Encode every good captioned image of ``data_dir`` into a cache at ``out``; returns the index path.

    Every image is validated before any model loads (bad ones listed and skipped, or refused with ``strict``);
    shards are written as they fill, with the index rewritten after each, so a run stopped part-way resumes:
    a second call with the same settings encodes only what the index does not hold yet. ``family`` (auto, flux,
    sana; see prepare_family.py) picks the base VAE, text encoder and text length (None: FLUX 512, SANA 300)."""
    from .common import progress_bar, resolve_device

    log = log or (lambda *_: None)
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(text_dtype)
    if tdtype is None:
        raise DCGenError(f"--text-dtype: expected bfloat16, float16 or float32, found {text_dtype!r}.")
    width, height = parse_resolution(resolution)
    family = resolve_family(family, text_encoder, text_embeddings_from)
    items = scan_folder(data_dir)
    bad = validate(items, max_pixels, progress)
    report_bad(bad, data_dir, strict, log)
    good = [it for it in items if it.problem is None]
    if not good:
        raise DCGenError(f"{data_dir}: expected at least one readable, captioned image, found none of "
                         f"{len(items)}.")
    dev = resolve_device(device)
    enc_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dc = DCAEEncoder(dcae, dcae_variant, dev, enc_dtype)
    base = make_base(base_vae, family, dev, enc_dtype) if base_vae else None
    token = base_token(family, base) if base else dc.factor
    step = math.lcm(dc.factor, token)  # a bucket on both grids: the target DC-AE's and the base model's tokens
    if width % step or height % step:
        raise DCGenError(f"--resolution {width}x{height}: expected multiples of {step} (the DC-AE's f{dc.factor}"
                         f"{f' and the {family.upper()} base model tokens of {token} px' if base else ''}), found "
                         "another size.")
    if dc.factor % token:
        raise DCGenError(f"--dcae f{dc.factor}: expected a compression that is a multiple of {family.upper()}'s "
                         f"token size {token} (DC-AE f32 / f64 / f128).")
    sizes = parse_buckets(buckets, width, height, step, max_aspect)
    text = make_text(family, text_encoder, text_embeddings_from, dev, enc_dtype, max_sequence_length)
    text_keys = TEXT_KEYS[family]
    meta = {"family": family, "resolution": [width, height], "buckets": [list(b) for b in sizes],
            "dcae": dc.describe(),
            "base_vae": base.describe() if base else None, "text": text.describe(),
            "data_dir": os.path.abspath(data_dir)}
    writer = CacheWriter(out, meta, shard_size, tdtype, resume=True)
    todo = [it for it in good if it.name not in writer.done]
    if writer.done:
        log(f"resuming {out}: {len(writer.done)} items cached, {len(todo)} to go")
    groups: dict[tuple[int, int], list] = {}
    for it in todo:
        groups.setdefault(nearest_bucket(it.size, sizes), []).append(it)
    bar = progress_bar(len(todo), "prepare", progress, unit="image")
    try:
        for (bw, bh), members in sorted(groups.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                images = torch.stack([load_image(it.path, bw, bh) for it in chunk])
                dl = dc.encode(images)
                bl = base.encode(images) if base else None
                embedded = text.encode([it.name for it in chunk], [it.caption for it in chunk])
                for j, it in enumerate(chunk):
                    writer.add(it.name, it.caption, {"base_latents": None if bl is None else bl[j],
                                                     "dcae_latents": dl[j],
                                                     **{k: v[j] for k, v in zip(text_keys, embedded)}},
                               bucket=(bw, bh))
                bar.update(len(chunk))
    finally:
        bar.close()
    return writer.close(text.null() if family == "flux" else None,  # SANA: CFG-free, no empty caption stored
                        skipped=[{"path": it.path, "problem": it.problem} for it in bad])
