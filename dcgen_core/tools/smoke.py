"""``python -m dcgen_core.doctor --smoke``: every shipped workflow, run on tiny random models, on this install.

Tells a broken install from missing weights: the models each workflow names are built tiny and random
(shapes from ComfyUI's own classes and the pack's DC-AE; no diffusers, nothing downloaded) in a
temporary model folder, and each workflow runs headless through ComfyUI's executor at a small size
with 2 steps. FLUX's text encoders (CLIP-L + T5-XXL, ~10 GB) cannot be made small inside ComfyUI, so
the DualCLIPLoader's output is a tiny deterministic encoder of FLUX's widths; core Load Diffusion
Model, ControlNet and VAE loaders detect FLUX by its real widths, so those files are full width but
one block deep (bf16, about 1.1 GB written once to the temporary folder). The user's model folders
are not touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time

import torch

FLUX_TEXT = (4096, 768)  # T5-XXL context and CLIP-L pooled widths
TINY_FLUX = dict(hidden_size=64, num_heads=2, axes_dim=[8, 12, 12], depth=1, depth_single_blocks=1)
FULL_FLUX = dict(hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1)
#: a tiny SANA reading Gemma-2-2B's real width (the smoke's text encoder gives that width)
TINY_SANA = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_cross_attention_heads=2,
                 cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=2304, mlp_ratio=2.5)
#: (class, input) -> smoke value: small sizes and 2 steps
SMALL = {("DCGenSampler", "steps"): 2, ("KSampler", "steps"): 2, ("DCGenFlowSigmas", "steps"): 2, ("DCGenEmptyLatent", "width"): 128,
         ("DCGenEmptyLatent", "height"): 128, ("EmptySD3LatentImage", "width"): 128,
         ("EmptySD3LatentImage", "height"): 128, ("ImageScale", "width"): 256, ("ImageScale", "height"): 128,
         ("DCGenQwenEditEncode", "resize"): "none (multiples of 32 already)"}


def fast_random_weights(shapes: dict, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Random weights in about a second per 200M parameters: every matrix/conv is a window of one seeded N(0, 1)
    pool (a prime length, so that rows differ) scaled by 1/sqrt(fan_in); 1-D weights (norm scales) 1, biases 0."""
    pool = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) <= 1:
            out[name] = (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
            continue
        n, offset = math.prod(shape), (i * 7919) % pool.numel()
        window = (pool / math.sqrt(math.prod(shape[1:]))).to(dtype)
        out[name] = window.repeat(-(-(n + offset) // pool.numel()))[offset:offset + n].view(shape)
    return out


def _bfl_norm_names(sd: dict) -> dict:
    """BFL's own file naming (RMSNorm ``.scale``), whatever this ComfyUI calls them in memory."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in sd.items()}


def flux_state_dict(dims: dict, channels: int, context: int, pooled: int, seed: int = 0, controlnet=False) -> dict:
    """A FLUX.1 transformer (or XLabs-style FLUX ControlNet) of ``dims`` in BFL keys, shapes from ComfyUI's class."""
    import comfy.ldm.flux.controlnet
    import comfy.ldm.flux.model
    import comfy.ops

    from ..flux.comfy_model import flux_params_kwargs

    kw = flux_params_kwargs(dict(dims, in_channels=channels // 4, out_channels=channels // 4, vec_in_dim=pooled,
                                 context_in_dim=context, mlp_ratio=4.0, theta=10000, patch_size=2, qkv_bias=True,
                                 guidance_embed=True))
    with torch.device("meta"):
        if controlnet:
            model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, **kw)
        else:
            model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **kw)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    return _bfl_norm_names(fast_random_weights(shapes, seed))


def dcae_files(folder: str, variant: str, seed: int = 0):
    """A tiny random DC-AE of ``variant``'s architecture (narrow, one layer per stage) as a diffusers folder."""
    import dataclasses

    from ..shared.dcae import DCAE, VARIANTS

    base = VARIANTS[variant]
    n = len(base.encoder_block_out_channels)
    widths = tuple(min(8 * 2 ** (i // 2), 64) for i in range(n))
    cfg = dataclasses.replace(base, encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                              encoder_layers_per_block=(1,) * n, decoder_layers_per_block=(1,) * n,
                              attention_head_dim=8)
    torch.manual_seed(seed)
    model = DCAE(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # near-linear, so the decoded image is not saturated
    os.makedirs(folder, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_diffusers_dict(), f)


class TinyTextEncoder:
    """Duck-types comfy.sd.CLIP for CLIPTextEncode: text -> deterministic FLUX-shaped embeddings."""

    def __init__(self, dims=FLUX_TEXT, tokens: int = 7):
        self.dims, self.tokens = dims, tokens

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode(self, text):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        context, pooled = self.dims
        return torch.randn(1, self.tokens, context, generator=g), torch.randn(1, pooled, generator=g)

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        cond, pooled = self.encode(tokens["text"])
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self.encode(tokens["text"])
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond


def tiny_sana_text_encoder_loader(width: int = TINY_SANA["caption_channels"]):
    """DC-Gen Load Gemma-2's inputs, a tiny encoder of ``width`` (Gemma-2-2B's) out (no Gemma file is read)."""
    import nodes

    class TinySanaTextEncoderLoader(nodes.NODE_CLASS_MAPPINGS["DCGenSanaTextEncoderLoader"]):
        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True

        def load(self, clip_name):
            return (TinyTextEncoder((width, 8)),)

    return TinySanaTextEncoderLoader


def tiny_dual_clip_loader():
    """A node class with the core DualCLIPLoader's inputs (shipped workflows run unchanged) that loads nothing."""
    import nodes

    class TinyDualCLIPLoader(nodes.DualCLIPLoader):
        dims = FLUX_TEXT

        @classmethod
        def VALIDATE_INPUTS(cls, **kwargs):
            return True  # the text-encoder files are not needed

        def load_clip(self, *args, **kwargs):
            return (TinyTextEncoder(self.dims),)

    return TinyDualCLIPLoader


def _place(path: str, write):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        write(path)


def _write_dcgen_folder(path: str, channels: int):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(flux_state_dict(TINY_FLUX, channels, *FLUX_TEXT), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"axes_dims_rope": TINY_FLUX["axes_dim"]}, f)


def _write_dcgen_nvfp4(path: str, channels: int):
    from ..flux.quantize import quantize_flux

    with tempfile.TemporaryDirectory() as tmp:
        _write_dcgen_folder(tmp, channels)
        quantize_flux(tmp, path, progress=False)


def _write_sana_folder(path: str, channels: int = 32):
    from safetensors.torch import save_file

    from ..sana.model import SanaConfig, SanaTransformer

    cfg = SanaConfig(in_channels=channels, out_channels=channels, **TINY_SANA)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SanaTransformer(cfg).state_dict().items()}
    os.makedirs(path, exist_ok=True)
    save_file(fast_random_weights(shapes), os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_diffusers_config(), f)


def _write_sana_dcgen_file(path: str, lora: bool, channels: int):
    from safetensors.torch import save_file

    from ..shared.lora import save_lora

    g = torch.Generator().manual_seed(3)
    h = TINY_SANA["num_attention_heads"] * TINY_SANA["attention_head_dim"]
    if lora:
        save_lora(path, {"transformer_blocks.0.attn1.to_q": (0.01 * torch.randn(4, h, generator=g),
                                                             0.01 * torch.randn(h, 4, generator=g))}, alpha=4.0)
    else:
        save_file({"patch_embed.proj.weight": 0.05 * torch.randn(h, channels, 1, 1, generator=g),
                   "patch_embed.proj.bias": torch.zeros(h), "proj_out.bias": torch.zeros(channels),
                   "proj_out.weight": 0.05 * torch.randn(channels, h, generator=g)}, path)


def _dcae_variant_for(name: str) -> str:
    n = name.upper()
    return "dc-ae-1.5-f64c128" if "4K" in n or "F64" in n else "dc-ae-f32c32-sana-1.1"


def _model_source(prompt: dict, node: dict) -> str | None:
    """The loader class at the start of ``node``'s MODEL input chain."""
    seen = set()
    while "model" in node["inputs"] and isinstance(node["inputs"]["model"], list):
        ref = node["inputs"]["model"][0]
        if ref in seen:
            return None
        seen.add(ref)
        node = prompt[ref]
    return node["class_type"]


def write_models(root: str, workflow: dict):
    """The files ``workflow`` names, tiny and random, under ``root/<kind>/<name>``."""
    from safetensors.torch import save_file

    from .workflows import FILE_WIDGETS
    from .workflows import workflow_to_prompt
    from ..shared.lora import save_lora

    import nodes

    prompt = workflow_to_prompt(workflow, nodes.NODE_CLASS_MAPPINGS)
    from .smoke_video import write_video_models

    write_video_models(prompt, root, _place)
    dcgen_channels = {}
    for node in prompt.values():  # which DC-AE each DC-Gen loader pairs with: 32 (1K) or 128 (4K)
        if node["class_type"] in ("DCGenModelLoader", "DCGenNVFP4ModelLoader"):
            dcgen_channels[node["inputs"]["unet_name"]] = 128 if "4K" in node["inputs"]["unet_name"].upper() else 32
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            import folder_paths

            from .smoke_qwen import write_input_image

            _place(os.path.join(folder_paths.get_input_directory(), node["inputs"]["image"]), write_input_image)
        for (cls, widget), kind in FILE_WIDGETS.items():
            name = node["inputs"].get(widget) if node["class_type"] == cls else None
            if not isinstance(name, str):
                continue
            path = os.path.join(root, kind, name)
            if cls == "DCGenModelLoader":
                _place(path, functools.partial(_write_dcgen_folder, channels=dcgen_channels[name]))
            elif cls == "DCGenNVFP4ModelLoader":
                _place(path, functools.partial(_write_dcgen_nvfp4, channels=dcgen_channels[name]))
            elif cls == "DCGenDCAELoader":
                _place(path, lambda p: dcae_files(p, _dcae_variant_for(name)))
            elif cls == "DCGenSanaModelLoader":
                _place(path, _write_sana_folder)
            elif cls == "DCGenQwenEditModelLoader":
                from .smoke_qwen import write_release

                _place(path, write_release)
            elif cls == "CLIPLoader" and node["inputs"].get("type") == "qwen_image":
                _place(path, lambda p: save_file({"unused": torch.zeros(1)}, p))
            elif cls in ("DCGenApplyAlignedEmbedding", "DCGenLoraLoader") and \
                    _model_source(prompt, node) == "DCGenSanaModelLoader":
                _place(path, functools.partial(_write_sana_dcgen_file, lora=cls == "DCGenLoraLoader",
                                               channels=128 if "4K" in name.upper() else 32))
            elif cls == "UNETLoader":
                _place(path, lambda p: save_file(flux_state_dict(FULL_FLUX, 64, *FLUX_TEXT), p))
            elif cls == "DCGenApplyAlignedEmbedding":
                g = torch.Generator().manual_seed(1)
                h = FULL_FLUX["hidden_size"]
                _place(path, lambda p: save_file({
                    "x_embedder.weight": 0.02 * torch.randn(h, 32, generator=g), "x_embedder.bias": torch.zeros(h),
                    "proj_out.weight": 0.02 * torch.randn(32, h, generator=g), "proj_out.bias": torch.zeros(32)}, p))
            elif cls == "DCGenLoraLoader":
                g = torch.Generator().manual_seed(2)
                h = FULL_FLUX["hidden_size"]
                _place(path, lambda p: save_lora(p, {"transformer_blocks.0.attn.to_q": (
                    0.01 * torch.randn(4, h, generator=g), 0.01 * torch.randn(h, 4, generator=g))}, alpha=4.0))
            elif cls == "ControlNetLoader":
                _place(path, lambda p: save_file(flux_state_dict(dict(FULL_FLUX, depth=2, depth_single_blocks=0),
                                                                 64, *FLUX_TEXT, controlnet=True), p))
            elif cls == "VAELoader":
                _place(path, lambda p: save_file(flux_vae_state_dict(), p))
            elif cls == "UpscaleModelLoader":
                from spandrel.architectures.Compact import Compact

                _place(path, lambda p: save_file({k: v.contiguous() for k, v in
                                                  Compact(num_feat=8, num_conv=1, upscale=4).state_dict().items()}, p))


def flux_vae_state_dict(seed: int = 0) -> dict:
    """The FLUX VAE (16 latent channels) in ComfyUI's own key layout, shapes from ComfyUI's classes."""
    import comfy.ldm.models.autoencoder as ae

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        model = ae.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    return fast_random_weights(shapes, seed)


def run(workflows: list[str], runtime, keep: str | None = None) -> tuple[list[str], int]:
    """(report lines, failures): each workflow on tiny models in a temporary model folder (removed afterwards
    unless ``keep`` names a folder to use)."""
    root = keep or tempfile.mkdtemp(prefix="dcgen-smoke-")
    try:
        return _run_in(root, workflows, runtime)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _run_in(root: str, workflows: list[str], runtime) -> tuple[list[str], int]:
    import folder_paths

    from .workflows import MODEL_KINDS_FOR_SMOKE
    from .workflows import workflow_to_prompt

    for kind in MODEL_KINDS_FOR_SMOKE:
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        folder_paths.add_model_folder_path(kind, os.path.join(root, kind), is_default=True)
    from .smoke_qwen import tiny_qwen_clip_loader

    folder_paths.set_output_directory(os.path.join(root, "output"))
    input_dir = folder_paths.get_input_directory()
    os.makedirs(os.path.join(root, "input"), exist_ok=True)
    folder_paths.set_input_directory(os.path.join(root, "input"))  # Load Image's file; the user's input folder untouched
    loader, sana_loader, qwen_loader = tiny_dual_clip_loader(), tiny_sana_text_encoder_loader(), tiny_qwen_clip_loader()
    lines, failures = [], 0
    for path in workflows:
        name = os.path.basename(path)
        start = time.perf_counter()
        try:
            with open(path, encoding="utf-8") as f:
                wf = json.load(f)
            write_models(root, wf)
            classes = dict(runtime.node_classes)
            prompt = workflow_to_prompt(wf, classes)
            for node in prompt.values():
                if node["class_type"] == "DualCLIPLoader":
                    node["class_type"] = "DCGenSmokeTextEncoder"
                elif node["class_type"] == "DCGenSanaTextEncoderLoader":
                    node["class_type"] = "DCGenSmokeSanaTextEncoder"
                elif node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "qwen_image":
                    node["class_type"] = "DCGenSmokeQwenTextEncoder"
                for (cls, key), value in SMALL.items():
                    if node["class_type"] == cls and key in node["inputs"]:
                        node["inputs"][key] = value
                if node["class_type"] == "DCGenSampler" and "latent" not in node["inputs"]:
                    node["inputs"]["width"], node["inputs"]["height"] = 128, 128
            from .smoke_video import stand_ins

            runtime.register({"DCGenSmokeTextEncoder": loader, "DCGenSmokeSanaTextEncoder": sana_loader,
                              "DCGenSmokeQwenTextEncoder": qwen_loader, **stand_ins(prompt)})
            runtime.executor.reset()
            outputs = runtime.run(prompt)
            images = sum(len(o.get("images", [])) for o in outputs.values())
            videos = sum(1 for o in outputs.values() for i in o.get("images", []) if i.get("filename", "").endswith(
                (".webm", ".mp4")))
            saved = f"{videos} video(s)" if videos else f"{images} image(s)"
            lines.append(f"OK   {name}: {time.perf_counter() - start:.1f} s, {saved} saved")
        except Exception as e:  # noqa: BLE001 (report every workflow)
            failures += 1
            lines.append(f"FAIL {name}: {time.perf_counter() - start:.1f} s: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}")
        finally:
            runtime.nodes.NODE_CLASS_MAPPINGS.pop("DCGenSmokeTextEncoder", None)
            runtime.nodes.NODE_CLASS_MAPPINGS.pop("DCGenSmokeSanaTextEncoder", None)
            runtime.nodes.NODE_CLASS_MAPPINGS.pop("DCGenSmokeQwenTextEncoder", None)
            runtime.nodes.NODE_CLASS_MAPPINGS.pop("DCGenSmokeWanTextEncoder", None)
            runtime.nodes.NODE_CLASS_MAPPINGS.pop("DCGenSmokeClipVision", None)
    folder_paths.set_input_directory(input_dir)
    return lines, failures
