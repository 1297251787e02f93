"""Aligned embeddings: the DC-Gen input embedder and output head for a DC-AE latent.

DC-Gen keeps the base DiT and replaces only two linears: the patch embedder
(diffusers ``x_embedder`` / BFL ``img_in``, weight [hidden, C]; SANA's ``patch_embed.proj``, a 1x1 conv
[hidden, C, 1, 1], read as the same matrix) and the output head
(diffusers ``proj_out`` / BFL ``final_layer.linear``, weight [C, hidden]), C being the
DC-AE latent channel count. This module finds those tensors in a file (a standalone
embedding, a full transformer, or a LoRA file that also carries them) and validates them.

Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DCGenError, mismatch
from .keys import strip_key_prefix

#: Latent channel counts of the DC-AE variants DC-Gen can target.
DCAE_LATENT_CHANNELS = (32, 128, 512)

# (role, param) -> accepted key names (after prefix removal), diffusers first.
_NAMES = {
    ("in", "weight"): ("x_embedder.weight", "img_in.weight", "patch_embed.proj.weight"),
    ("in", "bias"): ("x_embedder.bias", "img_in.bias", "patch_embed.proj.bias"),
    ("out", "weight"): ("proj_out.weight", "final_layer.linear.weight"),
    ("out", "bias"): ("proj_out.bias", "final_layer.linear.bias"),
}
_LOOKUP = {name: role for role, names in _NAMES.items() for name in names}

# Hidden sizes of known base models, for messages.
_KNOWN_HIDDEN = {
    3072: "FLUX",
    2240: "SANA 1.6B / 4.8B",
    1152: "SANA 600M",
}


@dataclass
class AlignedEmbedding:
    img_in_weight: torch.Tensor  # [hidden, C]
    img_in_bias: torch.Tensor  # [hidden]
    out_weight: torch.Tensor  # [C, hidden]
    out_bias: torch.Tensor  # [C]
    source: str

    @property
    def latent_channels(self) -> int:
        return int(self.img_in_weight.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.img_in_weight.shape[0])

    def to_bfl_state_dict(self) -> dict[str, torch.Tensor]:
        """The four tensors under BFL/ComfyUI FLUX names (same tensor objects)."""
        return {
            "img_in.weight": self.img_in_weight,
            "img_in.bias": self.img_in_bias,
            "final_layer.linear.weight": self.out_weight,
            "final_layer.linear.bias": self.out_bias,
        }

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """The four tensors under diffusers names (same tensor objects)."""
        return {
            "x_embedder.weight": self.img_in_weight,
            "x_embedder.bias": self.img_in_bias,
            "proj_out.weight": self.out_weight,
            "proj_out.bias": self.out_bias,
        }


def _normalize_key(key: str) -> str:
    """Key without wrapper prefixes and without PEFT's ``modules_to_save.default.`` infix."""
    key = strip_key_prefix(key)
    return key.replace(".modules_to_save.default.", ".")


def _find(sd: dict, source: str) -> dict[tuple[str, str], tuple[str, torch.Tensor]]:
    """Map (role, param) -> (original key, tensor) for the embedding tensors in ``sd``."""
    found: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}
    for key, t in sd.items():
        role = _LOOKUP.get(_normalize_key(key))
        if role is None:
            continue
        if role in found:
            raise DCGenError(
                f"{source}: expected one {'input embedder' if role[0] == 'in' else 'output head'} "
                f"{role[1]}, found two ('{found[role][0]}' and '{key}')."
            )
        found[role] = (key, t)
    return found


def _shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def _build(found: dict, source: str, n_keys: int) -> AlignedEmbedding:
    if ("in", "weight") not in found:
        raise mismatch(source, "an input embedder (x_embedder.weight, img_in.weight or patch_embed.proj.weight)",
                       f"none among {n_keys} tensors",
                       "This is not a DC-Gen aligned embedding (or the file is incomplete).")
    if ("out", "weight") not in found:
        raise mismatch(source, "an output head (proj_out.weight or final_layer.linear.weight)",
                       f"none among {n_keys} tensors",
                       "The aligned embedding needs both the embedder and the head.")
    w_in = found[("in", "weight")][1]
    w_out = found[("out", "weight")][1]
    if w_in.ndim == 4:  # SANA's patch embedder is a conv: a 1x1 kernel is the same linear map
        if tuple(w_in.shape[2:]) != (1, 1):
            raise mismatch(f"{source} (input embedder weight)", "a 1x1 patch embedder [hidden, C, 1, 1] (DC-Gen "
                           "uses 1x1 patches)", f"shape {_shape(w_in)}")
        w_in = w_in.reshape(w_in.shape[0], w_in.shape[1])
    if w_in.ndim != 2:
        raise mismatch(f"{source} (input embedder weight)", "a 2-D [hidden, C] matrix", f"shape {_shape(w_in)}")
    if w_out.ndim != 2:
        raise mismatch(f"{source} (output head weight)", "a 2-D [C, hidden] matrix", f"shape {_shape(w_out)}")
    hidden, channels = int(w_in.shape[0]), int(w_in.shape[1])
    if tuple(w_out.shape) != (channels, hidden):
        raise mismatch(f"{source} (output head weight)",
                       f"shape [{channels}, {hidden}] to match the input embedder [{hidden}, {channels}]",
                       f"shape {_shape(w_out)}",
                       "The embedder and head come from different models.")
    if channels not in DCAE_LATENT_CHANNELS:
        hint = ""
        if channels == 64:
            hint = ("64 = 16 latent channels x 2x2 patches: this is the original FLUX embedder, "
                    "not a DC-Gen aligned embedding.")
        raise mismatch(f"{source} (latent channels)",
                       "a DC-AE latent channel count (" + ", ".join(map(str, DCAE_LATENT_CHANNELS)) + ")",
                       channels, hint)

    def bias(role, size, what):
        if role not in found:
            return torch.zeros(size, dtype=(found[(role[0], "weight")][1]).dtype)
        b = found[role][1]
        if tuple(b.shape) != (size,):
            raise mismatch(f"{source} ({what} bias)", f"shape [{size}]", f"shape {_shape(b)}")
        return b

    return AlignedEmbedding(
        img_in_weight=w_in,
        img_in_bias=bias(("in", "bias"), hidden, "input embedder"),
        out_weight=w_out,
        out_bias=bias(("out", "bias"), channels, "output head"),
        source=source,
    )


def parse_aligned_embedding(sd: dict, source: str) -> AlignedEmbedding:
    """Find and validate the embedder + head in ``sd`` (diffusers or BFL names, any prefix).

    A missing bias is taken as zeros. Raises DCGenError naming ``source`` when the
    embedder or head is missing, the shapes disagree, or C is not a DC-AE channel count.
    """
    return _build(_find(sd, source), source, len(sd))


def extract_aligned_embedding(sd: dict, source: str) -> tuple[AlignedEmbedding | None, dict]:
    """Split an aligned embedding off a state dict (e.g. a LoRA file that carries one).

    Returns ``(embedding or None, rest)`` where ``rest`` holds every other tensor under
    its original key. ``None`` when the file has no embedder/head tensors at all; a file
    with only part of them raises DCGenError like ``parse_aligned_embedding``.
    """
    found = _find(sd, source)
    if not found:
        return None, dict(sd)
    emb = _build(found, source, len(sd))
    used = {key for key, _ in found.values()}
    return emb, {k: v for k, v in sd.items() if k not in used}


def _model_label(hidden: int) -> str | None:
    return _KNOWN_HIDDEN.get(hidden)


def check_embedding_for_model(
    emb: AlignedEmbedding,
    hidden_size: int,
    latent_channels: int | None = None,
    source: str | None = None,
) -> None:
    """Raise DCGenError when ``emb`` does not fit a model of ``hidden_size`` (and a VAE of
    ``latent_channels`` latent channels, when given)."""
    source = source or emb.source
    if emb.hidden_size != hidden_size:
        name = _model_label(hidden_size)
        expected = f"hidden size {hidden_size} (the {name} model)" if name else f"hidden size {hidden_size} (the loaded model)"
        other = _model_label(emb.hidden_size)
        found_desc = f"an embedding for another base model, e.g. {other}" if other and other != name \
            else "an embedding for another base model"
        raise mismatch(source, expected, f"{emb.hidden_size} ({found_desc})",
                       "Pick the aligned embedding trained for this base model.")
    if latent_channels is not None and emb.latent_channels != latent_channels:
        raise mismatch(source, f"{latent_channels} latent channels (the selected DC-AE VAE)",
                       f"{emb.latent_channels} (an embedding for a DC-AE with {emb.latent_channels} channels)",
                       "Use the VAE this embedding was trained with (f32c32 -> 32, f64c128 -> 128, f128c512 -> 512).")


def load_aligned_embedding(path: str) -> AlignedEmbedding:
    """An aligned-embedding file, read into private memory (a model keeps these tensors)."""
    from .checkpoints import load_safetensors

    sd, _ = load_safetensors(path, copy=True)
    return parse_aligned_embedding(sd, source=path)
