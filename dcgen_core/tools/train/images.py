"""The image folder before any model loads: every image checked (caption, header size, full decode) and given an
aspect-ratio bucket on the DC-AE grid.

A bad item (no caption, an unreadable or empty caption, a file PIL cannot open or decode, a header claiming more
than ``--max-pixels``: PIL's decompression-bomb case) is listed with its reason and skipped, or, with ``--strict``,
refused as a whole before anything is encoded.

Buckets: sizes ``w x h`` on the grid ``step`` (the DC-AE's downsampling factor, and the base model's token when
base-VAE latents are cached: FLUX's 2x2 patch of the /8 latent, SANA's f32 latent) with ``w * h`` at most the
``--resolution`` area and aspect ratios up to ``--max-aspect``; each image goes to the bucket of the nearest aspect
ratio (log scale), resized to cover it and centre-cropped. Training draws each batch within one bucket.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ...shared.errors import DCGenError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass
class Item:
    name: str  # relative path without extension, "/"-separated
    path: str
    caption: str | None
    size: tuple[int, int] | None = None  # (width, height) once validated
    problem: str | None = None


def scan_folder(data_dir: str) -> list[Item]:
    """Every image under ``data_dir`` (sorted by name) with its caption (None when the caption file is missing or
    unreadable: the problem is recorded)."""
    if not os.path.isdir(data_dir):
        raise DCGenError(f"{data_dir}: expected a folder of images with captions (image.png + image.txt), found no "
                         "folder there.")
    items = []
    for root, _, files in os.walk(data_dir):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, f)
            name = os.path.relpath(os.path.join(root, stem), data_dir).replace(os.sep, "/")
            item = Item(name, path, None)
            caption_path = os.path.join(root, stem + ".txt")
            if not os.path.isfile(caption_path):
                item.problem = f"no caption file ({stem}.txt)"
            else:
                try:
                    with open(caption_path, encoding="utf-8") as cf:
                        item.caption = cf.read().strip()
                except (OSError, UnicodeDecodeError) as e:
                    item.problem = f"caption {stem}.txt unreadable as UTF-8 text ({e.__class__.__name__})"
                else:
                    if not item.caption:
                        item.problem = f"empty caption ({stem}.txt)"
            items.append(item)
    if not items:
        raise DCGenError(f"{data_dir}: expected images ({', '.join(IMAGE_EXTENSIONS)}) with captions, found none.")
    items.sort(key=lambda t: t.name)
    seen = set()
    for item in items:
        if item.name in seen and item.problem is None:
            item.problem = "another image of the same name (stem) comes first"
        seen.add(item.name)
    return items


def check_image(path: str, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for an image PIL decodes whole, else (None, the reason). The header's size is checked
    against ``max_pixels`` before any pixel is decoded."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the header size is checked here, against max_pixels, before decoding
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return None, (f"header claims {w}x{h} = {w * h / 1e6:.0f} MP, over --max-pixels "
                              f"{max_pixels / 1e6:.0f} MP (a decompression bomb or a huge scan)")
            if w < 1 or h < 1:
                return None, f"header claims {w}x{h}"
            im.load()
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        return None, f"not a readable image ({e.__class__.__name__}: {e})"
    except MemoryError:
        return None, "decoding ran out of memory"
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return (w, h), None


def validate(items: list[Item], max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> list[Item]:
    """Check every image (those with a usable caption); returns the bad items (``problem`` set)."""
    from .common import progress_bar

    bar = progress_bar(len(items), "validate", progress, unit="image")
    try:
        for item in items:
            if item.problem is None:
                item.size, item.problem = check_image(item.path, max_pixels)
            bar.update(1)
    finally:
        bar.close()
    return [it for it in items if it.problem is not None]


def report_bad(bad: list[Item], data_dir: str, strict: bool, log) -> None:
    if not bad:
        return
    lines = [f"  {it.path}: {it.problem}" for it in bad]
    if strict:
        shown = "\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        raise DCGenError(f"{data_dir}: expected every image readable and captioned (--strict), found {len(bad)} "
                         f"bad:\n{shown}")
    log(f"skipping {len(bad)} bad image(s):")
    for line in lines:
        log(line)


def make_buckets(width: int, height: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes on the ``step`` grid with area at most ``width * height`` and aspect ratio within
    ``max_aspect`` (both orientations); always includes ``width x height``."""
    if max_aspect < 1:
        raise DCGenError(f"--max-aspect: expected 1 or more, found {max_aspect}.")
    area = width * height
    found = {(width, height)}
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            found.add((w, h))
        w += step
    by_ratio = {}
    for w, h in sorted(found, key=lambda s: -s[0] * s[1]):  # one bucket per aspect ratio, the largest area
        by_ratio.setdefault(round(w / h, 6), (w, h))
    return sorted(by_ratio.values())


def parse_buckets(text: str, width: int, height: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """``auto`` (:func:`make_buckets`), ``none`` (the resolution only) or ``WxH,WxH,...``."""
    if text == "auto":
        return make_buckets(width, height, step, max_aspect)
    if text == "none":
        return [(width, height)]
    out = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise DCGenError(f"--buckets: expected auto, none or WxH,WxH,..., found {part!r}.") from None
        if w % step or h % step or w < step or h < step:
            raise DCGenError(f"--buckets {w}x{h}: expected multiples of {step} (the DC-AE grid), found another "
                             "size.")
        out.append((w, h))
    return sorted(set(out))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))
