"""Latent and schedule nodes: empty DC-AE latents and the DC-Gen time shift."""

from ..dcgen_core.shared.comfy_vae import empty_dcae_latent
from ..dcgen_core.flux.dcgen import set_time_shift
from ..dcgen_core.shared.schedules import RULES

MAX_RESOLUTION = 16384

class EmptyDCAELatent:
    DESCRIPTION = "Empty latent on a DC-AE grid: (batch, C, height/f, width/f) for the DC-AE VAE given."
    OUTPUT_TOOLTIPS = ("Zeros on the DC-AE grid, for the DC-Gen Sampler, KSampler or SamplerCustomAdvanced.",)
    SEARCH_ALIASES = ["dcgen", "dc-ae", "empty latent", "latent image", "4k", "1k"]
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
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "Images per batch; refused when the decoded images cannot fit in free memory."}),
        }}

    def generate(self, vae, width, height, batch_size):
        samples = empty_dcae_latent(vae, width, height, batch_size)
        # ComfyUI v0.33 samplers read the grid of an empty latent from this (v0.3.64 ignores it)
        return ({"samples": samples, "downscale_ratio_spacial": vae.downscale_ratio},)

class DCGenTimeShift:
    DESCRIPTION = ("Pick the DC-Gen time-shift rule and fix it to an image size. Without it the model follows the size it "
                   "samples, as the official pipeline does.")
    OUTPUT_TOOLTIPS = ("A copy of the MODEL with that time shift.",)
    SEARCH_ALIASES = ["dcgen", "time shift", "shift", "model sampling", "schedule", "mu", "4k"]
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DEFAULT_RULE = "model default"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 32,
                "tooltip": "Image size the shift is computed for, a multiple of the DC-AE f; width = height = 0: "
                           "follow the size of the latent being sampled."}
        return {"required": {
            "model": ("MODEL", {"tooltip": "A DC-Gen model (DC-Gen Load Model, or FLUX + aligned embedding)."}),
            "rule": ([cls.DEFAULT_RULE, *RULES.values()], {
                "default": cls.DEFAULT_RULE,
                "tooltip": "model default: flux2 for 1K (f32c32) models, mu for 4K (f64c128) models, as the authors' "
                           "pipeline. flux2: r = sqrt(tokens x C / 4096). mu: FLUX's resolution shift, linear in "
                           "the token count between (256, 0.5) and (4096, 1.15)."}),
            "width": ("INT", size),
            "height": ("INT", size),
        }}

    def patch(self, model, rule, width, height):
        by_label = {label: name for name, label in RULES.items()}
        return (set_time_shift(model, width, height, by_label.get(rule)),)


LATENT_NODES = {
    "DCGenEmptyLatent": (EmptyDCAELatent, "DC-Gen Empty Latent"),
    "DCGenTimeShift": (DCGenTimeShift, "DC-Gen Time Shift"),
}
