"""Test-only ComfyUI nodes: fixed prompt embeddings, output capture, and a tiny text encoder.

FLUX's real text encoders (CLIP-L, T5-XXL) cannot be made tiny inside ComfyUI,
so workflow tests replace the CLIP loader's output with a tiny deterministic
encoder and parity tests feed the reference's prompt embeddings directly.
"""

from dcgen_core.tools import smoke

import nodes as comfy_nodes

from tiny import POOLED_DIM, TEXT_DIM, TEXT_TOKENS

EMBEDDINGS = {}
CAPTURED = {}
IMAGES = {}
TEXT_DIMS = (TEXT_DIM, POOLED_DIM)  # (context, pooled) widths the tiny encoder produces


class TestPromptEmbeds:
    CATEGORY = "_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "default"})}}

    def run(self, key):
        cond, pooled = EMBEDDINGS[key]
        return ([[cond.clone(), {"pooled_output": pooled.clone()}]],)


class TestCapture:
    CATEGORY = "_test"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "out"})},
                "optional": {"image": ("IMAGE",), "latent": ("LATENT",), "model": ("MODEL",)}}

    def run(self, key, image=None, latent=None, model=None):
        CAPTURED[key] = {"image": image, "latent": latent, "model": model}
        return {}


class TinyTextEncoder(smoke.TinyTextEncoder):
    """The smoke test's tiny encoder, at the widths the test sets in TEXT_DIMS."""

    def __init__(self):
        super().__init__(TEXT_DIMS, TEXT_TOKENS)


class TinyDualCLIPLoader(comfy_nodes.DualCLIPLoader):
    """Same inputs as the core DualCLIPLoader (so shipped workflows run unchanged), tiny encoder out."""

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return str(TEXT_DIMS)  # the encoder's widths are set by the test, outside the graph

    def load_clip(self, *args, **kwargs):
        return (TinyTextEncoder(),)


NODE_CLASS_MAPPINGS = {"TestPromptEmbeds": TestPromptEmbeds, "TestCapture": TestCapture}


class TestLatentFromMask:
    """A non-empty LATENT with any channel count (ComfyUI resizes all-zero latents by itself)."""

    CATEGORY = "_test"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "channels": ("INT", {"default": 16, "min": 1, "max": 512})}}

    def run(self, mask, channels):
        return ({"samples": mask.reshape(1, 1, *mask.shape[-2:]).repeat(1, channels, 1, 1) * 0.5},)


class TestImage:
    CATEGORY = "_test"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "image"})}}

    def run(self, key):
        return (IMAGES[key].clone(),)


NODE_CLASS_MAPPINGS["TestLatentFromMask"] = TestLatentFromMask
NODE_CLASS_MAPPINGS["TestImage"] = TestImage


class TestMaskedEmbeds:
    """Fixed text embeddings with an attention mask (SANA's conditioning): EMBEDDINGS[key] = (cond, mask)."""

    CATEGORY = "_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "default"})}}

    def run(self, key):
        cond, mask = EMBEDDINGS[key]
        return ([[cond.clone(), {"attention_mask": mask.clone()}]],)


NODE_CLASS_MAPPINGS["TestMaskedEmbeds"] = TestMaskedEmbeds


def tiny_sana_text_encoder_loader():
    """DC-Gen Load Gemma-2's inputs (shipped workflows run unchanged), a tiny encoder of the tiny SANA's width."""
    from tiny import SANA_CAPTION

    return smoke.tiny_sana_text_encoder_loader(SANA_CAPTION)
