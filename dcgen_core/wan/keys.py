"""Wan2.1 transformer key layouts: diffusers ``WanTransformer3DModel`` -> ComfyUI ``WanModel`` (original Wan names),
and the model config read from the files.

ComfyUI v0.3.64 has no diffusers -> Wan map, so this is diffusers' ``convert_wan_transformer_to_diffusers``
(loaders/single_file_utils.py) inverted for the Wan2.1 t2v / i2v parts (no VACE, motion or face adapters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..shared.errors import DCGenError

# diffusers -> Wan, applied in this order (substring replacements on the key)
_RENAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
)
_BLOCK_NORM2 = re.compile(r"^(blocks\.\d+)\.norm2\.")


def diffusers_to_comfy_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key[len("proj_out."):]
    for old, new in _RENAMES:
        key = key.replace(old, new)
    if key.startswith("blocks.") and key.endswith(".scale_shift_table"):
        return key[:-len("scale_shift_table")] + "modulation"
    return _BLOCK_NORM2.sub(r"\1.norm3.", key)  # diffusers' norm2 is Wan's cross-attention norm3


def comfy_to_diffusers_key(key: str) -> str:
    """The inverse of :func:`diffusers_to_comfy_key` (LoRA module names)."""
    if key == "head.modulation":
        return "scale_shift_table"
    if key.startswith("head.head."):
        return "proj_out." + key[len("head.head."):]
    m = re.match(r"^(blocks\.\d+)\.(norm3|modulation)(.*)$", key)
    if m:
        return f"{m[1]}.{'norm2' if m[2] == 'norm3' else 'scale_shift_table'}{m[3]}"
    key = "." + key
    for old, new in reversed(_RENAMES):
        dotted_old, dotted_new = ("." + old.strip(".") + "."), ("." + new.strip(".") + ".")
        key = key.replace(dotted_new, dotted_old)
    return key[1:]


def is_diffusers_wan(sd) -> bool:
    return "condition_embedder.time_embedder.linear_1.weight" in sd and "patch_embedding.weight" in sd


def is_comfy_wan(sd) -> bool:
    return "head.modulation" in sd and "patch_embedding.weight" in sd


def diffusers_to_comfy(sd: dict) -> dict:
    return {diffusers_to_comfy_key(k): v for k, v in sd.items()}


@dataclass(frozen=True)
class WanConfig:
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    in_dim: int
    out_dim: int
    patch_size: tuple[int, int, int]
    text_dim: int
    freq_dim: int
    eps: float
    qk_norm: bool
    cross_attn_norm: bool
    image_to_video: bool

    def unet_config(self) -> dict:
        """``comfy.ldm.wan.model.WanModel`` keyword arguments."""
        return {"image_model": "wan2.1", "model_type": "i2v" if self.image_to_video else "t2v",
                "patch_size": self.patch_size, "in_dim": self.in_dim, "dim": self.dim, "ffn_dim": self.ffn_dim,
                "freq_dim": self.freq_dim, "text_dim": self.text_dim, "out_dim": self.out_dim,
                "num_heads": self.num_heads, "num_layers": self.num_layers, "window_size": (-1, -1),
                "qk_norm": self.qk_norm, "cross_attn_norm": self.cross_attn_norm, "eps": self.eps}


def wan_config(sd: dict, config: dict | None, source: str) -> WanConfig:
    """The transformer's config from its ComfyUI-keyed tensors, with config.json (diffusers) where it tells more.

    Patch size, in/out channels and heads come from the files, not from core's detection (which assumes 2x2
    patches on Wan's 16-channel VAE and 128-wide heads).
    """
    config = config or {}
    try:
        patch_w = sd["patch_embedding.weight"]
        dim, in_dim, *patch = patch_w.shape
        head_out = sd["head.head.weight"].shape[0]
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        freq_dim = sd["time_embedding.0.weight"].shape[1]
    except KeyError as e:
        raise DCGenError(f"{source}: expected a Wan2.1 transformer (patch_embedding, head.head, blocks.0.ffn.0, "
                         f"text_embedding, time_embedding), found no {e.args[0]}.") from None
    patch = tuple(int(p) for p in patch)
    if tuple(config.get("patch_size", patch)) != patch:
        raise DCGenError(f"{source}: config.json says patch_size {config['patch_size']}, the weights have {patch}.")
    cells = patch[0] * patch[1] * patch[2]
    if head_out % cells:
        raise DCGenError(f"{source}: expected a head of out_channels x {cells} (patch {patch}) outputs, found "
                         f"{head_out}.")
    out_dim = int(config.get("out_channels", head_out // cells))
    head_dim = config.get("attention_head_dim", 128)
    num_heads = int(config.get("num_attention_heads", dim // head_dim))
    if num_heads * head_dim != dim:
        raise DCGenError(f"{source}: expected num_attention_heads x attention_head_dim = {dim}, found "
                         f"{num_heads} x {head_dim}.")
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    i2v = "img_emb.proj.0.weight" in sd or "blocks.0.cross_attn.k_img.weight" in sd
    if i2v and "img_emb.emb_pos" in sd:
        raise DCGenError(f"{source}: a Wan first-last-frame (FLF2V) transformer is not a DC-Gen-Wan model.")
    qk_norm = config.get("qk_norm", "rms_norm_across_heads") is not None and "blocks.0.self_attn.norm_q.weight" in sd
    return WanConfig(dim=dim, num_heads=num_heads, num_layers=layers, ffn_dim=ffn_dim, in_dim=in_dim,
                     out_dim=out_dim, patch_size=patch, text_dim=text_dim, freq_dim=freq_dim,
                     eps=float(config.get("eps", 1e-6)), qk_norm=qk_norm,
                     cross_attn_norm="blocks.0.norm3.weight" in sd, image_to_video=i2v)
