"""The encoders of ``prepare``: the base VAE (FLUX's 16-channel AutoencoderKL, ``(z - shift) * scale``), the pack's
DC-AE (``z * scaling_factor``) and the caption encoders (FLUX's CLIP-L + T5-XXL from a diffusers pipeline folder,
precomputed embeddings, or the ``hash:D,P,T`` stand-in)."""

from __future__ import annotations

import hashlib
import os

import torch

from ...shared.checkpoints import load_checkpoint
from ...shared.errors import DCGenError


NULL_NAME = "__null__"

# FLUX.1's VAE (black-forest-labs/FLUX.1-dev vae/config.json)
FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611,
                       shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=True)


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
        from ...shared.dcae import load_dcae

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
        from ...shared.checkpoints import load_safetensors

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
