"""Latent and schedule nodes: empty DC-AE latents and the DC-Gen time shift."""

from ..dcgen_core.comfy_vae import empty_dcae_latent
from ..dcgen_core.flux import set_time_shift

MAX_RESOLUTION = 16384

class EmptyDCAELatent:
    DESCRIPTION = "Empty latent on the DC-AE grid: (batch, C, height/f, width/f) for the given DC-AE VAE."
    CATEGORY = "DC-Gen/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 32, "max": MAX_RESOLUTION, "step": 32,
                "tooltip": "Image size in pixels; a multiple of the DC-AE compression f (32 for f32c32, 64 for f64c128)."}
        return {"required": {
            "vae": ("VAE", {"tooltip": "The DC-AE VAE (it tells C and f)."}),
            "width": ("INT", size),
            "height": ("INT", size),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    def generate(self, vae, width, height, batch_size):
        samples = empty_dcae_latent(vae, width, height, batch_size)
        # ComfyUI v0.33 samplers read the grid of an empty latent from this (v0.3.64 ignores it)
        return ({"samples": samples, "downscale_ratio_spacial": vae.downscale_ratio},)

class DCGenTimeShift:
    DESCRIPTION = ("Fix the official DC-Gen time shift to a given image size. Without this node the shift follows "
                   "the size of the latent being sampled.")
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 32, "max": MAX_RESOLUTION, "step": 32}
        return {"required": {"model": ("MODEL",), "width": ("INT", size), "height": ("INT", size)}}

    def patch(self, model, width, height):
        return (set_time_shift(model, width, height),)

LATENT_NODES = {
    "DCGenEmptyLatent": (EmptyDCAELatent, "Empty DC-AE Latent Image"),
    "DCGenTimeShift": (DCGenTimeShift, "DC-Gen Time Shift"),
}
