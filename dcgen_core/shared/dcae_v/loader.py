"""Loading DC-AE-V weights: the authors' ``.pt`` (``torch.load(weights_only=True)`` only) or a safetensors copy.

The released ``dc-ae-v-f32t4c32-1.0-bf16.pt`` is a dict with ``ema_model_state_dict`` (a dict holding one state
dict) or ``model_state_dict``, as the authors' ``DCAEV.load_model`` reads it. The architecture (widths, depths,
latent channels) is read from the tensors and checked against the released variants.
"""

from __future__ import annotations

import os
import re

import torch

from ..checkpoints import check_tensors_match, load_safetensors, owned
from ..errors import DCGenError
from .config import VARIANTS, DCAEVConfig, variant_for
from .model import DCAEV

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


def read_pt_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an authors' DC-AE-V ``.pt`` file, unpickled with ``weights_only=True`` only."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files of the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects with UnpicklingError; other failures too
        raise DCGenError(
            f"{path}: expected a torch checkpoint of plain tensors (read with torch.load(weights_only=True); full "
            f"unpickling is never used), found a file that cannot be read that way ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Download the file again, or convert it where you "
            f"trust it to safetensors.") from None
    if not isinstance(checkpoint, dict):
        raise DCGenError(f"{path}: expected a dict (model_state_dict / ema_model_state_dict or tensors), found a "
                         f"{type(checkpoint).__name__}.")
    sd = checkpoint
    if "ema_model_state_dict" in checkpoint:
        ema = checkpoint["ema_model_state_dict"]
        sd = ema[next(iter(ema))] if isinstance(ema, dict) and ema and not _is_tensor_dict(ema) else ema
    elif "model_state_dict" in checkpoint:
        sd = checkpoint["model_state_dict"]
    if not isinstance(sd, dict) or not _is_tensor_dict(sd):
        raise DCGenError(f"{path}: expected a state dict of tensors (under ema_model_state_dict or "
                         f"model_state_dict), found keys {sorted(map(str, checkpoint))[:5]}.")
    return sd


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("ae.", "module.", "model.", "vae."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a DC-AE-V file: safetensors, or the authors' ``.pt``."""
    if not os.path.isfile(path):
        raise DCGenError(f"{path}: expected a DC-AE-V weight file (.safetensors or the authors' .pt), found nothing "
                         f"at that path.")
    if path.endswith(PICKLE_EXTENSIONS):
        return _strip_prefix(read_pt_state_dict(path)), {}
    sd, meta = load_safetensors(path)
    return _strip_prefix(sd), meta


def preferred_file(path: str) -> str:
    """A safetensors copy beside an authors' ``.pt`` (same name, from ``python -m dcgen_core.convert``) if any."""
    stem, ext = os.path.splitext(path)
    if ext in PICKLE_EXTENSIONS and os.path.isfile(stem + ".safetensors"):
        return stem + ".safetensors"
    return path


def infer_config(sd: dict, source: str, variant: str = "auto") -> DCAEVConfig:
    """The DC-AE-V architecture of a state dict (widths, depths, latent channels from the tensor shapes)."""
    if "encoder.project_out.conv.weight" not in sd or "decoder.project_in.conv.weight" not in sd:
        image_dcae = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)
        hint = (" That is an image DC-AE (diffusers keys): load it with DC-Gen Load DC-AE." if image_dcae else
                " (e.g. Wan's own VAE has encoder.downsamples.*): pick the DC-AE-V file, dc-ae-v-f32t4c32-1.0-bf16.")
        raise DCGenError(f"{source}: expected DC-AE-V keys (encoder.project_out.conv.weight, decoder.stages.*), "
                         f"found keys like {', '.join(sorted(sd)[:3]) or 'none'}.{hint}")
    pattern = re.compile(r"encoder\.stages\.(\d+)\.op_list\.(\d+)\.main\.conv1\.conv\.weight$")
    blocks: dict[int, dict[int, int]] = {}
    for k, v in sd.items():
        m = pattern.match(k)
        if m:
            blocks.setdefault(int(m[1]), {})[int(m[2])] = v.shape[0]
    n = max(blocks, default=0) + 1
    if n < 3 or any(i not in blocks for i in range(1, n)):
        raise DCGenError(f"{source}: expected DC-AE-V encoder stages 1..N with ResBlocks, found stages "
                         f"{sorted(blocks)}.")
    widths = [blocks[i][min(blocks[i])] for i in range(1, n)]
    widths = (widths[0] // 2, *widths)  # stage 0 is empty in every release; its width is never used
    depths = (0, *(len(blocks[i]) for i in range(1, n)))
    latent = sd["encoder.project_out.conv.weight"].shape[0]
    name = variant_for(latent, widths, depths)
    if variant != "auto":
        want = VARIANTS[variant]
        if (want.latent_channels, want.widths, want.depths) != (latent, widths, depths):
            raise DCGenError(f"{source}: expected the weights of {variant} ({want.latent_channels} latent channels, "
                             f"widths {want.widths[1:]}), found {name} ({latent} latent channels, widths "
                             f"{widths[1:]}, depths {depths[1:]}). Pick variant auto.")
    if name != "custom":
        return VARIANTS[name]
    # a custom f32t4c32 shares the released latent layout: it takes the released scaling
    scaling = VARIANTS["dc-ae-v-f32t4c32"].scaling_factor if (latent, n) == (32, 7) else None
    return DCAEVConfig(variant=f"dc-ae-v-f{2 ** (n - 2)}t4c{latent}-custom", latent_channels=latent,
                       widths=widths, depths=depths, scaling_factor=scaling)


def load_dcae_v(path: str, variant: str = "auto", dtype: torch.dtype = torch.float32) -> DCAEV:
    """A DC-AE-V from its file (the safetensors copy preferred over the ``.pt`` beside it), strict key check."""
    path = preferred_file(path)
    sd, _ = read_state_dict(path)
    cfg = infer_config(sd, path, variant)
    with torch.device("meta"):
        model = DCAEV(cfg)
    check_tensors_match(model.state_dict(), sd, path, f"the {cfg.variant} DC-AE-V")
    model.load_state_dict({k: owned(v, dtype) for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)
