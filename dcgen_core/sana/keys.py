"""SANA state dicts: detection, original NVlabs/Sana -> diffusers keys, architecture from tensor shapes.

The original -> diffusers mapping is the one of diffusers' ``scripts/convert_sana_to_diffusers.py``
(huggingface/diffusers): ``x_embedder.proj`` -> ``patch_embed.proj``; ``y_embedder.y_proj.fc1/fc2`` ->
``caption_projection.linear_1/2``; ``t_embedder.mlp.0/2`` -> ``time_embed.emb.timestep_embedder.linear_1/2``
(SANA-Sprint, which also has ``cfg_embedder.mlp.0/2``: ``time_embed.timestep_embedder`` and
``time_embed.guidance_embedder``); ``t_block.1`` -> ``time_embed.linear``; ``attention_y_norm`` ->
``caption_norm``; per block ``attn.qkv`` (fused, chunked in 3 along dim 0) -> ``attn1.to_q/to_k/to_v``,
``attn.q_norm/k_norm`` -> ``attn1.norm_q/norm_k``, ``attn.proj`` -> ``attn1.to_out.0``,
``cross_attn.q_linear`` -> ``attn2.to_q``, ``cross_attn.kv_linear`` (chunked in 2) -> ``attn2.to_k/to_v``,
``cross_attn.q_norm/k_norm`` -> ``attn2.norm_q/norm_k``, ``cross_attn.proj`` -> ``attn2.to_out.0``,
``mlp.inverted_conv.conv / depth_conv.conv / point_conv.conv`` -> ``ff.conv_inverted / conv_depth /
conv_point``, ``scale_shift_table`` kept; ``final_layer.linear`` -> ``proj_out``,
``final_layer.scale_shift_table`` -> ``scale_shift_table``. The script drops ``y_embedder.y_embedding``
(the learned null caption), ``pos_embed`` (a fixed buffer, recomputed by the model) and ``logvar_linear.*`` (a
training head); so does this module. The script is told the image size, which sets ``sample_size`` and
``interpolation_scale``; here ``original_pos_embed_config`` reads both from the ``pos_embed`` buffer.

What the weights cannot tell -- the head split of the (linear) self-attention and of the
cross-attention, ``norm_eps``, positional-embedding use (except in original files) -- comes from ``config.json``
when given, else from SANA's fixed choices: self-attention heads of 32 channels (NVlabs ``linear_head_dim=32``) and the
cross-attention heads of the released widths (1152: 16 heads, 2240: 20 heads).
"""

from __future__ import annotations

import re

import torch

from ..shared.errors import DCGenError, mismatch
from .model import SanaConfig, SanaTransformer, sincos_pos_embed

WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "module.",
                    "model.")

# NVlabs SanaMS*: self-attention head width (linear_head_dim) and cross-attention heads (num_heads) by width
SELF_ATTENTION_HEAD_DIM = 32
CROSS_ATTENTION_HEADS = {1152: 16, 2240: 20}

# keys of an original checkpoint that diffusers' converter drops
_DROPPED_ORIGINAL = ("y_embedder.y_embedding", "pos_embed", "logvar_linear.weight", "logvar_linear.bias")

_DIFFUSERS_MARKERS = ("patch_embed.proj.weight", "caption_projection.linear_1.weight",
                      "transformer_blocks.0.ff.conv_inverted.weight", "transformer_blocks.0.attn1.to_q.weight")
_ORIGINAL_MARKERS = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight",
                     "blocks.0.mlp.inverted_conv.conv.weight", "blocks.0.attn.qkv.weight")


def unwrap(sd: dict) -> dict:
    """The tensors of a checkpoint: unwraps ``{"state_dict": ...}`` (NVlabs .pth) and shared key prefixes."""
    if not isinstance(sd, dict):
        raise mismatch("SANA checkpoint", "a state dict (name -> tensor)", type(sd).__name__)
    while "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not sd:
        return sd
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def is_diffusers_sana(sd: dict) -> bool:
    try:
        sd = unwrap(sd)
    except DCGenError:
        return False
    return all(k in sd for k in _DIFFUSERS_MARKERS)


def is_original_sana(sd: dict) -> bool:
    try:
        sd = unwrap(sd)
    except DCGenError:
        return False
    return all(k in sd for k in _ORIGINAL_MARKERS)


# --------------------------------------------------------------------------------------
# original (NVlabs/Sana) -> diffusers
# --------------------------------------------------------------------------------------

_TOP_RENAMES = {
    "x_embedder.proj": "patch_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_block.1": "time_embed.linear",
    "attention_y_norm": "caption_norm",
    "final_layer.linear": "proj_out",
}
_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "attn.q_norm": "attn1.norm_q",
    "attn.k_norm": "attn1.norm_k",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
    "mlp.inverted_conv.conv": "ff.conv_inverted",
    "mlp.depth_conv.conv": "ff.conv_depth",
    "mlp.point_conv.conv": "ff.conv_point",
    "norm2": "norm2",  # only with norm_elementwise_affine (no released SANA)
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def original_to_diffusers(sd: dict) -> dict:
    """NVlabs/Sana checkpoint (optionally under ``"state_dict"``) -> diffusers ``SanaTransformer2DModel`` keys.

    Returns a new dict (split tensors are views of the fused ones). Unknown keys raise ``DCGenError``.
    """
    sd = unwrap(sd)
    if not is_original_sana(sd):
        missing = [k for k in _ORIGINAL_MARKERS if k not in sd]
        raise mismatch("SANA checkpoint (original NVlabs layout)", f"the tensors {list(_ORIGINAL_MARKERS)}",
                       f"none of {missing} among {len(sd)} keys" if sd else "an empty state dict",
                       "Is this a SANA transformer checkpoint?")
    sprint = "cfg_embedder.mlp.0.weight" in sd
    t_prefix = "time_embed.timestep_embedder" if sprint else "time_embed.emb.timestep_embedder"
    out: dict = {}
    unknown = []

    def put(key, value):
        if key in out:
            raise DCGenError(f"SANA checkpoint conversion: two original tensors map to '{key}'.")
        out[key] = value

    for key, value in sd.items():
        if key in _DROPPED_ORIGINAL:
            continue
        if key.endswith((".weight", ".bias")):
            module, param = key.rsplit(".", 1)
        else:
            module, param = key, None
        m = _BLOCK_RE.match(key)
        if m:
            n, sub, param = m.groups()
            base = f"transformer_blocks.{n}"
            if sub == "attn.qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), torch.chunk(value, 3, dim=0)):
                    put(f"{base}.attn1.{name}.{param}", part)
            elif sub == "cross_attn.kv_linear":
                for name, part in zip(("to_k", "to_v"), torch.chunk(value, 2, dim=0)):
                    put(f"{base}.attn2.{name}.{param}", part)
            elif sub in _BLOCK_RENAMES:
                put(f"{base}.{_BLOCK_RENAMES[sub]}.{param}", value)
            else:
                unknown.append(key)
        elif re.match(r"^blocks\.\d+\.scale_shift_table$", key):
            put("transformer_blocks." + key[len("blocks."):], value)
        elif key == "final_layer.scale_shift_table":
            put("scale_shift_table", value)
        elif param is not None and module in _TOP_RENAMES:
            put(f"{_TOP_RENAMES[module]}.{param}", value)
        elif param is not None and module in ("t_embedder.mlp.0", "t_embedder.mlp.2"):
            put(f"{t_prefix}.linear_{1 if module.endswith('.0') else 2}.{param}", value)
        elif param is not None and module in ("cfg_embedder.mlp.0", "cfg_embedder.mlp.2"):
            put(f"time_embed.guidance_embedder.linear_{1 if module.endswith('.0') else 2}.{param}", value)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise mismatch("SANA checkpoint (original NVlabs layout)", "only SANA transformer tensors",
                       f"{len(unknown)} unknown: {shown}",
                       "This is not a SANA model this pack can convert (another NVlabs architecture?).")
    return out


# diffusers' converter: interpolation_scale by image size (None: no position embedding)
CONVERTER_INTERPOLATION = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}
# a bf16 buffer rounds its values in [-1, 1] by up to 2^-9; another scale is off by order 1
_POS_EMBED_ATOL = 1e-2
# tokens [:k, :k] of a side x side table with base size side hold the positions arange(k) / scale, i.e. the k x k
# table with base size k: comparing that block tells the scale without building a 4K-sized table
_POS_EMBED_BLOCK = 32


def original_pos_embed_config(sd: dict, config_json: dict | None = None, where: str = "SANA checkpoint") -> dict:
    """``sample_size`` and ``interpolation_scale`` of an original NVlabs/Sana checkpoint, as diffusers' converter
    sets them, read from its ``pos_embed`` buffer and cross-checked with ``config_json`` when given.

    NVlabs models register ``pos_embed`` (1, side^2, hidden) for their training grid (side = image size / 32 /
    patch): all zeros when trained without a position embedding (512 px, 1K), else the sin-cos table of base size
    side and their ``pe_interpolation`` (2K: 1.0, 4K: 2.0). The converter sets ``sample_size`` = side * patch and
    ``interpolation_scale`` by image size (``CONVERTER_INTERPOLATION``). Raises ``DCGenError`` naming ``where`` when
    the buffer and config.json disagree, or when neither tells.
    """
    sd = unwrap(sd)
    cfg = dict(config_json or {})
    given = "interpolation_scale" in cfg
    proj = sd.get("x_embedder.proj.weight")
    if proj is None or proj.ndim != 4:
        raise mismatch(f"{where} tensor 'x_embedder.proj.weight'", "a conv weight [hidden, C, p, p]",
                       "none" if proj is None else f"shape {tuple(proj.shape)}")
    hidden, patch = int(proj.shape[0]), int(proj.shape[-1])
    pe = sd.get("pos_embed")
    if pe is None:
        if given:
            return {}
        raise mismatch(f"{where} tensor 'pos_embed'", "the position-embedding buffer of an original NVlabs/Sana "
                       "checkpoint (all zeros at 512 px / 1K, a sin-cos table at 2K / 4K)", "none",
                       "Without it the resolution the model was trained for, and so its interpolation_scale, is "
                       "unknown: put the transformer's diffusers config.json (interpolation_scale, sample_size) "
                       "beside the file.")
    side = round(pe.shape[1] ** 0.5) if pe.ndim == 3 else 0
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != hidden or side * side != pe.shape[1]:
        raise mismatch(f"{where} tensor 'pos_embed'", f"shape (1, side * side, {hidden}) (a square token grid of "
                       "the model's width)", f"shape {tuple(pe.shape)}")
    table = pe[0]
    sample_size, image_size = side * patch, side * patch * 32
    if not table.any():
        scale, source = None, "all zeros (trained without a position embedding)"
    else:
        scale = cfg["interpolation_scale"] if given else CONVERTER_INTERPOLATION.get(image_size)
        told = "config.json" if given else f"diffusers' converter at {image_size} px"
        if scale is None:
            raise mismatch(f"{where} tensor 'pos_embed'", f"all zeros (interpolation_scale None, {told})",
                           f"a sin-cos table (it reads as interpolation_scale {_read_scale(table, hidden):.3g})",
                           "Put the transformer's config.json with its interpolation_scale beside the file.")
        k = min(side, _POS_EMBED_BLOCK)
        expected = sincos_pos_embed(hidden, (k, k), k, float(scale))
        block = table.reshape(side, side, hidden)[:k, :k].reshape(k * k, hidden).float()
        off = (block - expected).abs().max().item()
        if off > _POS_EMBED_ATOL:
            raise mismatch(f"{where} tensor 'pos_embed'", f"the sin-cos table of interpolation_scale {scale} ({told})",
                           f"a table {off:.3g} off it (it reads as interpolation_scale "
                           f"{_read_scale(table, hidden):.3g})",
                           "Put the transformer's config.json with the interpolation_scale it was trained with "
                           "beside the file.")
        source = f"a sin-cos table of interpolation_scale {scale}"
    if given and (cfg["interpolation_scale"] is None) != (scale is None):
        raise mismatch(f"{where} config.json interpolation_scale", f"{cfg['interpolation_scale']!r} (config.json)",
                       f"pos_embed {source} in the weights", "The config.json belongs to another model.")
    if cfg.get("sample_size") is not None and int(cfg["sample_size"]) != sample_size:
        raise mismatch(f"{where} config.json sample_size", f"{cfg['sample_size']!r} (config.json)",
                       f"{sample_size} in the weights (pos_embed of {side} x {side} tokens, patch {patch})",
                       "The config.json belongs to another model.")
    return {"sample_size": sample_size, "interpolation_scale": scale}


def _read_scale(table: torch.Tensor, hidden: int) -> float:
    """The scale a sin-cos table was built with, read from token 1 (position 1 / scale at frequency 1): for
    messages only."""
    pos = torch.atan2(table[1, 0].float(), table[1, hidden // 4].float()).item()
    return 1.0 / pos if pos > 0 else float("nan")


# --------------------------------------------------------------------------------------
# architecture from shapes
# --------------------------------------------------------------------------------------

def _count_blocks(sd: dict) -> int:
    idx = set()
    for k in sd:
        m = re.match(r"^transformer_blocks\.(\d+)\.", k)
        if m:
            idx.add(int(m.group(1)))
    if not idx:
        return 0
    n = max(idx) + 1
    if len(idx) != n:
        missing = sorted(set(range(n)) - idx)
        raise mismatch("SANA state dict transformer_blocks", f"blocks 0..{n - 1}", f"missing block(s) {missing[:8]}")
    return n


def _mlp_ratio(dim: int, hidden: int) -> float:
    for digits in (1, 2, 3, 4, 6, 10):
        r = round(hidden / dim, digits)
        if int(r * dim) == hidden:
            return r
    raise mismatch("SANA state dict ff.conv_inverted", f"a width expressible as int(ratio * {dim})", hidden)


def expected_shapes(config: SanaConfig) -> dict:
    """name -> shape of every tensor of a model of this config (built on the meta device)."""
    with torch.device("meta"):
        model = SanaTransformer(config, device="meta", operations=_TorchOps)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class _TorchOps:
    Linear = torch.nn.Linear
    Conv2d = torch.nn.Conv2d
    LayerNorm = torch.nn.LayerNorm
    RMSNorm = None  # model's own RMSNorm: same parameter names and shapes


def check_state_dict(sd: dict, config: SanaConfig, where: str = "SANA state dict") -> None:
    """Raise DCGenError naming expected vs found for missing, unexpected or wrongly shaped tensors."""
    want = expected_shapes(config)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [(k, want[k], tuple(sd[k].shape)) for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if wrong:
        k, exp, found = wrong[0]
        more = f" (and {len(wrong) - 1} more wrongly shaped tensors)" if len(wrong) > 1 else ""
        raise mismatch(f"{where} tensor '{k}'", f"shape {exp}", f"shape {found}{more}",
                       "The file does not match the SANA architecture read from it / its config.json.")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}" + (f" (+{len(missing) - 6})" if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}" + (f" (+{len(unexpected) - 6})" if len(unexpected) > 6 else ""))
        raise mismatch(where, f"the {len(want)} tensors of a SANA transformer", "; ".join(parts))


def sana_config_from_state_dict(sd_diffusers: dict, config_json: dict | None = None) -> SanaConfig:
    """Read the SANA architecture from a diffusers-layout state dict (cross-checked with ``config_json``)."""
    sd = unwrap(sd_diffusers)
    where = "SANA state dict"
    if not is_diffusers_sana(sd):
        if is_original_sana(sd):
            raise DCGenError(f"{where}: this is an original NVlabs/Sana checkpoint; convert it with "
                             "original_to_diffusers() first.")
        missing = [k for k in _DIFFUSERS_MARKERS if k not in sd]
        raise mismatch(where, f"the tensors {list(_DIFFUSERS_MARKERS)} (diffusers SanaTransformer2DModel)",
                       f"no {missing} among {len(sd)} keys" if sd else "an empty state dict",
                       "Is this a SANA transformer?")
    cfg_json = dict(config_json or {})
    if cfg_json:
        cls_name = cfg_json.get("_class_name")
        if cls_name is not None and cls_name != "SanaTransformer2DModel":
            raise mismatch(f"{where} config.json _class_name", "'SanaTransformer2DModel'", repr(cls_name))

    def need(key, ndim):
        t = sd.get(key)
        if t is None:
            raise mismatch(where, f"the tensor '{key}'", "none", "Is this a complete SANA transformer?")
        if t.ndim != ndim:
            raise mismatch(f"{where} tensor '{key}'", f"{ndim} dimensions", f"shape {tuple(t.shape)}")
        return t

    pe = need("patch_embed.proj.weight", 4)
    hidden, in_channels, p, p2 = (int(s) for s in pe.shape)
    if p != p2:
        raise mismatch(f"{where} tensor 'patch_embed.proj.weight'", "a square patch kernel", f"{p}x{p2}")
    proj_out = need("proj_out.weight", 2)
    if proj_out.shape[0] % (p * p):
        raise mismatch(f"{where} tensor 'proj_out.weight'", f"rows divisible by patch area {p * p}",
                       tuple(proj_out.shape))
    out_channels = int(proj_out.shape[0]) // (p * p)
    caption_channels = int(need("caption_projection.linear_1.weight", 2).shape[1])
    depth = _count_blocks(sd)
    inner = int(need("transformer_blocks.0.attn1.to_q.weight", 2).shape[0])
    if inner != hidden:
        raise mismatch(f"{where} tensor 'transformer_blocks.0.attn1.to_q.weight'",
                       f"{hidden} rows (the width of patch_embed)", f"{inner}")
    cross_inner, cross_dim = (int(s) for s in need("transformer_blocks.0.attn2.to_k.weight", 2).shape)
    mlp_hidden = int(need("transformer_blocks.0.ff.conv_inverted.weight", 4).shape[0]) // 2
    nq = sd.get("transformer_blocks.0.attn1.norm_q.weight")
    if nq is None:
        qk_norm = None
    elif tuple(nq.shape) == (hidden,):
        qk_norm = "rms_norm_across_heads"
    else:
        raise mismatch(f"{where} tensor 'transformer_blocks.0.attn1.norm_q.weight'",
                       f"shape ({hidden},) (rms_norm_across_heads, SANA-1.5)", f"shape {tuple(nq.shape)}")

    # head splits: config.json, else SANA's fixed choices
    if cfg_json.get("attention_head_dim") is not None:
        head_dim = int(cfg_json["attention_head_dim"])
    else:
        head_dim = SELF_ATTENTION_HEAD_DIM
    if hidden % head_dim:
        raise mismatch(f"{where} self-attention width {hidden}", f"a multiple of the head dim {head_dim}", hidden,
                       "Provide the transformer's config.json (attention_head_dim).")
    if cfg_json.get("num_cross_attention_heads") is not None:
        cross_heads = int(cfg_json["num_cross_attention_heads"])
    elif cfg_json.get("cross_attention_head_dim") is not None:
        cross_heads = cross_inner // max(int(cfg_json["cross_attention_head_dim"]), 1)
    elif cross_inner in CROSS_ATTENTION_HEADS:
        cross_heads = CROSS_ATTENTION_HEADS[cross_inner]
    else:
        raise mismatch(f"{where} cross-attention width {cross_inner}",
                       f"a released SANA width {sorted(CROSS_ATTENTION_HEADS)} or a config.json",
                       "neither", "The number of cross-attention heads is not stored in the weights; "
                       "provide the transformer's config.json.")
    if cross_heads <= 0 or cross_inner % cross_heads:
        raise mismatch(f"{where} cross-attention width {cross_inner}", f"divisible by {cross_heads} heads",
                       cross_inner)

    inferred = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": depth,
        "num_cross_attention_heads": cross_heads,
        "cross_attention_head_dim": cross_inner // cross_heads,
        "cross_attention_dim": cross_dim,
        "caption_channels": caption_channels,
        "mlp_ratio": _mlp_ratio(hidden, mlp_hidden),
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in sd,
        "patch_size": p,
        "norm_elementwise_affine": "transformer_blocks.0.norm2.weight" in sd,
        "guidance_embeds": "time_embed.guidance_embedder.linear_1.weight" in sd,
        "qk_norm": qk_norm,
    }
    # cross-check the config.json against the weights
    for key, value in inferred.items():
        if key not in cfg_json:
            continue
        given = cfg_json[key]
        if key == "out_channels" and given is None:
            given = cfg_json.get("in_channels", in_channels)
        if key == "mlp_ratio":
            ok = given is not None and int(float(given) * hidden) == mlp_hidden
        elif isinstance(value, bool):
            ok = bool(given) == value
        else:
            ok = given == value
        if not ok:
            raise mismatch(f"{where} vs config.json {key}", f"{given!r} (config.json)", f"{value!r} in the weights",
                           "The config.json belongs to another model.")
    kw = {}
    for key in ("sample_size", "norm_eps", "interpolation_scale", "guidance_embeds_scale", "timestep_scale"):
        if key in cfg_json:
            kw[key] = cfg_json[key]
    if "mlp_ratio" in cfg_json:
        inferred["mlp_ratio"] = float(cfg_json["mlp_ratio"])
    config = SanaConfig(**inferred, **kw)
    check_state_dict(sd, config, where)
    return config
