"""SANA's caption encoders for ``prepare``: Gemma-2 from a SANA diffusers pipeline folder, precomputed embeddings,
or the ``hash:D,0,T`` stand-in. Each gives, per caption, ``context`` [T, D] (Gemma-2's last hidden state, as
``SanaPipeline.encode_prompt`` returns it) and ``context_mask`` [T] (float 1/0, the attention mask). SANA has no
pooled embedding, and DC-Gen-SANA's training is CFG-free, so no empty-caption embedding is stored."""

from __future__ import annotations

import os

import torch

from ...sana.text_encoder import (DEFAULT_INSTRUCTION_TEXT, SANA_MAX_SEQUENCE_LENGTH, preprocess_prompt, sana_token_ids,
                                  select_index)
from ...shared.checkpoints import read_json
from ...shared.errors import DCGenError
from .encoders import HashTextEncoder


def pipeline_family(folder: str) -> str | None:
    """"sana" or "flux" for a diffusers pipeline folder, from its ``model_index.json`` (pipeline class, text
    encoder class) or else ``text_encoder/config.json`` (Gemma-2 -> sana, CLIP -> flux); None when neither
    tells."""
    index = read_json(os.path.join(folder, "model_index.json"), "a diffusers pipeline index", missing_ok=True) or {}
    text = index.get("text_encoder")
    found = " ".join(str(v) for v in [index.get("_class_name", "")] + (list(text) if isinstance(text, list) else []))
    if "Sana" in found or "Gemma" in found:
        return "sana"
    if "Flux" in found or "CLIP" in found:
        return "flux"
    config = read_json(os.path.join(folder, "text_encoder", "config.json"), "a text encoder config",
                       missing_ok=True) or {}
    kind = " ".join([str(config.get("model_type", ""))] + [str(a) for a in config.get("architectures") or []]).lower()
    if "gemma" in kind:
        return "sana"
    if "clip" in kind:
        return "flux"
    return None


class SanaTextEncoder:
    """Gemma-2 from a SANA diffusers pipeline folder (``text_encoder/`` Gemma2Model, ``tokenizer/``), run as
    ``SanaPipeline.encode_prompt`` runs it: lower-cased caption after the complex human instruction, padded to
    ``instruction tokens + max_sequence_length - 2``, Gemma-2 with the padding mask, then token 0 and the last
    ``max_sequence_length - 1`` kept (``select_index``) for both the hidden state and the mask.

    Instruction on, eager soft-capped attention: as the pack's SANA inference encoder (= SanaPipeline.__call__) runs."""

    def __init__(self, folder: str, device, dtype, max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH):
        from transformers import AutoTokenizer, Gemma2Model

        def sub(name, what):
            p = os.path.join(folder, name)
            if not os.path.isdir(p):
                raise DCGenError(f"--text-encoder {folder}: expected a SANA pipeline folder with {name}/ ({what}), "
                                 "found none.")
            return p

        tok_dir, te_dir = sub("tokenizer", "Gemma's tokenizer"), sub("text_encoder", "Gemma2Model")
        config = read_json(os.path.join(te_dir, "config.json"), "a text encoder config", missing_ok=True)
        if config is None or config.get("model_type") != "gemma2":
            found = "no config.json" if config is None else f"model_type {config.get('model_type')!r}"
            raise DCGenError(f"{te_dir}: expected SANA's text encoder (a Gemma-2 model, config.json model_type "
                             f"'gemma2'), found {found}.")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise DCGenError(f"{tok_dir}: expected Gemma's tokenizer (tokenizer.json or tokenizer.model with "
                             f"tokenizer_config.json), could not load it ({e}).") from e
        try:
            self.model = Gemma2Model.from_pretrained(te_dir, dtype=dtype, attn_implementation="eager",
                                                     local_files_only=True).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise DCGenError(f"{te_dir}: expected Gemma2Model weights (safetensors), could not load them ({e}).") \
                from e
        self.tokenizer.padding_side = "right"
        self.device, self.max_len, self.folder = device, max_sequence_length, os.path.abspath(folder)

    @torch.no_grad()
    def encode(self, names, captions):
        rows = [sana_token_ids(self.tokenizer.encode, c, DEFAULT_INSTRUCTION_TEXT, self.max_len) for c in captions]
        ids = torch.tensor([r[0] for r in rows], device=self.device)
        mask = torch.tensor([r[1] for r in rows], device=self.device)
        hidden = self.model(ids, attention_mask=mask)[0]
        keep = select_index(ids.shape[1], self.max_len)
        return hidden[:, keep].float().cpu(), mask[:, keep].float().cpu()

    def describe(self) -> dict:
        return {"encoder": f"sana:{self.folder}", "max_sequence_length": self.max_len,
                "complex_human_instruction": True}


class SanaHashText(HashTextEncoder):
    """``hash:D,0,T``: the deterministic stand-in context [T, D] of :class:`HashTextEncoder` and a mask of ones over
    the first min(T, words + 1) tokens (BOS and one token per word), for tests and dry runs without Gemma."""

    def __init__(self, spec: str):
        super().__init__(spec)
        if self.pooled_dim != 0:
            raise DCGenError(f"--text-embeddings-from {spec}: expected hash:D,0,T for SANA (no pooled embedding), "
                             f"found pooled dimension {self.pooled_dim}.")

    def encode(self, names, captions):
        ctx = torch.stack([self._one(c)[0] for c in captions])
        mask = torch.zeros(len(captions), self.tokens)
        for i, c in enumerate(captions):
            mask[i, :min(self.tokens, len(preprocess_prompt(c).split()) + 1)] = 1.0
        return ctx, mask


class SanaPrecomputedText:
    """SANA embeddings from a safetensors file: ``<name>.context`` [T, D] per image (name: the image's path under
    the data folder without extension) and optionally ``<name>.context_mask`` [T] (1/0; all ones when absent)."""

    def __init__(self, path: str):
        from ...shared.checkpoints import load_safetensors

        self.sd, _ = load_safetensors(path)
        self.path = os.path.abspath(path)
        pooled = [k for k in self.sd if k.endswith(".pooled")]
        if pooled:
            raise DCGenError(f"{self.path}: expected SANA embeddings (<name>.context, <name>.context_mask), found "
                             f"pooled entries (FLUX's), e.g. '{pooled[0]}'.")

    def _one(self, name):
        ctx = self.sd.get(f"{name}.context")
        if ctx is None or ctx.ndim != 2:
            raise DCGenError(f"{self.path}: expected '{name}.context' [tokens, width] for the image '{name}', found "
                             f"{'none' if ctx is None else list(ctx.shape)}.")
        mask = self.sd.get(f"{name}.context_mask")
        if mask is None:
            mask = torch.ones(ctx.shape[0])
        elif tuple(mask.shape) != (ctx.shape[0],):
            raise DCGenError(f"{self.path}: expected '{name}.context_mask' of shape [{ctx.shape[0]}] (its context's "
                             f"tokens), found {list(mask.shape)}.")
        return ctx.float(), mask.float()

    def encode(self, names, captions):
        pairs = [self._one(n) for n in names]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def describe(self) -> dict:
        return {"encoder": f"precomputed:{self.path}"}
