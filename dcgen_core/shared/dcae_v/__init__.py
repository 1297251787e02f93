"""DC-AE-V: the authors' chunk-causal video autoencoder (config, model, chunked runner, loading)."""

from .chunked import decode_video, encode_video, estimate_chunk_bytes, pick_tile
from .config import VARIANTS, WAN_SCALING_FACTOR, DCAEVConfig
from .loader import load_dcae_v, preferred_file, read_state_dict
from .model import DCAEV

__all__ = ["DCAEV", "DCAEVConfig", "VARIANTS", "WAN_SCALING_FACTOR", "decode_video", "encode_video",
           "estimate_chunk_bytes", "load_dcae_v", "pick_tile", "preferred_file", "read_state_dict"]
