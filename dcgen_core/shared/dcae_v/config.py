"""DC-AE-V configurations: the authors' chunk-causal video autoencoders (dc_videogen/dc_ae_v.py).

Every released DC-AE-V has the same shape (``dc_ae_v_f32t4_chunk_causal`` / ``dc_ae_v_f64t4_chunk_causal``):

- encoder: a 3x3x3 conv + pixel-unshuffle by 2 into ``widths[1]`` (stage 0 is empty), then per stage ``depths[i]``
  ResBlocks (conv1 with bias + SiLU, conv2 without bias + RMSNorm3d, identity residual) and a conv + pixel-unshuffle
  downsample with a channel-averaging shortcut: by 2 in space for every stage but the last downsample, which is by
  4 in time only; a 3x3x3 conv to the latent channels;
- decoder: the mirror image (pixel-shuffle up with a channel-duplicating shortcut), then RMSNorm3d, SiLU and a conv
  + pixel-shuffle by 2 to RGB;
- every 3x3x3 conv is chunk-causal: frames are cut into chunks of ``chunk_frames`` (40) frames, 10 latent frames
  after the temporal downsample; inside a chunk the conv sees both sides (zeros after the chunk end), the frame
  before the chunk comes from the previous chunk (the feature cache) or is zero for the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

_WIDTHS_F32 = (128, 256, 512, 512, 1024, 1024, 1024)
_DEPTHS_F32 = (0, 5, 10, 4, 4, 4, 4)
_WIDTHS_F64 = (128, 256, 512, 512, 1024, 1024, 1024, 1024)
_DEPTHS_F64 = (0, 5, 10, 4, 4, 4, 4, 4)

# the DC-VideoGen-Wan2.1 pipeline's AEWrapper: scaling_factor 0.7241 (latents are divided by it before decoding)
WAN_SCALING_FACTOR = 0.7241


@dataclass(frozen=True)
class DCAEVConfig:
    variant: str
    latent_channels: int
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    chunk_frames: int = 40
    temporal_compression: int = 4
    in_channels: int = 3
    scaling_factor: float | None = None  # known only where a released DiT uses the latent space
    norm_eps: float = 1e-5

    def __post_init__(self):
        n = len(self.widths)
        if n < 3 or len(self.depths) != n:
            raise ValueError(f"DC-AE-V {self.variant}: expected >= 3 stages with one depth each, found widths "
                             f"{self.widths} and depths {self.depths}")
        if self.depths[0] != 0 or any(d < 1 for d in self.depths[1:]):
            raise ValueError(f"DC-AE-V {self.variant}: expected an empty stage 0 and at least one block in every "
                             f"other stage (the released layout), found depths {self.depths}")
        if self.chunk_frames % self.temporal_compression:
            raise ValueError(f"DC-AE-V {self.variant}: expected chunk_frames a multiple of "
                             f"{self.temporal_compression}, found {self.chunk_frames}")

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @property
    def spatial_compression(self) -> int:
        # project_in/out by 2, then by 2 at each stage boundary except the last one (temporal)
        return 2 ** (self.num_stages - 2)

    @property
    def chunk_latent_frames(self) -> int:
        return self.chunk_frames // self.temporal_compression

    def down_factors(self, stage: int) -> tuple[int, int]:
        """(spatial, temporal) factor of the downsample from ``stage`` into ``stage + 1`` (stage >= 1)."""
        return (1, self.temporal_compression) if stage == self.num_stages - 2 else (2, 1)

    def stage_chunk(self, stage: int) -> int:
        """Chunk length (in that stage's frames) of the convs in ``stage``: the deepest stage runs at latent rate."""
        return self.chunk_latent_frames if stage == self.num_stages - 1 else self.chunk_frames


def _variant(name: str, latent: int, widths, depths) -> DCAEVConfig:
    scaling = WAN_SCALING_FACTOR if name == "dc-ae-v-f32t4c32" else None
    return DCAEVConfig(variant=name, latent_channels=latent, widths=widths, depths=depths, scaling_factor=scaling)


VARIANTS: dict[str, DCAEVConfig] = {
    **{f"dc-ae-v-f32t4c{c}": _variant(f"dc-ae-v-f32t4c{c}", c, _WIDTHS_F32, _DEPTHS_F32) for c in (32, 64, 128, 256)},
    "dc-ae-v-f64t4c128": _variant("dc-ae-v-f64t4c128", 128, _WIDTHS_F64, _DEPTHS_F64),
}


def variant_for(latent_channels: int, widths, depths) -> str:
    """The released variant with this shape, else ``custom``."""
    for name, cfg in VARIANTS.items():
        if (cfg.latent_channels, cfg.widths, cfg.depths) == (latent_channels, tuple(widths), tuple(depths)):
            return name
    return "custom"
