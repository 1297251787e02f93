"""DC-Gen-Qwen-Image-Edit nodes: the transformer loader and the edit conditioning (reference image on the DC-AE)."""

from ..dcgen_core.qwen_image.comfy_model import load_qwen_edit_transformer, loader_choices
from ..dcgen_core.qwen_image.edit import RESIZE_MODES, encode_edit, reference_conditioning
from ..dcgen_core.shared import comfy_paths
from ..dcgen_core.shared.latent_space import WEIGHT_DTYPES
from .latent import MAX_RESOLUTION

_VAE_TIP = "The DC-AE f32c32 (DC-Gen Load DC-AE), the VAE DC-Gen-Qwen-Image-Edit samples in."
_IMAGE_TIP = "The image to edit (Load Image)."
_RESIZE_TIP = ("authors: resize to ~1 MP at the image's aspect ratio, sides multiples of 32 (the authors' "
               "calculate_dimensions, Lanczos). none: use the image as is (its sides must be multiples of 32).")
_SIZE = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 32,
         "tooltip": "Output size in pixels, a multiple of 32. 0 x 0: the resized reference's size floored to "
                    "multiples of 64, as the authors' pipeline does."}


class DCGenQwenEditModelLoader:
    DESCRIPTION = ("Load DC-Gen-Qwen-Image-Edit (nvidia/DC-Qwen-Image-Edit) as a MODEL on core's Qwen-Image, on DC-AE "
                   "f32c32 latents. KSampler and SamplerCustomAdvanced then follow the authors' schedule and true CFG "
                   "with per-token norm rescale.")
    CATEGORY = "DC-Gen/loaders"
    SEARCH_ALIASES = ["dcgen", "qwen image edit", "qwen edit", "image edit", "diffusion model", "unet loader"]
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("DC-Gen-Qwen-Image-Edit for KSampler / SamplerCustomAdvanced (euler, simple, cfg 3.5).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (loader_choices("diffusion_models"), {"tooltip": "In models/diffusion_models: the Hub download folder (also with its "
                                             "nested upload/DC-Qwen-Image-Edit/DC-Gen-Qwen-Image-Edit/), its "
                                             "transformer folder, or a single safetensors."}),
            "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip": "As in Load Diffusion Model."}),
        }, "optional": {"vae": ("VAE", {"tooltip": "Optional: " + _VAE_TIP + " Its scaling factor is used."})}}

    def load(self, unet_name, weight_dtype, vae=None):
        return (load_qwen_edit_transformer(comfy_paths.full_path("diffusion_models", unet_name), weight_dtype,
                                           vae=vae),)


class DCGenQwenEditEncode:
    DESCRIPTION = ("Instruction and image for DC-Gen-Qwen-Image-Edit as the authors prepare them: the image resized "
                   "to multiples of 32, read by Qwen2.5-VL with the prompt and the negative, DC-AE encoded as the "
                   "reference. Also the empty output latent.")
    CATEGORY = "DC-Gen/conditioning"
    SEARCH_ALIASES = ["dcgen", "qwen image edit", "text encode qwen image edit", "edit instruction", "reference"]
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("The instruction with the image and its reference latent.",
                       "The negative prompt with the image and its reference latent (true CFG).",
                       "Empty DC-AE latent of the output size, for the sampler.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "Qwen2.5-VL 7B (Load CLIP, type qwen_image)."}),
            "vae": ("VAE", {"tooltip": _VAE_TIP}),
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "prompt": ("STRING", {"multiline": True, "dynamic_prompts": True,
                                  "tooltip": "The edit instruction."}),
            "negative_prompt": ("STRING", {"default": " ", "multiline": True,
                                           "tooltip": "Negative prompt (official: a single space)."}),
            "resize": (list(RESIZE_MODES), {"default": RESIZE_MODES[0], "tooltip": _RESIZE_TIP}),
            "width": ("INT", _SIZE),
            "height": ("INT", _SIZE),
        }}

    def encode(self, clip, vae, image, prompt, negative_prompt, resize, width, height):
        return encode_edit(clip, vae, image, prompt, negative_prompt, resize, width, height)


class DCGenQwenEditReference:
    DESCRIPTION = ("Attach the image to edit to conditioning encoded elsewhere, as DC-Gen-Qwen-Image-Edit's reference "
                   "latent (resized to multiples of 32, DC-AE encoded). Also the empty output latent.")
    CATEGORY = "DC-Gen/conditioning"
    SEARCH_ALIASES = ["dcgen", "qwen image edit", "reference latent", "reference image", "edit image"]
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("The conditioning with the reference latent appended.",
                       "Empty DC-AE latent of the output size, for the sampler.")
    FUNCTION = "attach"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "Qwen2.5-VL conditioning (e.g. TextEncodeQwenImageEdit "
                                                         "without a VAE)."}),
            "vae": ("VAE", {"tooltip": _VAE_TIP}),
            "image": ("IMAGE", {"tooltip": _IMAGE_TIP}),
            "resize": (list(RESIZE_MODES), {"default": RESIZE_MODES[0], "tooltip": _RESIZE_TIP}),
            "width": ("INT", _SIZE),
            "height": ("INT", _SIZE),
        }}

    def attach(self, conditioning, vae, image, resize, width, height):
        return reference_conditioning(conditioning, vae, image, resize, width, height)


QWEN_EDIT_NODES = {
    "DCGenQwenEditModelLoader": (DCGenQwenEditModelLoader, "DC-Gen Load Qwen"),
    "DCGenQwenEditEncode": (DCGenQwenEditEncode, "DC-Gen Qwen Encode"),
    "DCGenQwenEditReference": (DCGenQwenEditReference, "DC-Gen Qwen Edit Ref"),
}
