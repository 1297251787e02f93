"""DC-AE (deep compression autoencoder): config, model, weight conversion, loading, tiling."""

from .config import VARIANTS, DCAEConfig
from .convert import convert_original_to_diffusers, is_original_layout
from .loader import infer_config, is_kl_autoencoder, load_dcae
from .model import DCAE
from .tiling import (decode_tiled, encode_tiled, estimate_decode_bytes, estimate_encode_bytes, should_tile_decode,
                     should_tile_encode)

__all__ = [
    "DCAE",
    "DCAEConfig",
    "VARIANTS",
    "convert_original_to_diffusers",
    "decode_tiled",
    "encode_tiled",
    "estimate_decode_bytes",
    "estimate_encode_bytes",
    "infer_config",
    "is_kl_autoencoder",
    "is_original_layout",
    "load_dcae",
    "should_tile_decode",
    "should_tile_encode",
]
