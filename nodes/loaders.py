"""Loader and patcher nodes: DC-AE VAE, DC-Gen transformer, aligned embedding, LoRA."""

from ..dcgen_core.shared import comfy_paths
from ..dcgen_core.shared.comfy_vae import load_comfy_vae
from ..dcgen_core.shared.dcae import VARIANTS
from ..dcgen_core.shared.embedding import load_aligned_embedding
from ..dcgen_core.architectures import apply_aligned_embedding
from ..dcgen_core.flux.comfy_model import load_flux_transformer
from ..dcgen_core.flux.four_bit import SVDQUANT_BACKENDS, load_4bit_flux
from ..dcgen_core.shared.latent_space import WEIGHT_DTYPES
from ..dcgen_core.architectures import apply_lora
from ..dcgen_core.sana.comfy_model import load_sana_transformer
from ..dcgen_core.sana.text_encoder import load_sana_text_encoder

CATEGORY = "DC-Gen/loaders"

_VAE_TIP = ("Optional DC-AE VAE the model was trained with: its scaling factor is used and its channel count "
            "checked against the model.")


class DCAELoader:
    DESCRIPTION = ("Load a DC-AE (deep compression autoencoder, any variant) as a VAE for core VAE Decode/Encode and the "
                   "DC-Gen nodes. The variant is read from config.json, the name or the weights.")
    OUTPUT_TOOLTIPS = ("The DC-AE as a core VAE: VAE Decode/Encode, DC-Gen DC-AE Decode/Encode, the DC-Gen Sampler.",)
    SEARCH_ALIASES = ["dcgen", "dc-ae", "dcae", "vae", "autoencoder", "deep compression", "sana vae", "4k"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (comfy_paths.weight_files("vae"), {
                "tooltip": "DC-AE in models/vae: a diffusers folder (listed once; its config.json is read) or a "
                           "single safetensors (diffusers or original keys)."}),
            "variant": (["auto", *VARIANTS], {
                "default": "auto",
                "tooltip": "auto: from config.json, then the file name, then the weights. Pick the variant when the "
                           "file name does not tell (in vs mix, SANA 1.0 vs 1.1 differ only in scaling factor)."}),
        }}

    def load(self, vae_name, variant):
        return (load_comfy_vae(comfy_paths.full_path("vae", vae_name), variant),)


def _transformer_inputs(unet_tip: str) -> dict:
    """A transformer file or diffusers folder in models/diffusion_models, weight_dtype, the optional DC-AE VAE."""
    return {"required": {
        "unet_name": (comfy_paths.weight_files("diffusion_models"), {"tooltip": unet_tip}),
        "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip": "As in Load Diffusion Model."}),
    }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}


class DCGenModelLoader:
    DESCRIPTION = ("Load a DC-Gen transformer (DC-Gen-FLUX.1-Krea-Dev Res1K or Res4K, or a base FLUX) as a MODEL that "
                   "samples DC-AE latents. A diffusers folder appears once in the list; weights are read into memory.")
    OUTPUT_TOOLTIPS = ("The DC-Gen MODEL, for the DC-Gen Sampler, KSampler or SamplerCustomAdvanced.",)
    SEARCH_ALIASES = ["dcgen", "dc-gen flux", "flux krea", "1k", "4k", "diffusion model", "unet loader"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return _transformer_inputs("Transformer in models/diffusion_models: single safetensors (diffusers or BFL "
                                   "keys) or a diffusers transformer folder (sharded, with its index json).")

    def load(self, unet_name, weight_dtype, vae=None):
        return (load_flux_transformer(comfy_paths.full_path("diffusion_models", unet_name), weight_dtype, vae=vae),)


class DCGenNVFP4ModelLoader:
    DESCRIPTION = ("Load a 4-bit FLUX or DC-Gen-FLUX transformer (NVFP4, or nunchaku SVDQuant int4/fp4) as a MODEL; "
                   "weights stay 4-bit in memory.")
    OUTPUT_TOOLTIPS = ("The 4-bit MODEL (a base FLUX file: add DC-Gen Add Embedding + DC-Gen Load LoRA).",)
    SEARCH_ALIASES = ["dcgen", "nvfp4", "fp4", "int4", "4-bit", "4bit", "svdquant", "nunchaku", "quantized", "4k"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (comfy_paths.weight_files("diffusion_models"), {
                "tooltip": "4-bit transformer in models/diffusion_models: an NVFP4 safetensors (per-layer "
                           "comfy_quant entries or a _quantization_metadata header) or a nunchaku "
                           "svdq-int4/svdq-fp4 FLUX safetensors, or nunchaku's pre-v1 folder of the same "
                           "(transformer_blocks.safetensors + unquantized_layers.safetensors + config.json)."}),
            "svdquant_backend": (list(SVDQUANT_BACKENDS), {
                "default": "auto",
                "tooltip": "nunchaku SVDQuant files only. auto: nunchaku's CUDA kernels when nunchaku is "
                           "installed and supports the GPU, else pure torch (dequantized, runs anywhere). "
                           "nunchaku: require the kernels. torch: never use them."}),
        }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}

    def load(self, unet_name, svdquant_backend="auto", vae=None):
        return (load_4bit_flux(comfy_paths.full_path("diffusion_models", unet_name), vae=vae,
                               svdquant_backend=svdquant_backend),)


class DCGenSanaModelLoader:
    DESCRIPTION = ("Load a SANA transformer (600M / 1.6B, SANA-1.5; diffusers or original NVlabs files) as a MODEL for "
                   "core samplers and the DC-Gen Sampler.")
    OUTPUT_TOOLTIPS = ("The SANA MODEL (DC-AE f32c32 latents; DC-Gen-SANA after DC-Gen Add Embedding + LoRA).",)
    SEARCH_ALIASES = ["dcgen", "sana", "sana 1.5", "sana 1.6b", "efficient-large-model", "diffusion model"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return _transformer_inputs("SANA transformer in models/diffusion_models: a diffusers transformer folder or "
                                   "file, or an original SANA checkpoint as safetensors (512 px to 4K: its "
                                   "resolution and position embedding are read from its pos_embed; a config.json "
                                   "beside it for widths other than SANA's own, and for a 2K / 4K diffusers file). "
                                   "The flow shift comes from the release's scheduler/scheduler_config.json.")

    def load(self, unet_name, weight_dtype, vae=None):
        return (load_sana_transformer(comfy_paths.full_path("diffusion_models", unet_name), weight_dtype, vae=vae),)


class DCGenSanaTextEncoderLoader:
    DESCRIPTION = ("Load Gemma-2-2B as SANA's text encoder, a CLIP for CLIP Text Encode (SANA's instruction, 300 tokens "
                   "and attention mask).")
    OUTPUT_TOOLTIPS = ("SANA's text encoder as a CLIP, for CLIP Text Encode (positive and negative).",)
    SEARCH_ALIASES = ["dcgen", "sana", "gemma", "gemma2", "gemma-2", "text encoder", "clip loader"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (comfy_paths.weight_files("text_encoders"), {
                "tooltip": "Gemma-2-2B in models/text_encoders (ComfyUI's gemma_2_2b file, as for Lumina 2)."}),
        }}

    def load(self, clip_name):
        return (load_sana_text_encoder(comfy_paths.full_path("text_encoders", clip_name)),)


class DCGenApplyAlignedEmbedding:
    DESCRIPTION = ("Move a FLUX or SANA MODEL into DC-AE latent space with an aligned embedding (input embedder and output "
                   "head), on a copy. Add the DC-Gen LoRA after it.")
    OUTPUT_TOOLTIPS = ("A copy of the MODEL that samples DC-AE latents; add the DC-Gen LoRA next.",)
    SEARCH_ALIASES = ["dcgen", "aligned embedding", "embedder", "dc-ae", "flux", "sana", "1k", "4k"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "FLUX.1-Krea-dev (or dev) from Load Diffusion Model, or SANA from "
                                           "DC-Gen Load SANA."}),
            "embedding_name": (comfy_paths.embedding_files(), {
                "tooltip": "Aligned embedding (x_embedder + proj_out, or img_in + final_layer.linear) in "
                           "models/dcgen_embeddings or models/loras."}),
        }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}

    def apply(self, model, embedding_name, vae=None):
        path = comfy_paths.full_path(comfy_paths.EMBEDDINGS, embedding_name)
        return (apply_aligned_embedding(model, load_aligned_embedding(path), vae=vae),)


class DCGenLoraLoader:
    DESCRIPTION = ("Apply a DC-Gen (or any) LoRA to a FLUX or SANA MODEL: diffusers, PEFT, kohya or ComfyUI keys; a "
                   "file that carries the aligned embedding applies it too. Exact on 4-bit models.")
    OUTPUT_TOOLTIPS = ("A copy of the MODEL with the LoRA (and the embedding, if the file has one).",)
    SEARCH_ALIASES = ["dcgen", "lora", "peft", "kohya", "flux", "sana", "nvfp4", "svdquant"]
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX, SANA or DC-Gen model (also 4-bit); the LoRA is added to a copy."}),
            "lora_name": (comfy_paths.weight_files("loras"), {"tooltip": "LoRA in models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "LoRA strength (the embedder/head, if present, is always applied)."}),
        }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}

    def apply(self, model, lora_name, strength_model, vae=None):
        return (apply_lora(model, comfy_paths.full_path("loras", lora_name), strength_model, vae=vae),)


LOADER_NODES = {
    "DCGenDCAELoader": (DCAELoader, "DC-Gen Load DC-AE"),
    "DCGenModelLoader": (DCGenModelLoader, "DC-Gen Load Model"),
    "DCGenNVFP4ModelLoader": (DCGenNVFP4ModelLoader, "DC-Gen Load 4-bit"),
    "DCGenSanaModelLoader": (DCGenSanaModelLoader, "DC-Gen Load SANA"),
    "DCGenSanaTextEncoderLoader": (DCGenSanaTextEncoderLoader, "DC-Gen Load Gemma-2"),
    "DCGenApplyAlignedEmbedding": (DCGenApplyAlignedEmbedding, "DC-Gen Add Embedding"),
    "DCGenLoraLoader": (DCGenLoraLoader, "DC-Gen Load LoRA"),
}
