"""The smoke run's DC-Gen-Wan2.1 video parts: tiny random DC-Gen-Wan transformers (diffusers folders in the release's
layout, scheduler/ beside them; shapes from core's WanModel), a tiny random DC-AE-V (the authors' ``.pt`` form or
safetensors, by the name), and tiny stand-ins for UMT5-XXL (Load CLIP, type wan) and CLIP ViT-H/14 (Load CLIP
Vision): neither can be made small inside ComfyUI, whose configs for them are fixed at full size."""

from __future__ import annotations

import hashlib
import json
import os

import torch

#: the tiny transformer: DC-Gen-Wan's channel layout (32 in/out, i2v 68 in) at 1x1x1 patches, tiny widths; the
#: stand-in text encoder's width; CLIP ViT-H/14's real hidden width and token count (what i2v's img_emb reads)
TINY_WAN = dict(dim=32, num_heads=2, ffn_dim=48, freq_dim=32, text_dim=24, num_layers=1, patch_size=(1, 1, 1))
CLIP_H = (257, 1280)
#: the tiny DC-AE-V: the f32t4 stage layout (7 stages, stage 0 empty), narrow, one ResBlock per stage
TINY_DCAE_V = dict(widths=(4, 8, 8, 8, 8, 8, 8), depths=(0, 1, 1, 1, 1, 1, 1))
#: (class, input) -> smoke value: 64x64 (2x2 latent), 8 frames (2 latent frames), 2 steps
SMALL_VIDEO = {("DCGenEmptyDCAEVLatentVideo", "width"): 64, ("DCGenEmptyDCAEVLatentVideo", "height"): 64,
               ("DCGenEmptyDCAEVLatentVideo", "length"): 8, ("DCGenWanImageToVideo", "width"): 64,
               ("DCGenWanImageToVideo", "height"): 64, ("DCGenWanImageToVideo", "length"): 8,
               ("DCGenUniPCFlowSigmas", "steps"): 2}


def write_wan_folder(path: str, i2v: bool, seed: int = 0, flow_shift: float = 5.0):
    """``path``/ (config.json + diffusers-keyed safetensors) and ``path``/../scheduler/scheduler_config.json."""
    import comfy.ldm.wan.model as wm
    import comfy.ops
    from safetensors.torch import save_file

    from ..wan.keys import comfy_to_diffusers_key

    c = TINY_WAN
    with torch.device("meta"):
        model = wm.WanModel(model_type="i2v" if i2v else "t2v", patch_size=c["patch_size"], in_dim=68 if i2v else 32,
                            out_dim=32, dim=c["dim"], ffn_dim=c["ffn_dim"], freq_dim=c["freq_dim"],
                            text_dim=c["text_dim"], num_heads=c["num_heads"], num_layers=c["num_layers"],
                            operations=comfy.ops.disable_weight_init)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    from .smoke_qwen import _random_weights

    sd = {comfy_to_diffusers_key(k): v for k, v in _random_weights(shapes, seed).items()}
    sd = {k: (v * 0.1 if "modulation" in k or "scale_shift_table" in k else v).contiguous() for k, v in sd.items()}
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "WanTransformer3DModel", "patch_size": list(c["patch_size"]),
                   "num_attention_heads": c["num_heads"], "attention_head_dim": c["dim"] // c["num_heads"],
                   "in_channels": 68 if i2v else 32, "out_channels": 32, "text_dim": c["text_dim"],
                   "freq_dim": c["freq_dim"], "ffn_dim": c["ffn_dim"], "num_layers": c["num_layers"],
                   "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
                   "image_dim": CLIP_H[1] if i2v else None}, f)
    sched = os.path.join(os.path.dirname(os.path.normpath(path)), "scheduler")
    os.makedirs(sched, exist_ok=True)
    with open(os.path.join(sched, "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "UniPCMultistepScheduler", "flow_shift": flow_shift, "use_flow_sigmas": True,
                   "prediction_type": "flow_prediction", "num_train_timesteps": 1000}, f)


def write_dcae_v(path: str, seed: int = 0):
    """A tiny random DC-AE-V (the pack's module) as the authors' ``.pt`` ({'model_state_dict': ...}, bf16) or, for
    any other extension, safetensors."""
    from ..shared.dcae_v import DCAEV, DCAEVConfig

    torch.manual_seed(seed)
    model = DCAEV(DCAEVConfig("dc-ae-v-f32t4c32-tiny", 32, TINY_DCAE_V["widths"], TINY_DCAE_V["depths"],
                              scaling_factor=0.7241))
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".pt"):
        torch.save({"model_state_dict": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, path)


class TinyWanTextEncoder:
    """Duck-types a comfy.sd.CLIP of Wan (UMT5): text -> deterministic embeddings of the tiny text width."""

    def __init__(self, width: int = TINY_WAN["text_dim"], tokens: int = 7):
        self.width, self.tokens = width, tokens

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        seed = int.from_bytes(hashlib.sha256(tokens["text"].encode()).digest()[:4], "little")
        cond = torch.randn(1, self.tokens, self.width, generator=torch.Generator().manual_seed(seed))
        return [[cond, dict(add_dict or {})]]


class TinyClipVision:
    """Duck-types comfy.clip_vision.ClipVisionModel for CLIP Vision Encode: image -> an Output whose
    ``penultimate_hidden_states`` have ViT-H/14's shape (257 tokens x 1280) and follow the image."""

    def encode_image(self, image, crop=True):
        import comfy.clip_vision

        tokens, width = CLIP_H
        g = torch.Generator().manual_seed(0)
        basis = torch.randn(3, tokens, width, generator=g)
        colour = image[..., :3].float().mean(dim=(1, 2))  # (B, 3)
        hidden = torch.einsum("bc,ctw->btw", colour, basis)
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = hidden
        out["penultimate_hidden_states"] = hidden
        out["image_embeds"] = hidden[:, 0]
        out["mm_projected"] = None
        out["image_sizes"] = None
        return out


def tiny_wan_clip_loader():
    """Core Load CLIP's inputs (shipped workflows run unchanged); type wan gives the tiny UMT5 stand-in."""
    import nodes

    class TinyWanCLIPLoader(nodes.CLIPLoader):
        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True  # the UMT5-XXL file is not needed

        def load_clip(self, clip_name, type="stable_diffusion", device="default"):
            if type != "wan":
                raise ValueError(f"smoke: Load CLIP type '{type}' has no tiny stand-in here (only wan).")
            return (TinyWanTextEncoder(),)

    return TinyWanCLIPLoader


def tiny_clip_vision_loader():
    """Core Load CLIP Vision's inputs; the tiny ViT-H/14 stand-in out (no clip_vision file is read)."""
    import nodes

    class TinyCLIPVisionLoader(nodes.CLIPVisionLoader):
        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True

        def load_clip(self, clip_name):
            return (TinyClipVision(),)

    return TinyCLIPVisionLoader


def write_video_models(prompt: dict, root: str, place) -> None:
    """The video files an API prompt names, tiny and random, under ``root/<kind>/<name>`` (``place(path, write)``
    writes a file that is not there yet)."""
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "DCGenWanModelLoader" and isinstance(inputs.get("unet_name"), str):
            name = inputs["unet_name"]
            place(os.path.join(root, "diffusion_models", name),
                  lambda p, i2v="i2v" in name.lower(): write_wan_folder(p, i2v))
        elif cls == "DCGenDCAEVLoader" and isinstance(inputs.get("vae_name"), str):
            place(os.path.join(root, "vae", inputs["vae_name"]), write_dcae_v)
        elif cls == "CLIPVisionLoader" and isinstance(inputs.get("clip_name"), str):
            place(os.path.join(root, "clip_vision", inputs["clip_name"]),
                  lambda p: _placeholder(p))
        elif cls == "CLIPLoader" and inputs.get("type") == "wan" and isinstance(inputs.get("clip_name"), str):
            place(os.path.join(root, "text_encoders", inputs["clip_name"]), _placeholder)


def _placeholder(path: str):
    """A file under the widget's name (the stand-in loaders read nothing; the doctor's file check finds it)."""
    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, path)


def stand_ins(prompt: dict) -> dict:
    """Rename, in place, the prompt's Wan text-encoder and CLIP-vision loaders to the stand-in node types, and return
    those types' classes to register."""
    used = {}
    for node in prompt.values():
        if node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "wan":
            node["class_type"] = "DCGenSmokeWanTextEncoder"
            used["DCGenSmokeWanTextEncoder"] = tiny_wan_clip_loader()
        elif node["class_type"] == "CLIPVisionLoader":
            node["class_type"] = "DCGenSmokeClipVision"
            used["DCGenSmokeClipVision"] = tiny_clip_vision_loader()
        for (cls, key), value in SMALL_VIDEO.items():
            if node["class_type"] == cls and key in node["inputs"]:
                node["inputs"][key] = value
    return used
