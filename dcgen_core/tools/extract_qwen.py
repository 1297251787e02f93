"""``python -m dcgen_core.extract`` for Qwen-Image: the aligned embedding and a LoRA from a full DC-Gen-Qwen-Image-Edit
transformer and its base Qwen-Image-Edit (diffusers ``QwenImageTransformer2DModel`` keys, which are ComfyUI's; file or
folder, the Hub's nested release folder included).

Written under diffusers module names with ComfyUI's ``diffusion_model.`` prefix (core's LoRA reader and the pack's
both read them): the aligned embedding (FULL's ``img_in`` / ``proj_out``, exact); a LoRA of ``W_full - W_base`` for
every linear that differs (the truncated SVD of :mod:`.lowrank`, alpha = the layer's rank: scale 1); every other
tensor that differs (biases, RMSNorm scales) stored whole as ``.diff`` / ``.diff_b``, which ComfyUI applies. Like the
other families (:mod:`.extract_common`), each layer's line and the summary give the achieved error and a lower bound
on the exact SVD's.
"""

from __future__ import annotations

from ..qwen_image.comfy_model import read_qwen_checkpoint
from ..qwen_image.keys import is_qwen_image
from ..shared.checkpoints import load_checkpoint
from ..shared.errors import DCGenError
from ..shared.keys import strip_prefix
from .extract_common import Request, carry_diffusers_pair

EMBEDDING_KEYS = ("img_in.weight", "img_in.bias", "proj_out.weight", "proj_out.bias")


def is_qwen_checkpoint(path: str) -> bool:
    from ..qwen_image.comfy_model import resolve_release_folder

    try:
        return is_qwen_image(strip_prefix(load_checkpoint(resolve_release_folder(path), "transformer").state_dict))
    except DCGenError:
        return False


def extract_qwen(req: Request) -> dict:
    (sd_f, cfg_f), (sd_b, cfg_b) = read_qwen_checkpoint(req.full), read_qwen_checkpoint(req.base)
    if cfg_f.patch_size != 1 or cfg_b.patch_size != 2:
        raise DCGenError(f"FULL {req.full} / BASE {req.base}: expected a DC-Gen-Qwen-Image-Edit (patch 1) and the base "
                         f"Qwen-Image-Edit it was trained from (patch 2), found patch {cfg_f.patch_size} / "
                         f"{cfg_b.patch_size}.")
    return carry_diffusers_pair(req, "Qwen-Image", sd_f, sd_b, EMBEDDING_KEYS, "transformer_blocks.0.attn.to_q.weight",
                                cfg_f.latent_channels)
