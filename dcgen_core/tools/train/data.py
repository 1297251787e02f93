"""Training data: an image folder with captions -> a latent cache (safetensors shards + ``index.json``).

Each item holds the image's base-VAE latent (FLUX's 16-channel AutoencoderKL, ``(z - shift) * scale``), its DC-AE
latent (the pack's DC-AE, any variant, ``z * scaling_factor``: the spaces the models sample in) and its caption's
text embeddings (T5 context + CLIP pooled for FLUX). The embeddings of the empty caption, which the
guidance-distilled objective needs, are stored once in ``null_text.safetensors``.

Text encoders: ``--text-encoder`` a FLUX diffusers pipeline folder (CLIP-L ``text_encoder``/``tokenizer``, T5-XXL
``text_encoder_2``/``tokenizer_2``), or ``--text-embeddings-from`` a safetensors of precomputed embeddings
(``<image stem>.context`` [T, D], ``<image stem>.pooled`` [P], and ``__null__.context``/``__null__.pooled``), or
``hash:D,P,T``: a deterministic stand-in (embeddings drawn from a generator seeded by the caption's SHA-256), for
tests and dry runs without T5/CLIP weights.
"""

from __future__ import annotations

import os

import torch

from ...shared.errors import DCGenError
from .cache import CacheWriter
from .encoders import BaseVAE, DCAEEncoder, make_text_encoder


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
    """(name, image path, caption) for every image under ``data_dir`` with a caption file of the same stem."""
    if not os.path.isdir(data_dir):
        raise DCGenError(f"{data_dir}: expected a folder of images with captions (image.png + image.txt), found no "
                         "folder there.")
    items, missing = [], []
    for root, _, files in os.walk(data_dir):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, f)
            caption_path = os.path.join(root, stem + ".txt")
            if not os.path.isfile(caption_path):
                missing.append(path)
                continue
            with open(caption_path, encoding="utf-8") as cf:
                caption = cf.read().strip()
            name = os.path.relpath(os.path.join(root, stem), data_dir).replace(os.sep, "/")
            items.append((name, path, caption))
    if missing:
        raise DCGenError(f"{data_dir}: expected a caption file (same name, .txt) for every image, found "
                         f"{len(missing)} without, e.g. {missing[:3]}.")
    if not items:
        raise DCGenError(f"{data_dir}: expected images ({', '.join(IMAGE_EXTENSIONS)}) with captions, found none.")
    items.sort(key=lambda t: t[0])
    names = [n for n, _, _ in items]
    if len(set(names)) != len(names):
        raise DCGenError(f"{data_dir}: expected one image per name, found two images of the same stem.")
    return items


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """An RGB image resized to cover width x height and centre-cropped, as (3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

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
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def prepare(data_dir: str, out: str, *, dcae: str, base_vae: str | None = None, dcae_variant: str = "auto",
            text_encoder: str | None = None, text_embeddings_from: str | None = None, resolution="1024",
            batch_size: int = 4, shard_size: int = 256, device: str = "auto", text_dtype: str = "bfloat16",
            max_sequence_length: int = 512, progress: bool = True) -> str:
    """Encode every captioned image of ``data_dir`` into a cache at ``out``; returns the index path."""
    from .common import progress_bar, resolve_device

    dev = resolve_device(device)
    enc_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    width, height = parse_resolution(resolution)
    items = scan_images(data_dir)
    dc = DCAEEncoder(dcae, dcae_variant, dev, enc_dtype)
    base = BaseVAE(base_vae, dev, enc_dtype) if base_vae else None
    step = dc.factor if base is None else max(dc.factor, base.factor * 2)
    if width % step or height % step:
        raise DCGenError(f"--resolution {width}x{height}: expected multiples of {step} (the DC-AE's f{dc.factor}"
                         f"{' and FLUX 2x2 patches of the /8 latent' if base else ''}), found another size.")
    if base is not None and (dc.factor % (base.factor * 2)):
        raise DCGenError(f"--dcae f{dc.factor}: expected a compression that is a multiple of FLUX's token size "
                         f"{base.factor * 2} (DC-AE f32 / f64 / f128).")
    text = make_text_encoder(text_encoder, text_embeddings_from, dev, enc_dtype, max_sequence_length)
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(text_dtype)
    if tdtype is None:
        raise DCGenError(f"--text-dtype: expected bfloat16, float16 or float32, found {text_dtype!r}.")
    meta = {"resolution": [width, height], "dcae": dc.describe(),
            "base_vae": base.describe() if base else None, "text": text.describe(),
            "data_dir": os.path.abspath(data_dir)}
    writer = CacheWriter(out, meta, shard_size, tdtype)
    bar = progress_bar(len(items), "prepare", progress, unit="image")
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = torch.stack([load_image(p, width, height) for _, p, _ in chunk])
            dl = dc.encode(images)
            bl = base.encode(images) if base else None
            ctx, pooled = text.encode([n for n, _, _ in chunk], [c for _, _, c in chunk])
            for j, (name, _, caption) in enumerate(chunk):
                writer.add(name, caption, {"base_latents": None if bl is None else bl[j], "dcae_latents": dl[j],
                                           "context": ctx[j], "pooled": pooled[j]})
            bar.update(len(chunk))
    finally:
        bar.close()
    return writer.close(text.null())
