"""The DC-Gen sampler node (text-to-image and img2img up to 4096x4096)."""

from ..dcgen_core.sampling import SIZE_PRESETS, resolve_size, sample
from .latent import MAX_RESOLUTION


class DCGenSampler:
    DESCRIPTION = ("Sample a DC-Gen model with the official schedule (euler/simple, time shift for the size, FLUX "
                   "guidance). Presets up to 4096x4096, or any size on the DC-AE grid. Connect a LATENT for "
                   "img2img (its size wins); connect the DC-AE VAE to also get the IMAGE.")
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "image")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        size = {"default": 4096, "min": 64, "max": MAX_RESOLUTION, "step": 64,
                "tooltip": "Used with the custom preset: multiples of the DC-AE f (64 for the 4K model)."}
        return {"required": {
            "model": ("MODEL", {"tooltip": "A DC-Gen model (Load DC-Gen Diffusion Model, or FLUX + embedding + LoRA)."}),
            "positive": ("CONDITIONING",),
            "size": (list(SIZE_PRESETS), {"default": "4096x4096 (1:1, 4K)"}),
            "width": ("INT", size),
            "height": ("INT", size),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "FLUX guidance embedding (the official value is 3.5)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple",
                                                              "tooltip": "simple = the official linspace schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1 with a LATENT: img2img refinement strength."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "img2img: a DC-AE latent of this model (e.g. VAE Encode with the DC-AE)."}),
            "vae": ("VAE", {"tooltip": "The model's DC-AE: also decode to IMAGE (tiles when memory is short)."}),
        }}

    def run(self, model, positive, size, width, height, steps, guidance, seed, sampler_name, scheduler, denoise,
            latent=None, vae=None):
        width, height = resolve_size(size, width, height)
        return sample(model, positive, width, height, steps, guidance, seed, sampler_name, scheduler, denoise,
                      latent=latent, vae=vae)


SAMPLER_NODES = {"DCGenSampler": (DCGenSampler, "DC-Gen Sampler (4K)")}
