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
    DESCRIPTION = "Load a DC-AE (deep compression autoencoder) as a VAE for core VAE Decode/Encode (also tiled)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (comfy_paths.weight_files("vae"), {
                "tooltip": "DC-AE weights in models/vae: a single safetensors (diffusers or original keys) or the "
                           "diffusion_pytorch_model.safetensors of a diffusers folder (its config.json is read)."}),
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
    DESCRIPTION = ("Load a DC-Gen transformer (e.g. DC-Gen-FLUX.1-Krea-Dev Res1K/Res4K) as a MODEL that samples "
                   "DC-AE latents. Memory-mapped; a diffusers folder is picked by its first shard.")
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
    DESCRIPTION = ("Load a 4-bit FLUX / DC-Gen-FLUX transformer as a MODEL: a ComfyUI NVFP4 file (made by "
                   "python -m dcgen_core.quantize or any tool writing ComfyUI's format, per-layer comfy_quant entries "
                   "or the _quantization_metadata header, pre_quant_scale applied) or a nunchaku SVDQuant file "
                   "(int4/fp4; also nunchaku's pre-v1 folder). Weights stay 4-bit in "
                   "memory; native NVFP4 matmul on RTX 50xx/B200 (SM >= 10), dequantized per layer elsewhere. "
                   "A base FLUX file becomes DC-Gen with Apply DC-Gen Aligned Embedding + Load DC-Gen LoRA.")
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
    DESCRIPTION = ("Load a SANA transformer (SANA 600M / 1.6B, SANA-1.5, DC-Gen-SANA) as a MODEL for core samplers: "
                   "diffusers folders or single files, or original NVlabs/Sana safetensors. Samples DC-AE latents "
                   "(f32c32 for SANA) with SANA's flow shift 3.0; encode prompts with Load SANA Text Encoder.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return _transformer_inputs("SANA transformer in models/diffusion_models: a diffusers transformer folder or "
                                   "file, or an original SANA checkpoint as safetensors (512 px to 4K: its "
                                   "resolution and position embedding are read from its pos_embed; a config.json "
                                   "beside it for widths other than SANA's own).")

    def load(self, unet_name, weight_dtype, vae=None):
        return (load_sana_transformer(comfy_paths.full_path("diffusion_models", unet_name), weight_dtype, vae=vae),)


class DCGenSanaTextEncoderLoader:
    DESCRIPTION = ("Load Gemma-2-2B as SANA's text encoder: the final normed hidden state, the official complex "
                   "human instruction and 300-token selection, and the attention mask, for CLIP Text Encode.")
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
    DESCRIPTION = ("Move a FLUX MODEL into DC-AE latent space: swap in the aligned input embedder and output head "
                   "(on a copy; the incoming model is unchanged). Add the DC-Gen LoRA after this.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "FLUX.1-Krea-dev (or dev) from Load Diffusion Model."}),
            "embedding_name": (comfy_paths.embedding_files(), {
                "tooltip": "Aligned embedding (x_embedder + proj_out, or img_in + final_layer.linear) in "
                           "models/dcgen_embeddings or models/loras."}),
        }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}

    def apply(self, model, embedding_name, vae=None):
        path = comfy_paths.full_path(comfy_paths.EMBEDDINGS, embedding_name)
        return (apply_aligned_embedding(model, load_aligned_embedding(path), vae=vae),)


class DCGenLoraLoader:
    DESCRIPTION = ("Apply a DC-Gen (or any FLUX) LoRA: diffusers/PEFT and kohya layouts, fused qkv offsets. "
                   "A file that also carries the aligned embedder/head applies them too. Stackable.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX or DC-Gen model; the LoRA is added to a copy."}),
            "lora_name": (comfy_paths.weight_files("loras"), {"tooltip": "LoRA in models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "LoRA strength (the embedder/head, if present, is always applied)."}),
        }, "optional": {"vae": ("VAE", {"tooltip": _VAE_TIP})}}

    def apply(self, model, lora_name, strength_model, vae=None):
        return (apply_lora(model, comfy_paths.full_path("loras", lora_name), strength_model, vae=vae),)


LOADER_NODES = {
    "DCGenDCAELoader": (DCAELoader, "Load DC-AE VAE (DC-Gen)"),
    "DCGenModelLoader": (DCGenModelLoader, "Load DC-Gen Diffusion Model"),
    "DCGenNVFP4ModelLoader": (DCGenNVFP4ModelLoader, "Load DC-Gen Diffusion Model (NVFP4)"),
    "DCGenSanaModelLoader": (DCGenSanaModelLoader, "Load SANA Diffusion Model (DC-Gen)"),
    "DCGenSanaTextEncoderLoader": (DCGenSanaTextEncoderLoader, "Load SANA Text Encoder (Gemma-2)"),
    "DCGenApplyAlignedEmbedding": (DCGenApplyAlignedEmbedding, "Apply DC-Gen Aligned Embedding"),
    "DCGenLoraLoader": (DCGenLoraLoader, "Load DC-Gen LoRA"),
}
