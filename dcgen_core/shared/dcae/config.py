"""DC-AE architecture description, mirroring the diffusers ``AutoencoderDC`` constructor.

Every per-stage field is stored as a tuple with one entry per stage, so code
reading a config never has to handle the "string means all stages" shorthand
that diffusers config files use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

# Block names used by the original mit-han-lab configs, mapped to diffusers names.
_BLOCK_ALIASES = {
    "ResBlock": "ResBlock",
    "EfficientViTBlock": "EfficientViTBlock",
    "EViT_GLU": "EfficientViTBlock",
    "EViTGLU": "EfficientViTBlock",
    "EViTS5_GLU": "EfficientViTBlock",
    "EViTS5GLU": "EfficientViTBlock",
}
_DOWNSAMPLE_ALIASES = {"conv": "conv", "pixel_unshuffle": "pixel_unshuffle", "convpixelunshuffle": "pixel_unshuffle"}
_UPSAMPLE_ALIASES = {
    "interpolate": "interpolate",
    "interpolateconv": "interpolate",
    "pixel_shuffle": "pixel_shuffle",
    "convpixelshuffle": "pixel_shuffle",
}


def _per_stage(value, n: int, name: str) -> tuple:
    if isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} entries (one per stage), found {len(value)}")
    return value


@dataclass(frozen=True)
class DCAEConfig:
    variant: str = "custom"
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple = ("ResBlock",) * 6
    decoder_block_types: tuple = ("ResBlock",) * 6
    encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple = ("rms_norm",) * 6
    decoder_act_fns: tuple = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        m = len(self.decoder_block_out_channels)
        if n != m:
            raise ValueError(f"DC-AE config: encoder has {n} stages but decoder has {m}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("encoder_block_out_channels", tuple(int(c) for c in self.encoder_block_out_channels))
        set_("decoder_block_out_channels", tuple(int(c) for c in self.decoder_block_out_channels))
        for key in ("encoder_layers_per_block", "decoder_layers_per_block"):
            set_(key, tuple(int(c) for c in _per_stage(getattr(self, key), n, key)))
        for key in ("encoder_block_types", "decoder_block_types"):
            types = _per_stage(getattr(self, key), n, key)
            unknown = [t for t in types if t not in _BLOCK_ALIASES]
            if unknown:
                known = sorted(set(_BLOCK_ALIASES.values()))
                raise ValueError(f"{key}: unknown block type(s) {unknown}; known: {known}")
            set_(key, tuple(_BLOCK_ALIASES[t] for t in types))
        for key in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            set_(key, tuple(tuple(int(k) for k in s) for s in _per_stage(getattr(self, key), n, key)))
        set_("decoder_norm_types", _per_stage(self.decoder_norm_types, n, "decoder_norm_types"))
        set_("decoder_act_fns", _per_stage(self.decoder_act_fns, n, "decoder_act_fns"))
        # diffusers only tests `== "pixel_unshuffle"` / `== "interpolate"`; anything else means the other kind.
        down = _DOWNSAMPLE_ALIASES.get(self.downsample_block_type.lower(), "conv")
        up = _UPSAMPLE_ALIASES.get(self.upsample_block_type.lower(), "pixel_shuffle")
        set_("downsample_block_type", down)
        set_("upsample_block_type", up)
        set_("scaling_factor", float(self.scaling_factor))

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_stages - 1)

    @property
    def has_attention(self) -> bool:
        """True when the decoder contains EfficientViT (linear attention) blocks."""
        return any(
            t == "EfficientViTBlock" and n > 0
            for t, n in zip(self.decoder_block_types, self.decoder_layers_per_block)
        )

    @property
    def decoder_has_batch_norm(self) -> bool:
        return any(
            norm == "batch_norm" and n > 0 for norm, n in zip(self.decoder_norm_types, self.decoder_layers_per_block)
        )

    def to_diffusers_dict(self) -> dict:
        """Keyword arguments for ``diffusers.AutoencoderDC``."""
        d = asdict(self)
        d.pop("variant")
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    @classmethod
    def from_diffusers_dict(cls, config: dict, variant: str = "custom") -> "DCAEConfig":
        """Build from a diffusers ``config.json``; missing keys take diffusers' defaults."""
        names = {f.name for f in fields(cls)} - {"variant"}
        kwargs = {k: v for k, v in config.items() if k in names}
        # diffusers' constructor defaults, which differ from this dataclass's per-stage tuples
        n = len(kwargs.get("encoder_block_out_channels", cls.encoder_block_out_channels))
        kwargs.setdefault("encoder_block_types", "ResBlock")
        kwargs.setdefault("decoder_block_types", "ResBlock")
        kwargs.setdefault("decoder_norm_types", "rms_norm")
        kwargs.setdefault("decoder_act_fns", "silu")
        if n != 6:
            for key in ("encoder_layers_per_block", "decoder_layers_per_block", "encoder_qkv_multiscales",
                        "decoder_qkv_multiscales", "decoder_block_out_channels"):
                if key not in kwargs:
                    raise ValueError(f"config.json: '{key}' is required for a {n}-stage DC-AE")
        return cls(variant=variant, **kwargs)

    def with_flags_of(self, other: "DCAEConfig") -> "DCAEConfig":
        """This architecture with the parameter-free settings (and name) of ``other``."""
        return replace(
            self,
            variant=other.variant,
            encoder_out_shortcut=other.encoder_out_shortcut,
            decoder_in_shortcut=other.decoder_in_shortcut,
            decoder_conv_act_fn=other.decoder_conv_act_fn,
            decoder_act_fns=(other.decoder_act_fns if len(other.decoder_act_fns) == self.num_stages
                             else self.decoder_act_fns),
            scaling_factor=other.scaling_factor,
        )


_SANA_ENCODER = dict(
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv",
)


def _sana(variant: str) -> DCAEConfig:
    return DCAEConfig(
        variant=variant,
        latent_channels=32,
        **_SANA_ENCODER,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _lite() -> DCAEConfig:
    # Original config: SANA encoder; decoder ResBlock depth [0,3,5,4,4,4], ConvPixelShuffle, out_act silu.
    return DCAEConfig(
        variant="dc-ae-lite-f32c32",
        latent_channels=32,
        **_SANA_ENCODER,
        decoder_block_types="ResBlock",
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_layers_per_block=(0, 3, 5, 4, 4, 4),
        decoder_qkv_multiscales=((),) * 6,
        upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="silu",
        scaling_factor=0.41407,
    )


def _imagenet(variant: str, stages: int, latent: int, scaling: float) -> DCAEConfig:
    widths = (128, 256, 512, 512, 1024, 1024, 2048, 2048)[:stages]
    types = ("ResBlock",) * 3 + ("EfficientViTBlock",) * (stages - 3)
    return DCAEConfig(
        variant=variant,
        latent_channels=latent,
        encoder_block_types=types,
        decoder_block_types=types,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8) + (2,) * (stages - 3),
        decoder_layers_per_block=(0, 5, 10) + (2,) * (stages - 3),
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (stages - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (stages - 3),
        scaling_factor=scaling,
    )


def _dc_ae_1_5() -> DCAEConfig:
    # Original config dc_ae_f64_1_5: all ResBlock, no encoder out / decoder in shortcut, out_act silu.
    return DCAEConfig(
        variant="dc-ae-1.5-f64c128",
        latent_channels=128,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 1024),
        encoder_layers_per_block=(0, 5, 10, 4, 4, 4, 4),
        decoder_layers_per_block=(0, 5, 10, 4, 4, 4, 4),
        encoder_qkv_multiscales=((),) * 7,
        decoder_qkv_multiscales=((),) * 7,
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_conv_act_fn="silu",
        scaling_factor=0.5935,
    )


VARIANTS: dict[str, DCAEConfig] = {
    c.variant: c
    for c in (
        _sana("dc-ae-f32c32-sana-1.0"),
        _sana("dc-ae-f32c32-sana-1.1"),
        _lite(),
        _imagenet("dc-ae-f32c32-in-1.0", 6, 32, 0.3189),
        _imagenet("dc-ae-f32c32-mix-1.0", 6, 32, 0.4552),
        _imagenet("dc-ae-f64c128-in-1.0", 7, 128, 0.2889),
        _imagenet("dc-ae-f64c128-mix-1.0", 7, 128, 0.4538),
        _imagenet("dc-ae-f128c512-in-1.0", 8, 512, 0.4883),
        _imagenet("dc-ae-f128c512-mix-1.0", 8, 512, 0.3620),
        _dc_ae_1_5(),
    )
}
