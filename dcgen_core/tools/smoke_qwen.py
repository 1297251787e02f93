"""The smoke run's DC-Gen-Qwen-Image-Edit parts: a tiny random release in the Hub's nested folder layout (shapes from
core's Qwen-Image class), a tiny stand-in for the Qwen2.5-VL 7B text encoder (Load CLIP, type qwen_image; the 7B
model cannot be made small inside ComfyUI), and the input image Load Image reads."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

#: the tiny transformer: patch 1 on the DC-AE's 32 channels, the stand-in encoder's text width
TINY_QWEN = dict(patch_size=1, in_channels=32, out_channels=32, num_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
NESTED = os.path.join("upload", "DC-Qwen-Image-Edit", "DC-Gen-Qwen-Image-Edit")
INPUT_SIZE = (128, 96)  # the input image's width x height (the smoke keeps it: resize "none")


def write_release(path: str, seed: int = 0):
    """``path``/upload/DC-Qwen-Image-Edit/DC-Gen-Qwen-Image-Edit/transformer: tiny random weights + config.json."""
    import comfy.ldm.qwen_image.model as qm
    import comfy.ops
    from safetensors.torch import save_file

    c = TINY_QWEN
    with torch.device("meta"):
        model = qm.QwenImageTransformer2DModel(
            patch_size=2, in_channels=c["in_channels"], out_channels=c["out_channels"] // 4,
            num_layers=c["num_layers"], attention_head_dim=c["attention_head_dim"],
            num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
            axes_dims_rope=tuple(c["axes_dims_rope"]), operations=comfy.ops.disable_weight_init)
        shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("__")}
    folder = os.path.join(path, NESTED, "transformer")
    os.makedirs(folder, exist_ok=True)
    save_file(_random_weights(shapes, seed), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "QwenImageTransformer2DModel", **c}, f)
    with open(os.path.join(path, NESTED, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "DCQwenImageEditPipeline"}, f)


def _random_weights(shapes: dict, seed: int) -> dict:
    """Matrices N(0, 1/fan_in), 1-D weights (norm scales) 1, biases 0: a tiny model whose activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) <= 1:
            out[name] = (torch.zeros if name.endswith("bias") else torch.ones)(shape)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


class _TinyQwenTokenizer:
    """Has what the edit nodes check for (core QwenImageTokenizer's edit template)."""

    llama_template_images = "{}"


class TinyQwenEditTextEncoder:
    """Duck-types a comfy.sd.CLIP of Qwen-Image: (text, image) -> deterministic embeddings of the tiny width."""

    tokenizer = _TinyQwenTokenizer()

    def __init__(self, width: int = TINY_QWEN["joint_attention_dim"], tokens: int = 6):
        self.width, self.tokens = width, tokens

    def tokenize(self, text, images=(), **kwargs):
        return {"text": text, "images": list(images)}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        seed = int.from_bytes(hashlib.sha256(tokens["text"].encode()).digest()[:4], "little")
        cond = torch.randn(1, self.tokens, self.width, generator=torch.Generator().manual_seed(seed))
        for image in tokens["images"]:  # the image changes the embeddings, as it does for Qwen2.5-VL
            cond = cond + image.mean()
        return [[cond, dict(add_dict or {})]]


def tiny_qwen_clip_loader():
    """Core Load CLIP's inputs (shipped workflows run unchanged); type qwen_image gives the tiny stand-in."""
    import nodes

    class TinyQwenCLIPLoader(nodes.CLIPLoader):
        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True  # the 7B file is not needed

        def load_clip(self, clip_name, type="stable_diffusion", device="default"):
            if type != "qwen_image":
                raise ValueError(f"smoke: Load CLIP type '{type}' has no tiny stand-in (only qwen_image).")
            return (TinyQwenEditTextEncoder(),)

    return TinyQwenCLIPLoader


def write_input_image(path: str, seed: int = 0):
    """A smooth RGB PNG of INPUT_SIZE for Load Image."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    w, h = INPUT_SIZE
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 4, generator=g), size=(h, w), mode="bilinear",
                                          align_corners=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
