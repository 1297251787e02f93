"""nunchaku's FLUX layout: each quantized module of a nunchaku FLUX file and the diffusers FluxTransformer2DModel
linear(s) it holds (a family whose nunchaku files use another layout adds its table beside this one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NunchakuModule:
    """A quantized module of nunchaku's FLUX layout and the diffusers ``FluxTransformer2DModel`` linear(s) it holds.

    ``fuse``: "one" (same linear), "rows" (diffusers outputs concatenated in the order given, e.g. q; k; v),
    "in_slice" (a slice of the diffusers linear's input columns: ``in_slice`` = (start, stop) in units of the
    inner dim ``D = heads * head_dim``; the diffusers output is the SUM of the slices' outputs).
    ``quant``: "svdq" (W4A4, :class:`SVDQuantWeight`) or "awq" (W4A16 AdaLN, :class:`AWQW4A16Weight`)."""

    block: str
    name: str
    diffusers: tuple[str, ...]
    fuse: str = "one"
    quant: str = "svdq"
    in_slice: tuple[int, int] | None = None
    shifted_input_int4: bool = False
    adanorm_splits: int = 1
    note: str = ""


# Sources: nunchaku/lora/flux/nunchaku_converter.py (local_name_map of convert_to_nunchaku_flux_transformer_block_
# lowrank_dict / ..._single_transformer_block_lowrank_dict, fuse_vectors name_map), nunchaku/models/transformers/
# transformer_flux_v2.py (convert_flux_state_dict, NunchakuFluxSingleTransformerBlock), src/FluxModel.cpp
# (JointTransformerBlock / FluxSingleTransformerBlock children), deepcompressor/backend/nunchaku/convert.py
# (convert_to_nunchaku_flux_*_block_state_dict), deepcompressor/app/diffusion/nn/patch.py + nn/patch/linear.py
# (single-block proj_out -> ConcatLinear([D, mlp]) with the bias on the LAST sub-linear).
_DB, _SB = "transformer_blocks", "single_transformer_blocks"
NUNCHAKU_FLUX_MODULES: dict[tuple[str, str], NunchakuModule] = {(m.block, m.name): m for m in (
    # ---- double (joint) blocks: image stream and its context ("_context") twin ----
    NunchakuModule(_DB, "norm1.linear", ("norm1.linear",), quant="awq", adanorm_splits=6,
                   note="AdaLayerNormZero 6*D outputs, rows interleaved, +1 on scale_msa/scale_mlp bias"),
    NunchakuModule(_DB, "norm1_context.linear", ("norm1_context.linear",), quant="awq", adanorm_splits=6,
                   note="context twin of norm1.linear"),
    NunchakuModule(_DB, "qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), fuse="rows",
                   note="V rows carry 1/smooth_orig of out_proj (smoothing fused), biases concatenated"),
    NunchakuModule(_DB, "qkv_proj_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                   fuse="rows", note="context twin of qkv_proj"),
    NunchakuModule(_DB, "out_proj", ("attn.to_out.0",), note="smooth stored as ones (fused into V)"),
    NunchakuModule(_DB, "out_proj_context", ("attn.to_add_out",), note="context twin; same fused smoothing"),
    NunchakuModule(_DB, "mlp_fc1", ("ff.net.0.proj",), note="GELU(tanh) follows, fused with mlp_fc2"),
    NunchakuModule(_DB, "mlp_fc2", ("ff.net.2",), shifted_input_int4=True,
                   note="int4: input is GELU + 0.171875 (unsigned), bias lowered accordingly"),
    NunchakuModule(_DB, "mlp_context_fc1", ("ff_context.net.0.proj",), note="context twin of mlp_fc1"),
    NunchakuModule(_DB, "mlp_context_fc2", ("ff_context.net.2",), shifted_input_int4=True,
                   note="context twin of mlp_fc2"),
    # ---- single blocks: proj_out [D, D + 4D] is split by input columns into out_proj + mlp_fc2, outputs summed ----
    NunchakuModule(_SB, "norm.linear", ("norm.linear",), quant="awq", adanorm_splits=3,
                   note="AdaLayerNormZeroSingle 3*D outputs, rows interleaved, +1 on scale bias"),
    NunchakuModule(_SB, "qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), fuse="rows",
                   note="shares its input (and smooth) with mlp_fc1"),
    NunchakuModule(_SB, "mlp_fc1", ("proj_mlp",), note="GELU(tanh) follows, fused with mlp_fc2"),
    NunchakuModule(_SB, "out_proj", ("proj_out",), fuse="in_slice", in_slice=(0, 1),
                   note="proj_out[:, :D] on the attention output; smooth fused into V. fuse_vectors puts LoRA bias "
                        "deltas of proj_out here"),
    NunchakuModule(_SB, "mlp_fc2", ("proj_out",), fuse="in_slice", in_slice=(1, 5), shifted_input_int4=True,
                   note="proj_out[:, D:] on the MLP hidden; deepcompressor's ConcatLinear stores proj_out.bias here. "
                        "diffusers proj_out.bias = out_proj bias + mlp_fc2 bias (effective)"),
)}

#: plain (bf16) tensors inside nunchaku blocks -> diffusers names (same parameter name after the module path).
NUNCHAKU_FLUX_PLAIN_KEYS = {
    (_DB, "norm_q"): "attn.norm_q", (_DB, "norm_k"): "attn.norm_k",
    (_DB, "norm_added_q"): "attn.norm_added_q", (_DB, "norm_added_k"): "attn.norm_added_k",
    (_SB, "norm_q"): "attn.norm_q", (_SB, "norm_k"): "attn.norm_k",
}


def flux_module_info(path: str) -> NunchakuModule | None:
    """The table entry for a nunchaku module path such as ``transformer_blocks.3.qkv_proj_context``."""
    parts = path.split(".")
    if len(parts) < 3 or parts[0] not in (_DB, _SB) or not parts[1].isdigit():
        return None
    return NUNCHAKU_FLUX_MODULES.get((parts[0], ".".join(parts[2:])))
