"""The base FLUX as a diffusers ``FluxTransformer2DModel`` for training: loading any layout the pack reads,
swapping in a DC-Gen embedder/head, token packing and the denoiser call."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.checkpoints import check_tensors_match, load_checkpoint, owned
from ...shared.errors import DCGenError
from ...flux.keys import (SCALE_SHIFT_SWAPPED_MODULES, diffusers_flux_module_names, diffusers_flux_module_to_bfl,
                          diffusers_to_bfl, flux_config_from_state_dict, is_bfl_flux, is_diffusers_flux,
                          swap_scale_shift)
from ...shared.keys import strip_prefix
from .objectives import shift_for_latent

#: PEFT targets of the recipe: every attention q/k/v/out (incl. the added/context ones) and feed-forward linear of
#: the double blocks, and the single blocks' q/k/v, proj_mlp and proj_out. Matched with re.fullmatch (the top-level
#: proj_out, the new head, is trained fully instead).
LORA_TARGET_REGEX = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
)

#: LoRA key prefix (``transformer.<diffusers module>``: core ComfyUI and the pack map FLUX's diffusers names).
LORA_KEY_PREFIX = "transformer."

_CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                "guidance_embeds", "axes_dims_rope")


def bfl_to_diffusers(sd_bfl: dict, cfg) -> dict:
    """A BFL/ComfyUI FLUX state dict in diffusers keys (fused q/k/v(/mlp) split by rows, final adaLN halves
    swapped back); views where possible. Every BFL tensor must be used."""
    sd_bfl = strip_prefix(sd_bfl)
    out, used = {}, set()
    for name in diffusers_flux_module_names(cfg):
        for param in ("weight", "bias"):
            try:
                key, offset = diffusers_flux_module_to_bfl(f"{name}.{param}", config=cfg)
            except DCGenError:  # an RMSNorm has no bias
                continue
            if key not in sd_bfl and key.endswith(".scale") and key[:-len(".scale")] + ".weight" in sd_bfl:
                key = key[:-len(".scale")] + ".weight"  # ComfyUI v0.33 names RMSNorm parameters ".weight"
            if key not in sd_bfl:
                continue
            t = sd_bfl[key]
            if offset is not None:
                t = t.narrow(0, offset[1], offset[2])
            elif name in SCALE_SHIFT_SWAPPED_MODULES:
                t = swap_scale_shift(t)
            out[f"{name}.{param}"] = t
            used.add(key)
    left = sorted(set(sd_bfl) - used)
    if left:
        raise DCGenError(f"BFL FLUX state dict: expected only FLUX transformer tensors, found {len(left)} others, "
                         f"e.g. {left[:4]}.")
    return out


def diffusers_config(cfg) -> dict:
    """FluxTransformer2DModel keyword arguments for a :class:`~dcgen_core.flux.keys.FluxConfig`."""
    if abs(cfg.mlp_ratio - 4.0) > 1e-3:
        raise DCGenError(f"FLUX transformer: expected an MLP ratio of 4 (diffusers' FluxTransformer2DModel), found "
                         f"{cfg.mlp_ratio:.3f}.")
    return dict(patch_size=1, in_channels=cfg.img_in_features, out_channels=cfg.out_features, num_layers=cfg.depth,
                num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
                num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
                pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
                axes_dims_rope=tuple(cfg.axes_dim))


def read_base_state_dict(path: str) -> tuple[dict, dict]:
    """(diffusers-keyed state dict of mapped views, FluxTransformer2DModel kwargs) of a FLUX transformer file or
    diffusers folder (diffusers or BFL keys)."""
    ckpt = load_checkpoint(path, component="transformer")
    sd = strip_prefix(ckpt.state_dict)
    if any(k.endswith((".comfy_quant", ".qweight")) for k in sd) or ckpt.metadata.get("_quantization_metadata"):
        raise DCGenError(f"{path}: expected a bf16/fp16/fp32 FLUX transformer to train on, found a 4-bit file. "
                         "Train on the full-precision base and quantize afterwards.")
    if is_diffusers_flux(sd):
        fcfg = flux_config_from_state_dict(diffusers_to_bfl(sd, lazy=True), ckpt.config)
    elif is_bfl_flux(sd):
        fcfg = flux_config_from_state_dict(sd, ckpt.config)
        sd = bfl_to_diffusers(sd, fcfg)
    else:
        raise DCGenError(f"{path}: expected a FLUX transformer (diffusers or BFL/ComfyUI keys), found keys like "
                         f"{', '.join(sorted(sd)[:3])}.")
    config = diffusers_config(fcfg)
    if ckpt.config:
        config.update({k: ckpt.config[k] for k in ("patch_size",) if k in ckpt.config})
    if config["patch_size"] != 1:
        raise DCGenError(f"{path}: expected a diffusers FLUX with patch_size 1 (2x2 patches packed outside), found "
                         f"{config['patch_size']}.")
    return sd, config


def load_base_transformer(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """A frozen diffusers FluxTransformer2DModel from ``path``, built on the meta device and filled one tensor at a
    time in ``dtype`` (peak memory near the model's size)."""
    from diffusers import FluxTransformer2DModel

    sd, config = read_base_state_dict(path)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    check_tensors_match(model.state_dict(), sd, path, "a FLUX transformer of its config")
    model.load_state_dict({k: owned(sd.pop(k), dtype).to(device) for k in list(sd)}, strict=True, assign=True)
    model.source = os.path.abspath(path)
    return model.eval().requires_grad_(False)


def random_base_transformer(config: dict, dtype: torch.dtype, device, seed: int = 0, std: float = 0.02):
    """A FluxTransformer2DModel with random N(0, std) weights (norm scales 1) straight on ``device`` (GPU sizing)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight") and v.ndim == 1:
            sd[k] = torch.ones(v.shape, dtype=dtype, device=device)
        else:
            sd[k] = (torch.randn(v.shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def new_linear(in_features: int, out_features: int, device=None) -> nn.Linear:
    """An fp32 linear with xavier-uniform weight and zero bias (the recipe's init for the new embedder/head)."""
    layer = nn.Linear(in_features, out_features, device=device, dtype=torch.float32)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def hidden_size(model) -> int:
    return model.inner_dim if hasattr(model, "inner_dim") else model.x_embedder.out_features


def base_embedder(model) -> nn.Linear:
    """The frozen base FLUX's embedder (the alignment teacher); refuses a model that is already DC-Gen."""
    if model.x_embedder.in_features != 64:
        raise DCGenError(f"{getattr(model, 'source', 'base transformer')}: expected the base FLUX (64 = 16 latent "
                         f"channels x 2x2 patches per token), found an embedder of {model.x_embedder.in_features} "
                         "inputs (already a DC-Gen model?).")
    return model.x_embedder


def install_embedding(model, channels: int, embedding: dict | None = None, device=None):
    """Give ``model`` a 1x1 embedder [hidden, C] and head [C, hidden] (fp32): from ``embedding`` (diffusers names
    x_embedder/proj_out), else freshly initialised. Returns the two modules."""
    hidden = hidden_size(model)
    device = device or model.x_embedder.weight.device
    embedder, head = new_linear(channels, hidden, device), new_linear(hidden, channels, device)
    if embedding is not None:
        with torch.no_grad():
            embedder.weight.copy_(embedding["x_embedder.weight"])
            embedder.bias.copy_(embedding["x_embedder.bias"])
            head.weight.copy_(embedding["proj_out.weight"])
            head.bias.copy_(embedding["proj_out.bias"])
    model.x_embedder, model.proj_out = embedder, head
    model.out_channels = channels
    model.register_to_config(in_channels=channels, out_channels=channels)
    return embedder, head


def embedding_state_dict(model) -> dict:
    """The four aligned-embedding tensors under diffusers names (fp32 copies)."""
    return {"x_embedder.weight": model.x_embedder.weight.detach().float().cpu().clone(),
            "x_embedder.bias": model.x_embedder.bias.detach().float().cpu().clone(),
            "proj_out.weight": model.proj_out.weight.detach().float().cpu().clone(),
            "proj_out.bias": model.proj_out.bias.detach().float().cpu().clone()}


def read_embedding(path: str) -> dict:
    """An aligned-embedding file (any layout the pack reads) as the four diffusers-named fp32 tensors."""
    from ...shared.embedding import load_aligned_embedding

    emb = load_aligned_embedding(path)
    return {k: v.float() for k, v in emb.to_diffusers_state_dict().items()}


def save_embedding(path: str, model, metadata: dict | None = None) -> str:
    """Write the model's embedder/head as an aligned-embedding file (diffusers names; the pack loads it)."""
    return write_embedding(path, embedding_state_dict(model), metadata)


def write_embedding(path: str, sd: dict, metadata: dict | None = None) -> str:
    """Write the aligned-embedding tensors ``sd`` after the checks the pack applies when loading them."""
    from safetensors.torch import save_file

    from ...shared.embedding import parse_aligned_embedding

    parse_aligned_embedding(sd, source=path)  # the same checks the pack applies when loading it
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


# --- tokens --------------------------------------------------------------------------------------------------------

def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major (DC-Gen's 1x1 patches)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def patchify2x2(latent: torch.Tensor) -> torch.Tensor:
    """FLUX's packing of a base latent: (B, 16, H, W) -> (B, (H/2)*(W/2), 64), channel order (c, dy, dx)."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise DCGenError(f"base-VAE latent: expected an even height and width for FLUX's 2x2 patches, found {h}x{w}.")
    return latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify2x2(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify2x2` from a (B, 4C, h, w) grid of patches to a (B, C, 2h, 2w) latent."""
    b, c4, h, w = grid.shape
    c = c4 // 4
    return grid.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


class Denoiser:
    """``F(x_t, sigma, context, pooled, guidance)``: the transformer's velocity for a (B, C, h, w) latent, as the
    authors' pipeline calls it (1x1 tokens, ids [0, row, col], timestep = sigma, FLUX guidance embedding)."""

    text_keys = ("context", "pooled")  # the cache entries passed after sigma
    time_shift = staticmethod(shift_for_latent)  # training timesteps: the DC-Gen inference shift of the latent

    def __init__(self, model, runtime=None):
        self.model = model
        self.runtime = runtime
        self.guidance_embeds = bool(model.config.guidance_embeds)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.guidance_embeds and guidance is None:
            guidance = torch.ones(b, device=x.device)
        if not self.guidance_embeds:
            guidance = None
        ctx = self.runtime.autocast_context() if self.runtime is not None else _null()
        with ctx:
            out = self.model(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=sigma, img_ids=image_ids(h, w, x.device),
                             txt_ids=torch.zeros(context.shape[1], 3, device=x.device), guidance=guidance,
                             return_dict=False)[0]
        return unpack(out.float(), h, w)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def teacher_tokens(embedder: nn.Linear, base_latent: torch.Tensor) -> torch.Tensor:
    """The frozen base embedder's tokens on a base-VAE latent as a grid (B, hidden, H/2, W/2)."""
    b, _, h, w = base_latent.shape
    weight = embedder.weight
    tokens = F.linear(patchify2x2(base_latent).to(weight.dtype), weight, embedder.bias)
    return tokens.float().reshape(b, h // 2, w // 2, -1).permute(0, 3, 1, 2)


def grid_ratio(teacher_hw, student_hw) -> int:
    rh, rw = teacher_hw[0] / student_hw[0], teacher_hw[1] / student_hw[1]
    if rh != rw or rh < 1 or rh != math.floor(rh):
        raise DCGenError(f"alignment: expected the base model's token grid {tuple(teacher_hw)} to be an integer "
                         f"multiple of the DC-AE grid {tuple(student_hw)} (same image), found a ratio of {rh}x{rw}.")
    return int(rh)
