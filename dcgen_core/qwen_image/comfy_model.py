"""Qwen-Image as a ComfyUI model: core's supported_models.QwenImage / QwenImageTransformer2DModel built from the
weights' config (any width, depth, channel count), and the loader of DC-Gen-Qwen-Image-Edit in every layout it is
published in (diffusers pipeline folder, the Hub's nested ``upload/DC-Qwen-Image-Edit/DC-Gen-Qwen-Image-Edit/``
folder, a transformer folder, a single file). The DC-AE latent space is installed by dcgen.py."""

from __future__ import annotations

import logging
import os

from ..shared import comfy_paths
from ..shared.checkpoints import check_tensors_match, load_checkpoint, owned, weight_format
from ..shared.comfy_compat import make_model_patcher
from ..shared.errors import DCGenError
from ..shared.keys import strip_prefix
from ..shared.latent_space import build_on_meta, load_with_cached_init, resolve_scaling
from .dcgen import LATENT_CHANNELS, NAME, install_latent_space
from .keys import config_from_state_dict
from .scheduler import release_scheduler

#: Where the Hub repo nvidia/DC-Qwen-Image-Edit keeps the pipeline (the authors' builder moves it up; we read it there).
NESTED_RELEASE = os.path.join("upload", "DC-Qwen-Image-Edit", "DC-Gen-Qwen-Image-Edit")


def resolve_release_folder(path: str) -> str:
    """The pipeline folder inside a download of the Hub repo (nested or not); other paths unchanged."""
    if os.path.isdir(path):
        nested = os.path.join(path, NESTED_RELEASE)
        if os.path.isdir(nested):
            return nested
    return path


def read_qwen_checkpoint(path: str):
    """(state dict of mapped views, QwenImageConfig) of a Qwen-Image transformer file or folder."""
    folder = resolve_release_folder(path)
    ckpt = load_checkpoint(folder, component="transformer")
    sd = strip_prefix(ckpt.state_dict)
    del ckpt.state_dict
    fmt = weight_format(sd, ckpt.metadata)
    if fmt in ("nvfp4", "svdquant"):
        raise DCGenError(f"{path}: expected a bf16/fp16/fp32 Qwen-Image transformer, found a 4-bit {fmt} file "
                         "(not supported for Qwen-Image).")
    return sd, config_from_state_dict(sd, ckpt.config, path)


def build_comfy_qwen_image(sd: dict, cfg, weight_dtype: str = "default", source: str = "checkpoint",
                           disable_dynamic: bool = False):
    """A ComfyUI Qwen-Image ModelPatcher (core classes) holding ``sd``, built on the meta device and filled one
    tensor at a time in private memory."""
    import comfy.model_detection

    unet_config = cfg.comfy_kwargs()
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if model_config is None:
        raise DCGenError(f"{source}: ComfyUI has no Qwen-Image model class for config {unet_config}.")
    model, unet_dtype, load_device, offload_device = build_on_meta(model_config, sd, weight_dtype)
    dm = model.diffusion_model
    expected = dict(dm.state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith("__")}  # core's marker buffers (2511) are not weights
    check_tensors_match(expected, sd, source, f"a Qwen-Image transformer with {cfg.num_layers} blocks")
    dm.load_state_dict({k: owned(sd.pop(k), unet_dtype) for k in list(sd)}, strict=True, assign=True)
    model.to(offload_device)
    return make_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)


def _load_patcher(path: str, weight_dtype: str, vae=None, disable_dynamic: bool = False):
    sd, cfg = read_qwen_checkpoint(path)
    if cfg.patch_size == 2 and cfg.in_features == cfg.out_features == 64:
        # base Qwen-Image(-Edit): 16 Wan channels in 2x2 patches; DC-Gen after DC-Gen Add Embedding
        logging.info("%s: base Qwen-Image (Wan latents, 2x2 patches); loaded without the DC-AE latent space.", path)
        return build_comfy_qwen_image(sd, cfg, weight_dtype, source=path, disable_dynamic=disable_dynamic)
    if cfg.patch_size != 1 or cfg.latent_channels != LATENT_CHANNELS or cfg.out_features != LATENT_CHANNELS:
        raise DCGenError(f"{path}: expected {NAME} (patch size 1, {LATENT_CHANNELS} DC-AE channels in and out), found "
                         f"patch size {cfg.patch_size}, {cfg.in_features} in / {cfg.out_features} out.")
    scaling = resolve_scaling(LATENT_CHANNELS, vae, path)
    scheduler, source = release_scheduler(resolve_release_folder(path))
    m = build_comfy_qwen_image(sd, cfg, weight_dtype, source=path, disable_dynamic=disable_dynamic)
    install_latent_space(m, scaling, own_model=True, scheduler=scheduler, scheduler_source=source)
    return m


def load_qwen_edit_transformer(path: str, weight_dtype: str = "default", vae=None):
    """DC-Gen-Qwen-Image-Edit as a ComfyUI MODEL (rebuildable through ``cached_patcher_init`` as core's are); a base
    Qwen-Image(-Edit) loads as core's model, for DC-Gen Add Embedding + LoRA."""
    return load_with_cached_init(_load_patcher, path, weight_dtype, vae=vae)


def loader_choices(kind: str = "diffusion_models") -> list[str]:
    """What DC-Gen Load Qwen offers: weight files and diffusers folders, a release folder once (nothing inside it:
    not the shards of its transformer, nor its other components)."""
    releases = release_folders(kind)
    inside = tuple(r + "/" for r in releases)
    return sorted({n for n in comfy_paths.weight_files(kind) if not n.startswith(inside)} | set(releases))


def release_folders(kind: str = "diffusion_models") -> list[str]:
    """Downloads of the Hub repo in ``kind`` whose pipeline sits deeper than the pack's folder scan goes (the nested
    layout), or pipeline folders (model_index.json + transformer/): offered by their top folder."""
    import folder_paths

    found = []
    for base in folder_paths.get_folder_paths(kind):
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            top = os.path.join(base, name)
            if os.path.isdir(os.path.join(top, NESTED_RELEASE, "transformer")) or (
                    os.path.isfile(os.path.join(top, "model_index.json"))
                    and os.path.isdir(os.path.join(top, "transformer"))):
                found.append(name)
    return found
