"""``python -m dcgen_core.extract`` for SANA: the aligned embedding and a LoRA from a full DC-Gen-SANA transformer and
its base SANA (diffusers ``SanaTransformer2DModel`` keys or original NVlabs/Sana keys, file or diffusers folder).

Written, all under diffusers module names (SANA's parameters in ComfyUI carry them), with ComfyUI's
``diffusion_model.`` prefix, which both core's LoRA loader (it knows no SANA naming of its own) and the pack's read:

* the aligned embedding: FULL's ``patch_embed.proj`` (a 1x1 conv [hidden, C, 1, 1]) and ``proj_out``, exact;
* a LoRA of ``W_full - W_base`` for every linear and 1x1 conv that differs (``diffusion_model.<module>.lora_A/B.weight``,
  the truncated SVD of :mod:`.lowrank`, alpha = the layer's rank: scale 1); every other tensor that differs (the
  depthwise 3x3 conv, biases, norms, time and caption embedders) stored whole as ``diffusion_model.<key>.diff`` /
  ``.diff_b``, which ComfyUI's core LoRA reader applies (v0.3.64 and v0.33) and so does the pack's. A changed
  ``scale_shift_table`` cannot be carried (ComfyUI patches leaf modules' parameters only): it is left out, named,
  and counted in the printed error (LoRA post-training never changes it).
"""

from __future__ import annotations

from ..shared.checkpoints import load_checkpoint
from ..shared.errors import DCGenError
from ..sana.comfy_model import read_sana_checkpoint
from ..sana.keys import is_diffusers_sana, is_original_sana, unwrap
from .extract_common import Request, carry_diffusers_pair

#: Parameters of SANA modules that have children (the blocks' and the model's ``scale_shift_table``): ComfyUI's
#: model patcher applies weight patches to leaf modules only, so a ``.diff`` for them would be silently ignored.
UNPATCHABLE = ("scale_shift_table",)
EMBEDDING_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "proj_out.weight", "proj_out.bias")


def is_sana_checkpoint(path: str) -> bool:
    try:
        sd = unwrap(load_checkpoint(path, component="transformer").state_dict)
    except DCGenError:
        return False
    return is_diffusers_sana(sd) or is_original_sana(sd)


def extract_sana(req: Request) -> dict:
    sd_f, _ = read_sana_checkpoint(req.full)
    sd_b, _ = read_sana_checkpoint(req.base)
    c_b = int(sd_b["patch_embed.proj.weight"].shape[1])
    c_f = int(sd_f["patch_embed.proj.weight"].shape[1])
    if c_f == c_b:
        raise DCGenError(f"FULL {req.full}: expected a DC-Gen-SANA transformer (an embedder for another DC-AE than "
                         f"BASE's), found the same {c_f}-channel embedder as BASE {req.base}: nothing to extract.")
    return carry_diffusers_pair(req, "SANA", sd_f, sd_b, EMBEDDING_KEYS, "transformer_blocks.0.attn1.to_q.weight", c_f,
                                patchable=lambda key: key.rpartition(".")[2] not in UNPATCHABLE)
