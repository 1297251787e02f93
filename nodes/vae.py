"""Tiled DC-AE decode/encode nodes: tiling chosen automatically when the untiled pass would not fit, or by the user."""

from ..dcgen_core.shared.comfy_vae import TILE_MODES, dcae_decode, dcae_encode

CATEGORY = "DC-Gen/vae"

_MODE_TIP = ("auto: tile only when the untiled pass would not fit the free device memory (GPU memory, or RAM on CPU); "
             "always: tile; never: one untiled pass (as core VAE Decode/Encode, may run out of memory).")
_TILE_TIP = ("Tile edge in image pixels, a multiple of the DC-AE f (32 for f32c32, 64 for f64c128, 128 for "
             "f128c512; every step of this widget is). 0 = automatic: the largest tile that fits the free device "
             "memory.")
_OVERLAP_TIP = ("Overlap of neighbouring tiles in image pixels, a multiple of f and at most half the tile (with "
                "tile_size 0: at most a quarter of the picked tile). Tiles are feathered across it; conv-only "
                "decoders (DC-AE-Lite, DC-AE-1.5) match the untiled result once the overlap covers their reach.")


def _tiling_inputs():
    return {
        "mode": (list(TILE_MODES), {"default": "auto", "tooltip": _MODE_TIP}),
        "tile_size": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 128, "tooltip": _TILE_TIP}),
        "overlap": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 128, "tooltip": _OVERLAP_TIP}),
    }


class DCAEDecodeTiled:
    DESCRIPTION = ("Decode a DC-AE LATENT to an IMAGE, in overlapping tiles when the whole image would not fit in memory "
                   "(mode auto) or always.")
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    SEARCH_ALIASES = ["dcgen", "dc-ae", "vae decode", "tiled", "decode", "4k"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "A DC-AE latent (B, C, H/f, W/f), e.g. from the DC-Gen sampler."}),
            "vae": ("VAE", {"tooltip": "The DC-AE VAE of the latent (from DC-Gen Load DC-AE)."}),
            **_tiling_inputs(),
        }}

    def decode(self, samples, vae, mode, tile_size, overlap):
        return (dcae_decode(vae, samples["samples"], mode, tile_size, overlap),)


class DCAEEncodeTiled:
    DESCRIPTION = ("Encode an IMAGE to a DC-AE LATENT, in overlapping tiles when needed; width and height must be multiples "
                   "of the DC-AE f.")
    OUTPUT_TOOLTIPS = ("The DC-AE latent, for img2img with the DC-Gen Sampler.",)
    SEARCH_ALIASES = ["dcgen", "dc-ae", "vae encode", "tiled", "encode", "img2img", "4k"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "Width and height must be multiples of the DC-AE f (e.g. 64 for "
                                            "f64c128); crop or scale first."}),
            "vae": ("VAE", {"tooltip": "The DC-AE VAE (from DC-Gen Load DC-AE)."}),
            **_tiling_inputs(),
        }}

    def encode(self, pixels, vae, mode, tile_size, overlap):
        return ({"samples": dcae_encode(vae, pixels, mode, tile_size, overlap)},)


VAE_NODES = {
    "DCGenDCAEDecodeTiled": (DCAEDecodeTiled, "DC-Gen DC-AE Decode"),
    "DCGenDCAEEncodeTiled": (DCAEEncodeTiled, "DC-Gen DC-AE Encode"),
}
