"""The model family a ``prepare`` run caches for (``--family auto|flux|sana``) and the encoders that follow from it.

``auto`` reads the family from the text side: a ``--text-encoder`` pipeline folder (``model_index.json``, else
``text_encoder/config.json``: Gemma-2 -> sana, CLIP -> flux), a ``hash:D,P,T`` spec (P = 0 -> sana: SANA has no
pooled embedding) or a precomputed file (``<name>.pooled`` entries -> flux). The base VAE must agree: FLUX's is an
AutoencoderKL (16 channels, 2x2 patches of the /8 latent make a 16 px token), SANA's a DC-AE f32c32 (1x1 patches,
a 32 px token).
"""

from __future__ import annotations

import os

from ...shared.checkpoints import load_checkpoint, read_safetensors_header
from ...shared.errors import DCGenError
from .encoders import BaseVAE, DCAEEncoder, HashTextEncoder, make_text_encoder
from .sana_text import SanaHashText, SanaPrecomputedText, SanaTextEncoder, pipeline_family

FAMILIES = ("flux", "sana")
MAX_SEQUENCE_LENGTH = {"flux": 512, "sana": 300}  # T5 tokens (FLUX.1-dev); Gemma-2 tokens (SanaPipeline)
TEXT_KEYS = {"flux": ("context", "pooled"), "sana": ("context", "context_mask")}
SANA_BASE_CHANNELS = 32


def _text_family(text_encoder: str | None, text_embeddings_from: str | None) -> tuple[str | None, str]:
    """(family or None, what told it)."""
    if text_encoder:
        if not os.path.isdir(text_encoder):
            raise DCGenError(f"--text-encoder {text_encoder}: expected a diffusers pipeline folder (FLUX or SANA), "
                             "found no folder there.")
        return pipeline_family(text_encoder), f"--text-encoder {text_encoder}"
    spec = text_embeddings_from
    if spec.startswith("hash:"):
        pooled = HashTextEncoder(spec).pooled_dim  # refuses a malformed spec
        return ("sana" if pooled == 0 else "flux"), f"--text-embeddings-from {spec} (pooled dim {pooled})"
    keys = [k for k in read_safetensors_header(spec) if k != "__metadata__"]
    pooled = any(k.endswith(".pooled") for k in keys)
    return ("flux" if pooled else "sana"), f"{spec} ({'with' if pooled else 'no'} <name>.pooled entries)"


def resolve_family(family: str, text_encoder: str | None, text_embeddings_from: str | None) -> str:
    """The family of the run: ``family`` checked against (or, for ``auto``, read from) the text side."""
    if family not in ("auto",) + FAMILIES:
        raise DCGenError(f"--family: expected auto, flux or sana, found {family!r}.")
    if bool(text_encoder) == bool(text_embeddings_from):
        raise DCGenError("prepare: expected exactly one of --text-encoder (a FLUX or SANA pipeline folder) or "
                         "--text-embeddings-from (a safetensors of embeddings, or hash:D,P,T), found "
                         f"{'both' if text_encoder else 'neither'}.")
    found, source = _text_family(text_encoder, text_embeddings_from)
    if family == "auto":
        if found is None:
            raise DCGenError(f"{source}: expected a FLUX or SANA text encoder (model_index.json or "
                             "text_encoder/config.json naming CLIP or Gemma-2), found neither; pass --family.")
        return found
    if found is not None and found != family:
        raise DCGenError(f"--family {family}: expected {family.upper()} text embeddings, found {found.upper()}'s "
                         f"in {source}.")
    return family


def make_text(family: str, text_encoder, text_embeddings_from, device, dtype, max_sequence_length: int | None):
    length = max_sequence_length or MAX_SEQUENCE_LENGTH[family]
    if family == "flux":
        return make_text_encoder(text_encoder, text_embeddings_from, device, dtype, length)
    if text_encoder:
        return SanaTextEncoder(text_encoder, device, dtype, length)
    if text_embeddings_from.startswith("hash:"):
        return SanaHashText(text_embeddings_from)
    return SanaPrecomputedText(text_embeddings_from)


def make_base(path: str, family: str, device, dtype):
    """The alignment teacher's VAE: FLUX's AutoencoderKL or SANA's DC-AE, refused when it is the other family's."""
    from ...shared.dcae import is_kl_autoencoder

    kl = is_kl_autoencoder(load_checkpoint(path, component="vae").state_dict)
    if family == "flux":
        if not kl:
            raise DCGenError(f"--base-vae {path}: expected FLUX's VAE (an AutoencoderKL, 16 channels) for a FLUX "
                             "cache, found a DC-AE (SANA's base VAE, for --family sana; the DC-Gen target DC-AE "
                             "goes to --dcae).")
        return BaseVAE(path, device, dtype)
    if kl:
        raise DCGenError(f"--base-vae {path}: expected SANA's VAE (a DC-AE f32c32) for a SANA cache, found an "
                         "AutoencoderKL (FLUX's; for --family flux).")
    base = DCAEEncoder(path, "auto", device, dtype)
    if base.channels != SANA_BASE_CHANNELS:
        raise DCGenError(f"--base-vae {path}: expected SANA's DC-AE f32c32 ({SANA_BASE_CHANNELS} latent channels), "
                         f"found {base.variant} with {base.channels} (the DC-Gen target DC-AE goes to --dcae).")
    return base


def base_token(family: str, base) -> int:
    """Pixels per token of the base model: FLUX's 2x2 patches of the /8 latent, SANA's 1x1 patches."""
    return base.factor * (2 if family == "flux" else 1)
