"""Qwen-Image transformer state dicts: diffusers' QwenImageTransformer2DModel names are ComfyUI's names, so the only
work is recognising the layout and reading the config from the weights (and config.json where it is present)."""

from __future__ import annotations

from dataclasses import dataclass

from ..shared.errors import DCGenError

#: What only ``transformer/config.json`` says (diffusers' QwenImageTransformer2DModel defaults, which Qwen-Image,
#: Qwen-Image-Edit and DC-Gen-Qwen-Image-Edit keep); a file without config.json gets these.
DEFAULT_AXES_DIMS_ROPE = (16, 56, 56)

_FOREIGN = (
    ("x_embedder.weight", "a FLUX transformer (diffusers keys; load it with DC-Gen Load Model)"),
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX transformer (BFL keys; load it with DC-Gen Load Model)"),
    ("caption_projection.linear_1.weight", "a SANA transformer (load it with DC-Gen Load SANA)"),
    ("patch_embedding.weight", "a Wan video transformer"),
)


def is_qwen_image(sd) -> bool:
    return "txt_norm.weight" in sd and "img_in.weight" in sd and "transformer_blocks.0.img_mod.1.weight" in sd


def require_qwen_image(sd, source: str):
    if is_qwen_image(sd):
        return
    for key, what in _FOREIGN:
        if key in sd or f"transformer_blocks.0.{key}" in sd:
            raise DCGenError(f"{source}: expected a Qwen-Image transformer (diffusers QwenImageTransformer2DModel "
                             f"keys: txt_norm, img_in, transformer_blocks.N.img_mod), found {what}.")
    sample = ", ".join(sorted(sd)[:3])
    raise DCGenError(f"{source}: expected a Qwen-Image transformer (diffusers QwenImageTransformer2DModel keys: "
                     f"txt_norm, img_in, transformer_blocks.N.img_mod), found keys like {sample}.")


@dataclass(frozen=True)
class QwenImageConfig:
    in_features: int  # img_in input width: patch^2 * latent channels
    out_features: int  # proj_out rows
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    axes_dims_rope: tuple
    patch_size: int  # 1 for DC-Gen (DC-AE latents), 2 for base Qwen-Image (Wan latents)

    @property
    def inner_dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def latent_channels(self) -> int:
        return self.in_features // (self.patch_size ** 2)

    def comfy_kwargs(self) -> dict:
        """core QwenImageTransformer2DModel arguments. A DC-Gen model (patch 1, C channels) runs as patch 2 on
        C/4 channels: the DC-AE latent seen through pixel_shuffle(2) (see dcgen.py)."""
        if self.in_features % 4 or self.out_features % 4:
            raise DCGenError(f"expected img_in / proj_out widths divisible by 4, found "
                             f"{self.in_features} / {self.out_features}.")
        return {"image_model": "qwen_image", "patch_size": 2, "in_channels": self.in_features,
                "out_channels": self.out_features // 4, "num_layers": self.num_layers,
                "attention_head_dim": self.attention_head_dim, "num_attention_heads": self.num_attention_heads,
                "joint_attention_dim": self.joint_attention_dim, "axes_dims_rope": tuple(self.axes_dims_rope)}


def _count_blocks(sd) -> int:
    ids = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else 0


def config_from_state_dict(sd, config: dict | None, source: str) -> QwenImageConfig:
    """The transformer config from its weights; config.json (when present) for RoPE axes and patch size, checked
    against the weights."""
    require_qwen_image(sd, source)
    config = config or {}
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    inner, in_features = (int(n) for n in sd["img_in.weight"].shape)
    out_features = int(sd["proj_out.weight"].shape[0])
    axes = tuple(config.get("axes_dims_rope") or DEFAULT_AXES_DIMS_ROPE)
    if sum(axes) != head_dim:
        raise DCGenError(f"{source}: expected RoPE axes summing to the attention head width {head_dim}, found "
                         f"{list(axes)}{'' if 'axes_dims_rope' in config else ' (the default: no config.json)'}. "
                         f"Keep the transformer's config.json beside its weights.")
    # patch size: config.json says it; without one, a 64-wide embedder is base Qwen-Image (16 Wan channels, 2x2)
    # and anything else is a DC-Gen model on 1x1 patches (inferred from the weights)
    patch = int(config.get("patch_size") or (2 if in_features == 64 else 1))
    cfg = QwenImageConfig(in_features=in_features, out_features=out_features, num_layers=_count_blocks(sd),
                          attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                          joint_attention_dim=int(sd["txt_in.weight"].shape[1]), axes_dims_rope=axes,
                          patch_size=patch)
    for name, expected, found in (("in_channels", config.get("in_channels"), in_features),
                                  ("num_layers", config.get("num_layers"), cfg.num_layers),
                                  ("num_attention_heads", config.get("num_attention_heads"), cfg.num_attention_heads)):
        if expected is not None and int(expected) != found:
            raise DCGenError(f"{source}: config.json says {name} {expected}, the weights have {found}: the config "
                             f"and the weights are from different downloads.")
    return cfg
