"""The DC-AE latent space of a DC-Gen model, shared by every architecture the pack patches (FLUX, SANA).

What a DC-Gen MODEL carries (``model_options["dcgen"]``: latent channels, f, scaling, schedule), its latent
format and previews, the hooks that make core samplers and empty latents respect it, the size and channel checks,
the DC-AE scaling factor, and the loader helpers both architectures use. Architecture-specific parts (FLUX's token
view and time shift, SANA's flow shift) live in the family packages (flux/dcgen.py, sana/).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from . import previews
from .comfy_compat import archive_weight_dtypes
from .comfy_vae import check_resolution, require_dcae
from .errors import DCGenError


#: DC-AE latent channels -> spatial compression f, and the DC-Gen default scaling factor.
SPATIAL_COMPRESSION = {32: 32, 128: 64, 512: 128}
DEFAULT_SCALING = {32: 0.41407, 128: 0.5935, 512: 0.3620}
WEIGHT_DTYPES = ["default", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
#: The resolution each DC-Gen model was trained for (the default time shift).
NATIVE_RESOLUTION = {32: 1024, 128: 4096, 512: 4096}


def make_latent_format(latent_channels: int, scaling_factor: float):
    import comfy.latent_formats

    class DCAELatent(comfy.latent_formats.LatentFormat):
        latent_dimensions = 2

        def __init__(self, channels, scale):
            self.latent_channels = channels
            self.scale_factor = scale
            # ComfyUI v0.33 resizes a core (f8) empty latent by downscale_ratio_spacial / this to the DC-AE grid
            self.spacial_downscale_ratio = SPATIAL_COMPRESSION[channels]

        @property
        def latent_rgb_factors(self):
            return previews.lookup(self.latent_channels)[0]

        @property
        def latent_rgb_factors_bias(self):
            return previews.lookup(self.latent_channels)[1]

    return DCAELatent(latent_channels, scaling_factor)


def dcgen_info(model) -> dict | None:
    """What a patched/loaded DC-Gen MODEL carries: latent channels, f, scaling, shift."""
    return model.model_options.get("dcgen")


def logical_weights(module) -> dict:
    """Parameters by name with their logical shapes: a quantized weight (held as a QuantizedTensor) reports
    [out, in], where state dicts of quantized layers hold packed codes and scales."""
    out = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, m in module.named_modules():  # modules keeping a 4-bit weight in their own format (SVDQuant)
        if hasattr(m, "logical_weight"):
            out[f"{name}.weight"] = m.logical_weight
    return out


class _PreviewView:
    """``model`` as seen by ComfyUI's previewer: the same, except for its latent format."""

    def __init__(self, model, latent_format):
        self._model = model
        self.model = _BaseModelView(model.model, latent_format)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _BaseModelView:
    def __init__(self, base_model, latent_format):
        self._base = base_model
        self.latent_format = latent_format

    def __getattr__(self, name):
        return getattr(self._base, name)


def install_preview_hook():
    """Make core samplers preview DC-AE latents of patched models.

    ComfyUI builds the previewer from ``model.model.latent_format`` before the
    clone's object patches are applied, so a patched core FLUX would be previewed
    with FLUX's 16-channel factors. Only models carrying DC-Gen info are affected.
    """
    import latent_preview

    original = latent_preview.prepare_callback
    if getattr(original, "dcgen_hook", False):
        return

    def prepare_callback(model, steps, *args, **kwargs):
        info = dcgen_info(model) if hasattr(model, "model_options") else None
        if info is not None:
            model = _PreviewView(model, make_latent_format(info["latent_channels"], info["scaling_factor"]))
        return original(model, steps, *args, **kwargs)

    prepare_callback.dcgen_hook = True
    latent_preview.prepare_callback = prepare_callback


#: The spatial downscale of the empty latents core and pack nodes make, by channel count, for ComfyUI versions
#: whose LATENTs do not say it (v0.3.64): core Empty Latent Image (4) / EmptySD3LatentImage (16) are 1/8.
_EMPTY_LATENT_RATIO = {4: 8, 16: 8, **SPATIAL_COMPRESSION}


def _empty_latent_on_dcae_grid(latent: torch.Tensor, ratio: int, info: dict) -> torch.Tensor:
    """An all-zero latent made for another grid (1/ratio) as the same image size on the model's DC-AE grid."""
    f, c = info["spatial_compression"], info["latent_channels"]
    h, w = latent.shape[-2] * ratio, latent.shape[-1] * ratio
    if h % f or w % f:
        raise DCGenError(
            f"empty LATENT: expected an image size that is a multiple of {f} (this DC-Gen model's DC-AE grid), found "
            f"{w}x{h} from a {latent.shape[1]}-channel latent at 1/{ratio} scale. Use DC-Gen Empty Latent with "
            f"the DC-AE VAE, or a size like {max(f, round(w / f) * f)}x{max(f, round(h / f) * f)}.")
    check_size_for_model(info, w, h)
    logging.info("DC-Gen: empty %d-channel latent at 1/%d scale = a %dx%d image; sampling it as a %dx%dx%d DC-AE "
                 "latent (DC-Gen Empty Latent makes one directly).", latent.shape[1], ratio, w, h, c, h // f, w // f)
    return torch.zeros(latent.shape[0], c, h // f, w // f, dtype=latent.dtype, device=latent.device)


def install_empty_latent_hook():
    """Give DC-Gen models the image size an empty latent was made for.

    Core samplers expand an all-zero latent to the model's channels but keep its grid, so a core Empty Latent
    Image (1/8 scale) of 1024x1024 would be sampled as a 128x128 DC-AE latent: a 4096x4096 image. ComfyUI v0.33
    resizes by ``downscale_ratio_spacial`` / the latent format's ``spacial_downscale_ratio`` (rounding a size off
    the grid); v0.3.64 does not. For DC-Gen models this hook maps the empty latent to the DC-AE grid on either
    version and refuses a size that is not on it; other models go to core unchanged.
    """
    import comfy.sample

    original = comfy.sample.fix_empty_latent_channels
    if getattr(original, "dcgen_hook", False):
        return

    def fix_empty_latent_channels(model, latent_image, *args, **kwargs):
        info = dcgen_info(model) if hasattr(model, "model_options") else None
        if info is not None and info.get("temporal_compression"):  # a video model (DC-AE-V): 5-D latents only
            from .comfy_vae_v import check_video_latent

            check_video_latent(info, latent_image)
            return original(model, latent_image, *args, **kwargs)
        if info is not None and isinstance(latent_image, torch.Tensor) and latent_image.ndim == 4 \
                and not getattr(latent_image, "is_nested", False) and torch.count_nonzero(latent_image) == 0:
            args = list(args)
            given = args[0] if args else kwargs.get("downscale_ratio_spacial")
            ratio = given or _EMPTY_LATENT_RATIO.get(latent_image.shape[1])
            if ratio is not None and (ratio != info["spatial_compression"]
                                      or latent_image.shape[1] != info["latent_channels"]):
                latent_image = _empty_latent_on_dcae_grid(latent_image, int(ratio), info)
            if args:
                args[0] = None  # resized here; core must not resize again
            kwargs.pop("downscale_ratio_spacial", None)
        return original(model, latent_image, *args, **kwargs)

    fix_empty_latent_channels.dcgen_hook = True
    comfy.sample.fix_empty_latent_channels = fix_empty_latent_channels


#: Largest image side each DC-Gen model is made for: the 1K model (f32c32) up to 2K, the 4K model (f64c128) 4K.
MAX_SIDE = {32: 2048, 128: 4096, 512: 8192}
MODEL_NAMES = {32: "1K model (DC-AE f32c32)", 128: "4K model (DC-AE-1.5 f64c128)", 512: "f128c512 model"}


def check_size_for_model(info: dict, width: int, height: int):
    """The image size is on the model's DC-AE grid and within its range (``info["max_side"]`` where the model
    says it, e.g. SANA; else the DC-Gen model's by channel count)."""
    c, f = info["latent_channels"], info["spatial_compression"]
    name = info.get("name") or f"DC-Gen {MODEL_NAMES.get(c, f'{c}-channel model')}"
    check_resolution(width, height, f, subject=f"size for the {name}")
    limit = info.get("max_side", MAX_SIDE.get(c))
    if limit and max(width, height) > limit:
        hint = " Use the DC-Gen Res4K model (DC-AE-1.5 f64c128) for 4K." if c == 32 and "max_side" not in info else ""
        raise DCGenError(f"size: expected at most {limit} px per side for the {name}, found {width}x{height}.{hint}")


def check_latent_channels(latent: "torch.Tensor", latent_channels: int, subject: str = "LATENT"):
    if latent.ndim == 4 and latent.shape[1] != latent_channels:
        raise DCGenError(
            f"{subject}: expected a DC-AE latent with {latent_channels} channels for this DC-Gen model, found "
            f"{latent.shape[1]} channels (shape {list(latent.shape)}), a latent from another model. Use DC-Gen Empty "
            f"Latent, or VAE Encode with the DC-AE VAE the model was trained with.")


def require_dcgen(model, subject: str = "model") -> dict:
    info = dcgen_info(model) if hasattr(model, "model_options") else None
    if info is None:
        raise DCGenError(f"{subject}: expected a DC-Gen model (from DC-Gen Load Model or DC-Gen "
                         f"Add Embedding), found a plain {type(getattr(model, 'model', model)).__name__}.")
    return info


def resolve_scaling(latent_channels: int, vae=None, subject: str = "embedding") -> float:
    """The DC-AE scaling factor: from the paired VAE when given, else the DC-Gen default for C."""
    if vae is not None:
        dcae_cfg = require_dcae(vae)
        vae_c = dcae_cfg.latent_channels
        if vae_c != latent_channels:
            raise DCGenError(f"{subject}: expected {vae_c} latent channels (the DC-AE '{dcae_cfg.variant}'), "
                             f"found {latent_channels}. Pair the model with the DC-AE it was trained for.")
        return float(dcae_cfg.scaling_factor)
    if latent_channels not in DEFAULT_SCALING:
        raise DCGenError(f"{subject}: expected 32, 128 or 512 DC-AE latent channels, found {latent_channels}.")
    return DEFAULT_SCALING[latent_channels]


def load_with_cached_init(load, path: str, *args, vae=None):
    """``load(path, *args, dcae)``, a patcher, with ``cached_patcher_init`` set to rebuild it; ``dcae`` keeps the
    VAE's DC-AE config only (not the VAE and its weights)."""
    dcae = None if vae is None else SimpleNamespace(dcae_config=require_dcae(vae))
    m = load(path, *args, dcae)
    m.cached_patcher_init = (load, (path, *args, dcae))
    return m


def build_on_meta(model_config, sd, weight_dtype: str):
    """(model, weight dtype, load device, offload device): ``model_config``'s model built on the meta device (no
    memory: the loader fills it one tensor at a time) with the dtypes a loader's ``weight_dtype`` widget asks for;
    "fp8_e4m3fn_fast" also turns on core's fp8 matmuls, as core's loaders do for it."""
    import comfy.model_management as mm

    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    unet_dtype = set_inference_dtypes(model_config, weight_dtype, sd, load_device)
    if weight_dtype == "fp8_e4m3fn_fast":
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(sd, "", device="meta")
    model.device = None
    return model, unet_dtype, load_device, offload_device


def set_inference_dtypes(model_config, weight_dtype: str, sd, load_device):
    """Set ``model_config``'s weight dtype (what a loader's ``weight_dtype`` widget asks for; "default" picks as core
    loaders do) and its manual-cast compute dtype for ``load_device``; returns the weight dtype."""
    import comfy.model_management as mm

    unet_dtype = _unet_dtype_for(weight_dtype, sd, model_config)
    model_config.set_inference_dtype(
        unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes))
    return unet_dtype


def _unet_dtype_for(weight_dtype: str, sd, model_config):
    import comfy.model_management as mm
    import comfy.utils

    explicit = {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
        "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
    }
    if weight_dtype not in WEIGHT_DTYPES:
        raise DCGenError(f"weight_dtype: expected one of {WEIGHT_DTYPES}, found '{weight_dtype}'.")
    if weight_dtype != "default":
        return explicit[weight_dtype]
    params = sum(t.numel() for t in sd.values())
    return mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes),
                         weight_dtype=comfy.utils.weight_dtype(sd))


def linear_like(template, weight: torch.Tensor, bias: torch.Tensor | None, fallback_dtype):
    """A new layer of ``template``'s class (ComfyUI's ops) holding ``weight``/``bias`` in ``template``'s dtype (the
    compute dtype where the template is fp8) on its device: an embedder/head replacing the model's own."""
    dtype = template.weight.dtype
    if dtype.itemsize < 2:  # fp8 base weights: keep the small new layers in the compute dtype
        dtype = fallback_dtype or torch.bfloat16
    make = type(template)
    if weight.ndim == 4:  # a conv (SANA's 1x1 patch embedder)
        layer = make(weight.shape[1], weight.shape[0], kernel_size=weight.shape[2:], bias=bias is not None,
                     dtype=dtype, device=template.weight.device)
    else:
        layer = make(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=template.weight.device)
    layer.weight = torch.nn.Parameter(weight.to(dtype=dtype, device=template.weight.device), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(dtype=dtype, device=template.weight.device), requires_grad=False)
    archive_weight_dtypes(layer)
    return layer


TEXT_ENCODERS = {4096: "T5-XXL", 768: "CLIP-L", 2048: "CLIP-G / Gemma", 2304: "Gemma-2-2B", 1280: "CLIP-G pooled",
                  3584: "Qwen2.5-VL-7B", 7680: "Mistral/Qwen (FLUX.2)"}


def encoder_name(width: int) -> str:
    name = TEXT_ENCODERS.get(width)
    return f"{width} ({name})" if name else str(width)


def check_context_width(conds: dict, expected: int, model_name: str, hint: str):
    """CONDITIONING from another model's text encoder gives a raw matmul error deep in the model; say which."""
    for cond_list in conds.values():
        for cond in cond_list or []:
            found = cond.get("cross_attn") if isinstance(cond, dict) else None
            if found is not None and found.shape[-1] != expected:
                raise DCGenError(f"CONDITIONING: expected text embeddings of width {encoder_name(expected)} for this "
                                 f"{model_name} model, found {encoder_name(found.shape[-1])}. {hint}")
