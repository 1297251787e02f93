"""DC-AE-V video VAE nodes: the loader and the empty video latent."""

from ..dcgen_core.shared import comfy_paths
from ..dcgen_core.shared.comfy_vae_v import empty_video_latent, load_comfy_vae_v, video_vae_files
from ..dcgen_core.shared.dcae_v import VARIANTS
from ..dcgen_core.shared.latent_space import WEIGHT_DTYPES
from ..dcgen_core.shared.unipc_flow import unipc_flow_sampler, unipc_flow_sigmas
from ..dcgen_core.wan.comfy_model import load_dcgen_wan
from ..dcgen_core.wan.conditioning import wan_image_to_video

MAX_RESOLUTION = 16384


class DCAEVLoader:
    DESCRIPTION = ("Load a DC-AE-V (the chunk-causal video autoencoder of DC-VideoGen, e.g. dc-ae-v-f32t4c32) as a "
                   "video VAE for core VAE Encode/Decode: latents (B, 32, frames/4, H/32, W/32), 40-frame chunks.")
    CATEGORY = "DC-Gen/loaders"
    SEARCH_ALIASES = ["dcgen", "dc-ae-v", "dcae-v", "video vae", "dc-videogen", "wan", "vae"]
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The DC-AE-V as a core video VAE (VAE Decode gives frames for Create Video / Save WEBM).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (video_vae_files(), {
                "tooltip": "DC-AE-V weights in models/vae: the authors' dc-ae-v-f32t4c32-1.0-bf16.pt (read with "
                           "torch.load(weights_only=True) only) or its safetensors copy from `python -m "
                           "dcgen_core.convert`, which is used when it sits beside the .pt."}),
            "variant": (["auto", *VARIANTS], {
                "default": "auto",
                "tooltip": "auto: from the tensor shapes. Naming a variant checks the file against it."}),
        }}

    def load(self, vae_name, variant):
        return (load_comfy_vae_v(comfy_paths.full_path("vae", vae_name), variant),)


class EmptyDCAEVLatentVideo:
    DESCRIPTION = ("Empty DC-AE-V video latent (batch, 32, frames/4, height/32, width/32); the frame count is "
                   "rounded down to a multiple of 4 as the DC-VideoGen pipelines do (81 -> 80).")
    CATEGORY = "DC-Gen/latent"
    SEARCH_ALIASES = ["dcgen", "dc-ae-v", "empty latent video", "video", "wan", "t2v"]
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros on the DC-AE-V grid, for a DC-Gen-Wan model.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": 32, "max": MAX_RESOLUTION, "step": 16,
                "tooltip": "Video size in pixels, rounded down to a multiple of 32 (the DC-AE-V grid) as the "
                           "authors' pipelines do: 720x1280 samples 704x1280."}
        return {"required": {
            "vae": ("VAE", {"tooltip": "The DC-AE-V VAE (from DC-Gen Load DC-AE-V)."}),
            "width": ("INT", {"default": 1280, **size}),
            "height": ("INT", {"default": 720, **size}),
            "length": ("INT", {"default": 81, "min": 4, "max": 4096, "step": 1,
                               "tooltip": "Frames, rounded down to a multiple of 4. Multiples of 40 (80 for the "
                                          "default 81) fill whole 40-frame chunks of the VAE; a shorter last chunk "
                                          "is decoded without the previous chunk's context, as in the authors' "
                                          "code."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per batch."}),
        }}

    def generate(self, vae, width, height, length, batch_size):
        return ({"samples": empty_video_latent(vae, width, height, length, batch_size)},)


class DCGenWanModelLoader:
    DESCRIPTION = ("Load a DC-Gen-Wan2.1 transformer (transformer_t2v/ or transformer_i2v/ of "
                   "nvidia/DC-VideoGen-Wan2.1-14B, diffusers folders) as a MODEL on core's Wan2.1, sampling DC-AE-V "
                   "latents. Patch size and channels (32, or 68 for i2v) come from the files.")
    CATEGORY = "DC-Gen/loaders"
    SEARCH_ALIASES = ["dcgen", "wan", "wan2.1", "dc-videogen", "video", "t2v", "i2v", "diffusion model"]
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The DC-Gen-Wan model (core Wan2.1 class, DC-AE-V latent space, the shipped flow shift).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (comfy_paths.weight_files("diffusion_models"), {
                "tooltip": "The transformer folder in models/diffusion_models (e.g. DC-VideoGen-Wan2.1-14B/"
                           "transformer_t2v), or a single safetensors with diffusers or Wan keys."}),
            "weight_dtype": (WEIGHT_DTYPES, {
                "default": "default",
                "tooltip": "As in Load Diffusion Model; fp8_e4m3fn halves the 28 GB of the 14B model in bf16."}),
        }}

    def load(self, unet_name, weight_dtype):
        return (load_dcgen_wan(comfy_paths.full_path("diffusion_models", unet_name), weight_dtype),)


class DCGenWanImageToVideo:
    DESCRIPTION = ("Image-to-video conditioning for DC-Gen-Wan2.1 i2v, as the authors' pipeline builds it: the start "
                   "image repeated 4 frames then zeros, DC-AE-V encoded, a mask on the first latent frame, and the "
                   "CLIP vision output; plus the empty DC-AE-V latent (frames rounded down to a multiple of 4).")
    CATEGORY = "DC-Gen/conditioning"
    SEARCH_ALIASES = ["dcgen", "wan", "image to video", "i2v", "wanimagetovideo", "video"]
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("Positive prompt with the image conditioning.", "Negative prompt with the image conditioning.",
                       "Empty DC-AE-V latent (batch, 32, frames/4, height/32, width/32) to sample.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt (core CLIP Text Encode with Load CLIP type wan)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (the authors' Wan negative prompt)."}),
            "vae": ("VAE", {"tooltip": "The DC-AE-V VAE (DC-Gen Load DC-AE-V): encodes the start image."}),
            "width": ("INT", {"default": 1280, "min": 32, "max": MAX_RESOLUTION, "step": 16,
                              "tooltip": "Video width; rounded down to a multiple of 32 as the authors do."}),
            "height": ("INT", {"default": 720, "min": 32, "max": MAX_RESOLUTION, "step": 16,
                               "tooltip": "Video height; rounded down to a multiple of 32 as the authors do "
                                          "(720 -> 704)."}),
            "length": ("INT", {"default": 81, "min": 4, "max": 4096, "step": 1,
                               "tooltip": "Frames, rounded down to a multiple of 4 (81 -> 80)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per batch."}),
        }, "optional": {
            "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                "tooltip": "CLIP Vision Encode (crop none) of the start image with clip_vision_h (ViT-H/14)."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame; scaled to width x height when it differs."}),
        }}

    def run(self, positive, negative, vae, width, height, length, batch_size, clip_vision_output=None,
            start_image=None):
        return wan_image_to_video(positive, negative, vae, width, height, length, batch_size, start_image,
                                  clip_vision_output)


class DCGenUniPCFlowSampler:
    DESCRIPTION = ("diffusers' UniPCMultistepScheduler on flow sigmas (the DC-Gen-Wan / Wan2.1 pipelines' "
                   "scheduler: order 2, bh2, integer timesteps, starts from the noise) as a SAMPLER for "
                   "SamplerCustomAdvanced, with DC-Gen UniPC Flow Sigmas.")
    CATEGORY = "DC-Gen/sampling"
    SEARCH_ALIASES = ["dcgen", "unipc", "wan", "video", "sampler", "flow"]
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler, for SamplerCustomAdvanced (with DC-Gen UniPC Flow Sigmas).",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return (unipc_flow_sampler(),)


class DCGenUniPCFlowSigmas:
    DESCRIPTION = ("SIGMAS of diffusers' UniPCMultistepScheduler(use_flow_sigmas, flow_shift) for DC-Gen-Wan: "
                   "linspace(1, 1/1000) shifted, final 0. shift 0 = the model's (the shipped scheduler config).")
    CATEGORY = "DC-Gen/sampling"
    SEARCH_ALIASES = ["dcgen", "unipc", "wan", "sigmas", "scheduler", "shift"]
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The sigmas (final 0 included), for SamplerCustomAdvanced.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The DC-Gen-Wan model (its flow shift is used when shift is 0)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps (the authors: 20)."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift; 0: the model's, from scheduler/scheduler_config.json."}),
        }}

    def run(self, model, steps, shift):
        if shift == 0:
            shift = float(model.get_model_object("model_sampling").shift)
        return (unipc_flow_sigmas(steps, shift),)


VIDEO_NODES = {
    "DCGenWanImageToVideo": (DCGenWanImageToVideo, "DC-Gen Wan I2V"),
    "DCGenUniPCFlowSampler": (DCGenUniPCFlowSampler, "DC-Gen UniPC Flow"),
    "DCGenUniPCFlowSigmas": (DCGenUniPCFlowSigmas, "DC-Gen UniPC Sigmas"),
    "DCGenWanModelLoader": (DCGenWanModelLoader, "DC-Gen Load Wan"),
    "DCGenDCAEVLoader": (DCAEVLoader, "DC-Gen Load DC-AE-V"),
    "DCGenEmptyDCAEVLatentVideo": (EmptyDCAEVLatentVideo, "DC-Gen Empty Video"),
}
