"""4-bit FLUX transformers as ComfyUI MODELs: ComfyUI NVFP4 files and nunchaku SVDQuant files.

An NVFP4 file (made by ``python -m dcgen_core.quantize``, or any ComfyUI NVFP4 FLUX) is built with the
operations :func:`.ops.operations_for` picks; its weights stay 4-bit in memory. A DC-Gen file's header
carries its DC-AE facts (latent channels, scaling), so it samples DC-AE latents as loaded; a base FLUX file
becomes a DC-Gen model through DC-Gen Add Embedding + DC-Gen Load LoRA, as in bf16.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ..shared.quant import nvfp4
from ..shared.checkpoints import load_safetensors, owned, read_safetensors_header, weight_format
from .comfy_model import flux_model_keys
from ..shared.comfy_compat import make_model_patcher
from ..shared.errors import DCGenError
from .dcgen import _install_latent_space
from .comfy_model import dcgen_channels, flux_model_config
from .keys import flux_config_from_state_dict, is_bfl_flux
from ..shared.keys import strip_prefix
from ..shared.latent_space import load_with_cached_init, resolve_scaling
from ..shared.quant.ops import PACK_OPS, operations_for

METADATA_KEY = "dcgen"


def dcgen_metadata(metadata: dict, source: str) -> dict:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DCGenError(f"{source}: expected header metadata '{METADATA_KEY}' to be JSON, found unreadable text "
                         f"({e}).") from e
    if not isinstance(info, dict):
        raise DCGenError(f"{source}: expected header metadata '{METADATA_KEY}' to be a JSON object, found "
                         f"{type(info).__name__}.")
    return info


def _compute_dtype(model_config, params: int, load_device):
    import comfy.model_management as mm

    supported = list(model_config.supported_inference_dtypes)
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=supported, weight_dtype=None)
    manual = mm.unet_manual_cast(unet_dtype, load_device, supported)
    model_config.set_inference_dtype(unet_dtype, manual)
    return manual or unet_dtype


def build_quantized_flux(sd: dict, layers, cfg, source: str, ops: str = "auto", disable_dynamic: bool = False):
    """A ComfyUI FLUX ModelPatcher for a BFL-keyed NVFP4 state dict (``layers``: its quantized layers)."""
    import comfy.model_management as mm

    view = nvfp4.logical_view(sd, layers)
    model_config = flux_model_config(view, cfg, source)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    compute_dtype = _compute_dtype(model_config, sum(t.numel() for t in view.values()), load_device)
    operations, ops_name = operations_for(model_config, compute_dtype, load_device, ops)
    model_config.custom_operations = operations
    model = model_config.get_model(view, "", device=offload_device)
    dm = model.diffusion_model
    sd = flux_model_keys(model_config, sd)
    # owned memory (the model never stays backed by the file), one copy per tensor: 4-bit codes and their scales
    # as stored; the other weights as the ops keep them (the pack's: as stored; core's: in the compute dtype)
    plain_dtype = None if ops_name == PACK_OPS else compute_dtype
    quantized = tuple(f"{layer}." for layer in layers)

    def own(k, v):
        return owned(v, plain_dtype if v.is_floating_point() and not k.startswith(quantized) else None)

    result = dm.load_state_dict({k: own(k, sd.pop(k)) for k in list(sd)}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DCGenError(
            f"{source}: expected the tensors of a FLUX transformer with {cfg.depth} double / "
            f"{cfg.depth_single_blocks} single blocks, found missing {sorted(result.missing_keys)[:4]}, unexpected "
            f"{sorted(result.unexpected_keys)[:4]}.")
    unloaded = [n for n, mod in dm.named_modules() if isinstance(mod, torch.nn.Linear) and
                getattr(mod, "weight", None) is None]
    if unloaded:
        raise DCGenError(f"{source}: expected a weight for every linear layer, found none for {unloaded[:4]}.")
    model.to(offload_device)
    n_quant = sum(nvfp4.is_quantized(p) for p in dm.parameters())
    logging.info("%s: %d NVFP4 layers through %s, compute dtype %s; %s.", source, n_quant, ops_name,
                 str(compute_dtype).replace("torch.", ""), nvfp4.compute_path(load_device))
    m = make_model_patcher(model, load_device, offload_device, disable_dynamic=disable_dynamic)
    m.model_options["dcgen_quantization"] = {"format": nvfp4.FORMAT, "layers": n_quant, "ops": ops_name}
    return m


def read_nvfp4_file(path: str):
    """(BFL state dict of mapped views, quantized layers, FluxConfig, DC-Gen header facts) of an NVFP4 file."""
    sd, metadata = load_safetensors(path)
    sd = strip_prefix(sd)
    kind = weight_format(sd, metadata)
    if kind == "svdquant":
        raise DCGenError(f"{path}: expected a ComfyUI NVFP4 file, found a nunchaku SVDQuant file (qweight/wscales "
                         "tensors); it is read by the same node with the svdquant format.")
    layers = nvfp4.quantized_layers(sd, metadata, path)
    nvfp4.add_layer_confs(sd, layers)  # layers listed only in the header: per-layer entries, as core makes them
    view = nvfp4.logical_view(sd, layers)
    if not is_bfl_flux(view):
        sample = ", ".join(sorted(view)[:3])
        raise DCGenError(f"{path}: expected an NVFP4 FLUX transformer (BFL/ComfyUI keys: img_in, double_blocks, "
                         f"...), found keys like {sample}. Other NVFP4 models load with core Load Diffusion Model.")
    config_json = None
    if metadata.get("config"):
        try:
            config_json = json.loads(metadata["config"])
        except json.JSONDecodeError:
            config_json = None
    cfg = flux_config_from_state_dict(view, config_json)
    return sd, layers, cfg, dcgen_metadata(metadata, path)


def _load_nvfp4_patcher(path: str, ops: str = "auto", vae=None, disable_dynamic: bool = False):
    sd, layers, cfg, info = read_nvfp4_file(path)
    channels = dcgen_channels(cfg, path)
    if channels is not None and info.get("latent_channels") not in (None, channels):
        raise DCGenError(f"{path}: expected header facts for {channels} latent channels (the embedder's width), "
                         f"found latent_channels={info['latent_channels']}: the header belongs to another model.")
    scaling = None
    if channels is not None:
        scaling = (float(info["scaling_factor"]) if vae is None and info.get("scaling_factor")
                   else resolve_scaling(channels, vae, path))
    m = build_quantized_flux(sd, layers, cfg, path, ops=ops, disable_dynamic=disable_dynamic)
    if channels is not None:
        _install_latent_space(m, channels, scaling, own_model=True)
    return m


def load_nvfp4_flux(path: str, vae=None, ops: str = "auto"):
    """Load an NVFP4 FLUX / DC-Gen-FLUX file as a ComfyUI MODEL (memory-mapped read, 4-bit weights in memory)."""
    return load_with_cached_init(_load_nvfp4_patcher, path, ops, vae=vae)


SVDQUANT_BACKENDS = ("auto", "nunchaku", "torch")


def load_4bit_flux(path: str, vae=None, svdquant_backend: str = "auto", ops: str = "auto"):
    """The 4-bit loader node's entry: an NVFP4 file or a nunchaku SVDQuant file, told apart by their tensors."""
    if svdquant_backend not in SVDQUANT_BACKENDS:
        raise DCGenError(f"svdquant_backend: expected one of {list(SVDQUANT_BACKENDS)}, found '{svdquant_backend}'.")
    from ..shared.quant.svdquant.folder import is_svdquant_folder, split_file_hint

    if is_svdquant_folder(path):  # nunchaku's pre-v1 layout: the merged file's tensors in two files
        from .svdquant import load_svdquant_flux

        return load_svdquant_flux(path, vae=vae, backend=svdquant_backend)
    header = read_safetensors_header(path) if path.endswith((".safetensors", ".sft")) else None
    if header is None:
        raise DCGenError(f"{path}: expected a single 4-bit .safetensors file or nunchaku's pre-v1 SVDQuant folder "
                         f"(transformer_blocks.safetensors + unquantized_layers.safetensors + config.json), found "
                         f"{'another folder' if os.path.isdir(path) else 'another kind of file'}. Load bf16 "
                         "diffusers folders with DC-Gen Load Model.")
    kind = weight_format([k for k in header if k != "__metadata__"], header.get("__metadata__") or {})
    if kind == "svdquant":
        from .svdquant import load_svdquant_flux

        return load_svdquant_flux(path, vae=vae, backend=svdquant_backend)
    if kind == "plain":
        if split_file_hint(path):
            raise DCGenError(f"{path}: expected a whole 4-bit model, found no 4-bit tensors.{split_file_hint(path)}")
        dtypes = sorted({v.get("dtype", "?") for k, v in header.items() if k != "__metadata__"})
        raise DCGenError(f"{path}: expected a 4-bit file (NVFP4 with per-layer comfy_quant entries or a "
                         f"_quantization_metadata header, or nunchaku SVDQuant qweight/wscales), found a plain "
                         f"checkpoint ({', '.join(dtypes)}). Load it with DC-Gen Load Model, or quantize "
                         "it: python -m dcgen_core.quantize IN OUT --format nvfp4")
    return load_nvfp4_flux(path, vae=vae, ops=ops)
