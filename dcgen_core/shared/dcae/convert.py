"""Original mit-han-lab (efficientvit) DC-AE key layout -> diffusers ``AutoencoderDC`` layout.

Original keys wrap every block in ``ResidualBlock(main=...)`` and every stage
in ``OpSequential(op_list=[...])``; both wrappers are dropped first. The rest
is a fixed sequence of renames (as in diffusers' ``convert_dcae_to_diffusers.py``)
plus splitting the fused 1x1 ``qkv`` conv into ``to_q/to_k/to_v`` linears and
turning the 1x1 ``proj`` conv into the ``to_out`` linear.
"""

from __future__ import annotations

import re

import torch

# Applied in order to each key once the "main" / "op_list" path components are gone.
_RENAMES: list[tuple[str, str]] = [
    # encoder stem: plain conv, or a pixel-unshuffle DownBlock (conv.conv) when stage 0 is empty
    (r"^encoder\.project_in\.conv\.conv\.", "encoder.conv_in.conv."),
    (r"^encoder\.project_in\.conv\.", "encoder.conv_in."),
    (r"^encoder\.project_out\.0\.conv\.", "encoder.conv_out."),
    (r"^decoder\.project_in\.conv\.", "decoder.conv_in."),
    # decoder head: [norm, act, conv or pixel-shuffle UpBlock]
    (r"^decoder\.project_out\.0\.", "decoder.norm_out."),
    (r"^decoder\.project_out\.2\.conv\.conv\.", "decoder.conv_out.conv."),
    (r"^decoder\.project_out\.2\.conv\.", "decoder.conv_out."),
    (r"^encoder\.stages\.", "encoder.down_blocks."),
    (r"^decoder\.stages\.", "decoder.up_blocks."),
    # EfficientViT block: context_module = LiteMLA, local_module = GLUMBConv
    (r"\.context_module\.aggreg\.(\d+)\.0\.", r".attn.to_qkv_multiscale.\1.proj_in."),
    (r"\.context_module\.aggreg\.(\d+)\.1\.", r".attn.to_qkv_multiscale.\1.proj_out."),
    (r"\.context_module\.proj\.norm\.", ".attn.norm_out."),
    (r"\.context_module\.", ".attn."),
    (r"\.local_module\.inverted_conv\.conv\.", ".conv_out.conv_inverted."),
    (r"\.local_module\.depth_conv\.conv\.", ".conv_out.conv_depth."),
    (r"\.local_module\.point_conv\.conv\.", ".conv_out.conv_point."),
    (r"\.local_module\.point_conv\.norm\.", ".conv_out.norm."),
    # ResBlock
    (r"\.conv1\.conv\.", ".conv1."),
    (r"\.conv2\.conv\.", ".conv2."),
    (r"\.conv2\.norm\.", ".norm."),
    # up/down samplers: ConvLayer or Conv(Pixel(Un)Shuffle|Interpolate) layer, both end as `.conv`
    (r"\.conv\.conv\.", ".conv."),
]
_RENAMES_COMPILED = [(re.compile(p), r) for p, r in _RENAMES]
_WRAPPERS = {"main", "op_list"}


def is_original_layout(state_dict: dict) -> bool:
    return any(k.startswith(("encoder.stages.", "decoder.stages.", "encoder.project_in.", "decoder.project_out."))
               for k in state_dict)


def _rename(key: str) -> str:
    key = ".".join(part for part in key.split(".") if part not in _WRAPPERS)
    for pattern, replacement in _RENAMES_COMPILED:
        key = pattern.sub(replacement, key)
    return key


def convert_original_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state dict in diffusers ``AutoencoderDC`` layout (input is not modified)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _rename(key)
        if new_key.endswith(".attn.qkv.conv.weight"):
            prefix = new_key[: -len("qkv.conv.weight")]
            q, k, v = tensor.chunk(3, dim=0)
            for name, part in (("to_q", q), ("to_k", k), ("to_v", v)):
                out[f"{prefix}{name}.weight"] = part.reshape(part.shape[0], -1)
        elif new_key.endswith(".attn.proj.conv.weight"):
            out[new_key[: -len("proj.conv.weight")] + "to_out.weight"] = tensor.reshape(tensor.shape[0], -1)
        else:
            out[new_key] = tensor
    return out
