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

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import load_checkpoint
from ..errors import DCGenError

INDEX = "index.json"
NULL_TEXT = "null_text.safetensors"
FORMAT = "dcgen-train-cache"
VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NULL_NAME = "__null__"

# FLUX.1's VAE (black-forest-labs/FLUX.1-dev vae/config.json)
FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611,
                       shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=True)


# --- images --------------------------------------------------------------------------------------------------------

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


# --- encoders ------------------------------------------------------------------------------------------------------

class BaseVAE:
    """FLUX's AutoencoderKL (diffusers folder or file, diffusers or original keys); ``encode`` gives
    ``(mean - shift) * scale``, the latent FLUX samples in."""

    def __init__(self, path: str, device, dtype):
        from diffusers import AutoencoderKL

        ckpt = load_checkpoint(path, component="vae")
        sd = ckpt.state_dict
        for prefix in ("vae.", "first_stage_model."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
        if "encoder.conv_out.weight" not in sd:
            raise DCGenError(f"{path}: expected FLUX's VAE (an AutoencoderKL with encoder.conv_out), found keys like "
                             f"{', '.join(sorted(sd)[:3])}. A DC-AE goes to --dcae.")
        config = dict(FLUX_VAE_CONFIG)
        if ckpt.config:
            config.update({k: v for k, v in ckpt.config.items() if not k.startswith("_")})
        if any(k.startswith("encoder.down.") for k in sd):  # original (BFL / ldm) layout
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            sd = convert_ldm_vae_checkpoint(dict(sd), config)
        latent = int(sd["encoder.conv_out.weight"].shape[0]) // 2
        if latent != config["latent_channels"]:
            raise DCGenError(f"{path}: expected a VAE with {config['latent_channels']} latent channels (FLUX), found "
                             f"{latent}.")
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(config)
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "post_quant_conv."))}
        expected = {k for k in vae.state_dict() if not k.startswith(("decoder.", "post_quant_conv."))}
        if set(sd) != expected:
            raise DCGenError(f"{path}: expected the encoder tensors of an AutoencoderKL of its config, found missing "
                             f"{sorted(expected - set(sd))[:3]}, unexpected {sorted(set(sd) - expected)[:3]}.")
        self.encoder = vae.encoder.to_empty(device=device)
        self.encoder.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
        self.encoder.to(dtype=dtype).eval().requires_grad_(False)
        self.quant_conv = None
        if config.get("use_quant_conv", True):
            self.quant_conv = vae.quant_conv.to_empty(device=device)
            self.quant_conv.load_state_dict({k[len("quant_conv."):]: v for k, v in sd.items()
                                             if k.startswith("quant_conv.")})
            self.quant_conv.to(dtype=dtype).requires_grad_(False)
        self.scaling = float(config.get("scaling_factor") or 1.0)
        self.shift = float(config.get("shift_factor") or 0.0)
        self.channels = latent
        self.factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.device, self.dtype, self.path = device, dtype, os.path.abspath(path)

    @classmethod
    def from_model(cls, vae, device, dtype):
        """From a diffusers AutoencoderKL already built (GPU sizing, tests)."""
        self = cls.__new__(cls)
        self.encoder = vae.encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.quant_conv = vae.quant_conv.to(device=device, dtype=dtype) if vae.quant_conv is not None else None
        self.scaling = float(vae.config.scaling_factor or 1.0)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.device, self.dtype, self.path = device, dtype, "(in memory)"
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder(images.to(self.device, self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h[:, : self.channels]
        return ((mean.float() - self.shift) * self.scaling).cpu()

    def describe(self) -> dict:
        return {"path": self.path, "channels": self.channels, "spatial_compression": self.factor,
                "scaling_factor": self.scaling, "shift_factor": self.shift}


class DCAEEncoder:
    """The pack's DC-AE (any variant); ``encode`` gives ``z * scaling_factor``."""

    def __init__(self, path: str | None, variant: str, device, dtype, model=None):
        from ..dcae import load_dcae

        self.model = model if model is not None else load_dcae(path, variant=variant, dtype=dtype, device=device)
        cfg = self.model.config
        self.channels, self.factor = cfg.latent_channels, cfg.spatial_compression
        self.scaling, self.variant = float(cfg.scaling_factor), cfg.variant
        self.path = os.path.abspath(path) if path else "(in memory)"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model.encode(images, tiled=None).float() * self.scaling).cpu()

    def describe(self) -> dict:
        return {"path": self.path, "variant": self.variant, "channels": self.channels,
                "spatial_compression": self.factor, "scaling_factor": self.scaling}


class HashTextEncoder:
    """Deterministic stand-in text encoder (``hash:D,P,T``): context [T, D] and pooled [P] from N(0, 1) draws seeded
    by the caption's SHA-256. Same caption, same embeddings, on any machine."""

    def __init__(self, spec: str):
        try:
            dims = [int(v) for v in spec.split(":", 1)[1].split(",")]
            self.context_dim, self.pooled_dim, self.tokens = dims
        except (ValueError, IndexError):
            raise DCGenError(f"--text-embeddings-from {spec}: expected hash:CONTEXT_DIM,POOLED_DIM,TOKENS (e.g. "
                             "hash:4096,768,512), found another form.") from None
        self.spec = spec

    def _one(self, caption: str):
        seed = int.from_bytes(hashlib.sha256(caption.encode("utf-8")).digest()[:8], "little") & (2 ** 63 - 1)
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(self.tokens, self.context_dim, generator=g),
                torch.randn(self.pooled_dim, generator=g))

    def encode(self, names, captions):
        pairs = [self._one(c) for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def null(self):
        ctx, pooled = self._one("")
        return ctx, pooled

    def describe(self) -> dict:
        return {"encoder": self.spec}


class PrecomputedText:
    """Embeddings from a safetensors file: ``<name>.context`` [T, D], ``<name>.pooled`` [P] per image (name: the
    image's path under the data folder without extension) and ``__null__.*`` for the empty caption."""

    def __init__(self, path: str):
        from ..checkpoints import load_safetensors

        self.sd, _ = load_safetensors(path)
        self.path = os.path.abspath(path)
        self._need(NULL_NAME, "the empty caption (needed by the guidance-distilled objective)")

    def _need(self, name, what):
        for part in ("context", "pooled"):
            if f"{name}.{part}" not in self.sd:
                raise DCGenError(f"{self.path}: expected '{name}.{part}' for {what}, found none.")
        return self.sd[f"{name}.context"].float(), self.sd[f"{name}.pooled"].float()

    def encode(self, names, captions):
        pairs = [self._need(n, f"the image '{n}'") for n in names]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def null(self):
        return self._need(NULL_NAME, "the empty caption")

    def describe(self) -> dict:
        return {"encoder": f"precomputed:{self.path}"}


class FluxTextEncoder:
    """FLUX's text encoders from a diffusers FLUX pipeline folder, as FluxPipeline runs them: CLIP-L pooled output
    (77 tokens) and T5-XXL last hidden state (``max_sequence_length`` tokens, padded)."""

    def __init__(self, folder: str, device, dtype, max_sequence_length: int = 512):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        def sub(name):
            p = os.path.join(folder, name)
            if not os.path.isdir(p):
                raise DCGenError(f"--text-encoder {folder}: expected a FLUX pipeline folder with {name}/, found none.")
            return p

        kw = dict(local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(sub("tokenizer"), **kw)
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(sub("tokenizer_2"), **kw)
        self.clip = CLIPTextModel.from_pretrained(sub("text_encoder"), torch_dtype=dtype, **kw).to(device).eval()
        self.t5 = T5EncoderModel.from_pretrained(sub("text_encoder_2"), torch_dtype=dtype, **kw).to(device).eval()
        self.device, self.max_len, self.folder = device, max_sequence_length, os.path.abspath(folder)

    @torch.no_grad()
    def encode(self, names, captions):
        captions = list(captions)
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = self.clip(ids, output_hidden_states=False).pooler_output
        ids2 = self.tokenizer_2(captions, padding="max_length", max_length=self.max_len, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        context = self.t5(ids2, output_hidden_states=False)[0]
        return context.float().cpu(), pooled.float().cpu()

    def null(self):
        ctx, pooled = self.encode([NULL_NAME], [""])
        return ctx[0], pooled[0]

    def describe(self) -> dict:
        return {"encoder": f"flux:{self.folder}", "max_sequence_length": self.max_len}


def make_text_encoder(text_encoder: str | None, text_embeddings_from: str | None, device, dtype,
                      max_sequence_length: int = 512):
    if bool(text_encoder) == bool(text_embeddings_from):
        raise DCGenError("prepare: expected exactly one of --text-encoder (a FLUX pipeline folder) or "
                         "--text-embeddings-from (a safetensors of embeddings, or hash:D,P,T), found "
                         f"{'both' if text_encoder else 'neither'}.")
    if text_encoder:
        return FluxTextEncoder(text_encoder, device, dtype, max_sequence_length)
    if text_embeddings_from.startswith("hash:"):
        return HashTextEncoder(text_embeddings_from)
    return PrecomputedText(text_embeddings_from)


# --- the cache -----------------------------------------------------------------------------------------------------

class CacheWriter:
    """Writes items to shards of ``shard_size`` (stacked tensors per shard) and the index at ``close``."""

    def __init__(self, out_dir: str, meta: dict, shard_size: int = 256, text_dtype: torch.dtype = torch.bfloat16):
        self.out, self.meta, self.shard_size, self.text_dtype = out_dir, meta, max(1, shard_size), text_dtype
        os.makedirs(out_dir, exist_ok=True)
        self.items, self.shards, self.pending = [], [], []
        self.shapes = {}

    def add(self, name: str, caption: str, tensors: dict):
        for k, v in tensors.items():
            if v is None:
                continue
            shape = tuple(v.shape)
            if self.shapes.setdefault(k, shape) != shape:
                raise DCGenError(f"cache item '{name}': expected '{k}' of shape {list(self.shapes[k])} like the items "
                                 f"before it (one resolution and text length per cache), found {list(shape)}.")
        self.pending.append((name, caption, tensors))
        if len(self.pending) >= self.shard_size:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        file = f"shard-{len(self.shards):05d}.safetensors"
        keys = [k for k, v in self.pending[0][2].items() if v is not None]
        out = {}
        for k in keys:
            stacked = torch.stack([t[k] for _, _, t in self.pending])
            out[k] = (stacked.to(self.text_dtype) if k in ("context", "pooled") else stacked.float()).contiguous()
        save_file(out, os.path.join(self.out, file), metadata={"format": FORMAT})
        for row, (name, caption, _) in enumerate(self.pending):
            self.items.append({"name": name, "caption": caption, "shard": len(self.shards), "row": row})
        self.shards.append({"file": file, "count": len(self.pending)})
        self.pending = []

    def close(self, null_text: tuple[torch.Tensor, torch.Tensor] | None) -> str:
        self._flush()
        if null_text is not None:
            save_file({"context": null_text[0].to(self.text_dtype).contiguous(),
                       "pooled": null_text[1].to(self.text_dtype).contiguous()}, os.path.join(self.out, NULL_TEXT))
        index = {"format": FORMAT, "version": VERSION, "count": len(self.items), **self.meta,
                 "shapes": {k: list(v) for k, v in self.shapes.items()},
                 "null_text": NULL_TEXT if null_text is not None else None,
                 "shards": self.shards, "items": self.items}
        path = os.path.join(self.out, INDEX)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        os.replace(path + ".tmp", path)
        return path


def write_cache(out_dir: str, items, meta: dict, null_text=None, shard_size: int = 256,
                text_dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a cache from ``items``: (name, caption, {"base_latents": [16, H/8, W/8] or None, "dcae_latents":
    [C, H/f, W/f], "context": [T, D], "pooled": [P]}). ``meta`` goes into the index (see :func:`prepare`)."""
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
        try:
            with open(path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DCGenError(f"{folder}: expected a training cache (made by `python -m dcgen_core.train prepare`) "
                             f"with {INDEX}, could not read it ({e}).") from e
        if self.index.get("format") != FORMAT:
            raise DCGenError(f"{path}: expected a {FORMAT} index, found format {self.index.get('format')!r}.")
        for shard in self.index["shards"]:
            if not os.path.isfile(os.path.join(self.folder, shard["file"])):
                raise DCGenError(f"{path}: expected the shard {shard['file']} beside it, found none.")
        self._handles = {}

    def __len__(self) -> int:
        return int(self.index["count"])

    @property
    def dcae_channels(self) -> int:
        return int(self.index["shapes"]["dcae_latents"][0])

    @property
    def has_base_latents(self) -> bool:
        return "base_latents" in self.index["shapes"]

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

    def __init__(self, tensors: dict, null_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.tensors = tensors
        self._null = null_text
        self.index = {"shapes": {k: list(v.shape[1:]) for k, v in tensors.items()}}

    def __len__(self):
        return int(next(iter(self.tensors.values())).shape[0])

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


# --- prepare -------------------------------------------------------------------------------------------------------

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
