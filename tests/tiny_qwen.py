"""Tiny random DC-Gen-Qwen-Image-Edit parts in the release's file layouts, and the authors' pipeline run on them.

The oracle is the authors' DCQwenImageEditPipeline (tests/authors/pipeline_qwen_image_edit.py, unmodified) on a tiny
diffusers QwenImageTransformer2DModel (patch 1, 32 channels) and a tiny DC-AE f32c32, with fixed prompt embeddings.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

import tiny

QWEN_CONFIG = dict(patch_size=1, in_channels=32, out_channels=32, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
TEXT_DIM = QWEN_CONFIG["joint_attention_dim"]
#: The release's scheduler/scheduler_config.json is only on the Hub: Qwen-Image-Edit's values (the pack's inferred
#: SCHEDULER), written here independently of the pack.
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}
NESTED = os.path.join("upload", "DC-Qwen-Image-Edit", "DC-Gen-Qwen-Image-Edit")


def tiny_qwen_transformer(seed: int = 5, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return tiny._randomize(QwenImageTransformer2DModel(**{**QWEN_CONFIG, **overrides}).eval(), seed, scale=0.08)


def save_release(transformer, vae, root: str, nested: bool = True) -> str:
    """The Hub repo's layout: model_index.json, scheduler/, transformer/, vae/ (under upload/... when ``nested``)."""
    folder = os.path.join(root, NESTED) if nested else root
    transformer.save_pretrained(os.path.join(folder, "transformer"), safe_serialization=True,
                                max_shard_size="200KB")
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG}, f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DCQwenImageEditPipeline",
                   "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderDC"]}, f)
    return folder


def save_single_file(transformer, path: str, prefix: str = "", with_config: bool = False):
    """One safetensors file; ``with_config``: the transformer config in the header metadata (as diffusers'
    single-file exports carry it)."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(dict(transformer.config))} if with_config else None
    save_file({prefix + k: v.contiguous() for k, v in transformer.state_dict().items()}, path, metadata=meta)
    return path


def prompt_embeddings(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, TEXT_DIM, generator=g), torch.ones(1, tokens, dtype=torch.long)


def test_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit RGB image (what Load Image gives, /255)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 5, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def authors_pipeline(transformer, vae):
    here = os.path.join(os.path.dirname(__file__), "authors")
    if here not in sys.path:
        sys.path.insert(0, here)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from pipeline_qwen_image_edit import DCQwenImageEditPipeline

    pipe = DCQwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                                   text_encoder=None, tokenizer=None, processor=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def authors_edit(transformer, vae, image: np.ndarray, cond, neg, seed: int, steps: int, cfg: float,
                 width: int | None = None, height: int | None = None):
    """The authors' pipeline; returns (image [1, H, W, 3] in [0, 1], final latents [1, 32, H/32, W/32] in model
    space (scaled), H, W). Noise: ComfyUI's (torch.randn of the
    natural latent with the seed), packed 1x1 as the pipeline packs it."""
    from PIL import Image

    pipe = authors_pipeline(transformer, vae)
    pil = Image.fromarray(image)
    if width is None:
        from pipeline_qwen_image_edit import calculate_dimensions

        cw, ch, _ = calculate_dimensions(1024 * 1024, pil.size[0] / pil.size[1])
        width, height = cw // 64 * 64, ch // 64 * 64
    h, w = height // 32, width // 32
    noise = torch.randn((1, 32, h, w), generator=torch.manual_seed(seed))
    latents = noise.permute(0, 2, 3, 1).reshape(1, h * w, 32)
    final = {}

    def keep(pipeline, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        out = pipe(image=pil, prompt_embeds=cond[0], prompt_embeds_mask=cond[1], negative_prompt_embeds=neg[0],
                   negative_prompt_embeds_mask=neg[1], true_cfg_scale=cfg, num_inference_steps=steps,
                   height=height, width=width, latents=latents, output_type="pt", callback_on_step_end=keep,
                   callback_on_step_end_tensor_inputs=["latents"]).images
    packed = final["latents"]
    return out.permute(0, 2, 3, 1), packed.reshape(1, h, w, 32).permute(0, 3, 1, 2), height, width


_INSTALLED = {}
REF_SIZE = (200, 150)


def install_models(comfyui):
    """Once per session: the tiny release (nested Hub layout) and DC-AE in the model folders, the test image and the
    fixed embeddings in the test nodes. Returns (transformer, vae, image, pos, neg)."""
    if "models" not in _INSTALLED:
        transformer = tiny_qwen_transformer()
        vae = tiny.tiny_dcae()
        save_release(transformer, vae, os.path.join(comfyui.dirs["diffusion_models"], "DC-Qwen-Image-Edit-tiny"))
        tiny.save_dcae_folder(vae, os.path.join(comfyui.dirs["vae"], "dc-ae-f32c32-qwen-edit-tiny"))
        image = test_image(*REF_SIZE)
        comfyui.test_nodes.IMAGES["qwen-edit"] = torch.from_numpy(image).float()[None] / 255.0
        pos, neg = prompt_embeddings(11, 9), prompt_embeddings(12, 5)
        comfyui.test_nodes.EMBEDDINGS["qwen-pos"] = pos
        comfyui.test_nodes.EMBEDDINGS["qwen-neg"] = neg
        d = comfyui.dirs
        save_base_and_adapters(transformer, os.path.join(d["diffusion_models"], "qwen-image-edit-base-tiny"),
                               os.path.join(d["dcgen_embeddings"], "dcgen-qwen-edit-tiny-embedding.safetensors"),
                               os.path.join(d["loras"], "dcgen-qwen-edit-tiny-lora.safetensors"))
        _INSTALLED["models"] = (transformer, vae, image, pos, neg)
    return _INSTALLED["models"]


def embedding_route() -> dict:
    """Base Qwen-Image-Edit (the pack's loader) + DC-Gen aligned embedding + DC-Gen LoRA, as the ``model`` node."""
    return {
        "base": {"class_type": "DCGenQwenEditModelLoader", "inputs": {"unet_name": "qwen-image-edit-base-tiny",
                                                                      "weight_dtype": "default"}},
        "embed": {"class_type": "DCGenApplyAlignedEmbedding", "inputs": {
            "model": ["base", 0], "embedding_name": "dcgen-qwen-edit-tiny-embedding.safetensors", "vae": ["vae", 0]}},
        "model": {"class_type": "DCGenLoraLoader", "inputs": {
            "model": ["embed", 0], "lora_name": "dcgen-qwen-edit-tiny-lora.safetensors", "strength_model": 1.0}},
    }


def edit_prompt(key: str, sampler: str, width: int, height: int, seed: int = 42, steps: int = 4,
                cfg: float = 3.5, route: str = "full-checkpoint") -> dict:
    """API prompt: tiny release + DC-AE, the test image and fixed embeddings, DC-Gen Qwen-Image-Edit Reference on
    both, KSampler or SamplerCustomAdvanced (CFGGuider, simple), VAE Decode, captured under ``key``."""
    ref = {"vae": ["vae", 0], "image": ["image", 0], "resize": "authors (~1 MP, multiples of 32)",
           "width": width, "height": height}
    p = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": "dc-ae-f32c32-qwen-edit-tiny",
                                                            "variant": "auto"}},
        "model": {"class_type": "DCGenQwenEditModelLoader", "inputs": {
            "unet_name": "DC-Qwen-Image-Edit-tiny", "weight_dtype": "default", "vae": ["vae", 0]}},
        "image": {"class_type": "TestImage", "inputs": {"key": "qwen-edit"}},
        "pos_text": {"class_type": "TestMaskedEmbeds", "inputs": {"key": "qwen-pos"}},
        "neg_text": {"class_type": "TestMaskedEmbeds", "inputs": {"key": "qwen-neg"}},
        "pos": {"class_type": "DCGenQwenEditReference", "inputs": {"conditioning": ["pos_text", 0], **ref}},
        "neg": {"class_type": "DCGenQwenEditReference", "inputs": {"conditioning": ["neg_text", 0], **ref}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "image": ["decode", 0],
                                                            "latent": ["sampler", 0]}},
    }
    if route == "embedding+lora":
        del p["model"]
        p.update(embedding_route())
    if sampler == "DCGenSampler":  # the DC-Gen Sampler: width/height 0 follow the latent; guidance = the cfg scale
        p["sampler"] = {"class_type": "DCGenSampler", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["pos", 1],
            "width": 0, "height": 0, "batch_size": 1, "steps": steps, "guidance": cfg, "seed": seed,
            "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    elif sampler == "KSampler":
        p["sampler"] = {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["pos", 1],
            "denoise": 1.0}}
    else:
        p.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                             "negative": ["neg", 0], "cfg": cfg}},
            "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple",
                                                                  "steps": steps, "denoise": 1.0}},
            "sampler": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["pos", 1]}},
        })
    return p


def save_base_and_adapters(transformer, base_folder: str, embedding_path: str, lora_path: str, seed: int = 9):
    """A base Qwen-Image (patch 2, 64 in / 64 out, its own embedder and head) whose blocks plus the saved LoRA are
    ``transformer``'s blocks, the aligned embedding (``transformer``'s img_in / proj_out) and the LoRA (diffusers
    keys, alpha 8, rank 4 on attention, MLP and modulation layers)."""
    from safetensors.torch import save_file

    from dcgen_core.shared.lora import save_lora

    base = tiny_qwen_transformer(seed=seed, patch_size=2, in_channels=64, out_channels=16)
    g = torch.Generator().manual_seed(seed)
    target = transformer.state_dict()
    lora, rank, alpha = {}, 4, 8.0
    with torch.no_grad():
        for name, p in base.named_parameters():
            if not name.startswith(("img_in.", "proj_out.")):
                p.copy_(target[name])
        for i in range(QWEN_CONFIG["num_layers"]):
            for m in ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "img_mlp.net.0.proj", "txt_mlp.net.2",
                      "img_mod.1"):
                module = f"transformer_blocks.{i}.{m}"
                w = base.get_submodule(module).weight
                down = 0.1 * torch.randn(rank, w.shape[1], generator=g)
                up = 0.1 * torch.randn(w.shape[0], rank, generator=g)
                w -= (alpha / rank) * up @ down
                lora[module] = (down, up)
    base.save_pretrained(base_folder, safe_serialization=True)
    save_file({k: target[k].contiguous() for k in ("img_in.weight", "img_in.bias", "proj_out.weight",
                                                   "proj_out.bias")}, embedding_path)
    save_lora(lora_path, lora, alpha=alpha)
