"""FLUX state-dict key layouts: diffusers <-> BFL/ComfyUI.

Torch only (no ComfyUI import). Two layouts exist for the same FLUX weights:

* diffusers ``FluxTransformer2DModel`` (``x_embedder``, ``transformer_blocks.N.attn.to_q`` ...)
  with separate q/k/v projections, and
* BFL / ComfyUI ``Flux`` (``img_in``, ``double_blocks.N.img_attn.qkv`` ...) with fused
  ``qkv`` (double blocks) and ``linear1 = [q; k; v; mlp_in]`` (single blocks).

The DC-Gen releases are diffusers folders; ComfyUI runs the BFL layout. Conversion
passes every unfused tensor through as the same object (the loader memory-maps the
file), and only concatenates where BFL fuses (plus the scale/shift swap of the final
adaLN modulation).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from ..shared.errors import DCGenError, mismatch
from ..shared.keys import strip_key_prefix, strip_prefix, swap_scale_shift  # noqa: F401 (re-exported)


# Top-level modules, diffusers -> BFL.
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # rows swapped, see swap_scale_shift
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}

#: diffusers modules whose BFL weight holds the two halves in the other order.
SCALE_SHIFT_SWAPPED_MODULES = frozenset({"norm_out.linear"})

# Double (joint) blocks: transformer_blocks.N.<k> -> double_blocks.N.<v>
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
# RMS norms: the diffusers parameter "weight" is the BFL parameter "scale".
_DOUBLE_NORM = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
# Fused: diffusers module -> (BFL module, part index)
_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}

# Single blocks: single_transformer_blocks.N.<k> -> single_blocks.N.<v>
_SINGLE = {
    "norm.linear": "modulation.lin",
    "proj_out": "linear2",
}
_SINGLE_NORM = {
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_SINGLE_FUSED = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
}

_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Target:
    module: str  # BFL module path ("double_blocks.0.img_attn.qkv")
    part: int | None = None  # index in the fused weight, None when not fused
    single: bool = False  # fused into a single-block linear1 (4 parts) vs qkv (3 parts)
    swap: bool = False  # scale/shift halves swapped
    norm: bool = False  # RMSNorm: parameter "weight" becomes "scale"


def _resolve_module(module: str) -> _Target | None:
    """BFL target of a diffusers module path, or None when the path is not FLUX."""
    if module in _TOP:
        return _Target(_TOP[module], swap=module in SCALE_SHIFT_SWAPPED_MODULES)
    m = _BLOCK_RE.match(module)
    if not m:
        return None
    kind, idx, rest = m.groups()
    if kind == "transformer_blocks":
        pre = f"double_blocks.{idx}."
        if rest in _DOUBLE:
            return _Target(pre + _DOUBLE[rest])
        if rest in _DOUBLE_NORM:
            return _Target(pre + _DOUBLE_NORM[rest], norm=True)
        if rest in _DOUBLE_FUSED:
            tgt, part = _DOUBLE_FUSED[rest]
            return _Target(pre + tgt, part=part)
        return None
    pre = f"single_blocks.{idx}."
    if rest in _SINGLE:
        return _Target(pre + _SINGLE[rest])
    if rest in _SINGLE_NORM:
        return _Target(pre + _SINGLE_NORM[rest], norm=True)
    if rest in _SINGLE_FUSED:
        tgt, part = _SINGLE_FUSED[rest]
        return _Target(pre + tgt, part=part, single=True)
    return None


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _bfl_param(target: _Target, param: str) -> str:
    if target.norm:
        if param != "weight":
            raise DCGenError(f"{target.module}: expected an RMSNorm 'weight', found '{param}'.")
        return target.module + ".scale"
    return f"{target.module}.{param}"


def is_diffusers_flux(sd: dict) -> bool:
    """True for a diffusers ``FluxTransformer2DModel`` state dict (any wrapper prefix)."""
    keys = strip_prefix(sd).keys() if sd else ()
    if not {"x_embedder.weight", "context_embedder.weight",
            "time_text_embed.timestep_embedder.linear_1.weight"} <= set(keys):
        return False
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) and
               (".attn.add_q_proj." in k or ".proj_mlp." in k) for k in keys)


def is_bfl_flux(sd: dict) -> bool:
    """True for a BFL / ComfyUI ``Flux`` state dict (any wrapper prefix)."""
    keys = set(strip_prefix(sd).keys()) if sd else set()
    if not {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight"} <= keys:
        return False
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys)


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


class FusedTensor:
    """A BFL weight made of diffusers rows (fused q/k/v(/mlp), or swapped scale/shift halves), not yet built:
    ``shape``/``dtype`` without a copy, the tensor when called, or built straight into another dtype by
    ``into`` (each part copied into its rows: no full-size intermediate in the file's dtype). Loaders build
    one at a time while they fill the model (see checkpoints.owned)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = torch.Size([sum(p.shape[0] for p in parts), *parts[0].shape[1:]])
        self.dtype = parts[0].dtype

    def numel(self) -> int:
        return self.shape.numel()

    def into(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.parts[0].device)
        row = 0
        for p in self.parts:
            out[row:row + p.shape[0]].copy_(p)
            row += p.shape[0]
        return out

    def __call__(self) -> torch.Tensor:
        return self.into()


def diffusers_to_bfl(sd: dict, strict: bool = True, lazy: bool = False) -> dict:
    """Convert a diffusers ``FluxTransformer2DModel`` state dict to the BFL/ComfyUI layout.

    Wrapper prefixes are stripped first. Unfused tensors are passed through as the same
    objects; fused ones (``img_attn.qkv``, ``txt_attn.qkv``, single ``linear1``) are
    concatenated along dim 0 in the order q, k, v(, mlp), or with ``lazy`` left as
    :class:`FusedTensor` for the loader. With ``strict`` (default) a key
    that is not part of FLUX raises DCGenError; otherwise it is passed through unchanged.
    """
    sd = strip_prefix(sd)
    out: dict = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    fused_parts: dict[str, int] = {}
    unknown = []
    for key, t in sd.items():
        module, param = _split_param(key)
        target = _resolve_module(module)
        if target is None:
            unknown.append(key)
            continue
        bkey = _bfl_param(target, param)
        if target.part is not None:
            fused.setdefault(bkey, {})[target.part] = t
            fused_parts[bkey] = 4 if target.single else 3
        elif target.swap:
            halves = FusedTensor(list(t.chunk(2, dim=0))[::-1])  # = swap_scale_shift(t)
            out[bkey] = halves if lazy else halves()
        else:
            out[bkey] = t
    if unknown:
        if strict:
            shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            raise DCGenError(
                f"diffusers FLUX state dict: expected only FluxTransformer2DModel keys, found "
                f"{len(unknown)} unknown: {shown}."
            )
        for key in unknown:
            out[key] = sd[key]
    names = {3: "to_q, to_k, to_v", 4: "to_q, to_k, to_v, proj_mlp"}
    for bkey, parts in fused.items():
        n = fused_parts[bkey]
        if sorted(parts) != list(range(n)):
            raise mismatch(f"diffusers FLUX state dict ({bkey})",
                           f"all {n} parts ({names[n]})", f"parts {sorted(parts)}",
                           "The checkpoint is incomplete.")
        fused_tensor = FusedTensor([parts[i] for i in range(n)])
        out[bkey] = fused_tensor if lazy else fused_tensor()
    return out


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass
class FluxConfig:
    hidden_size: int
    num_heads: int
    head_dim: int
    depth: int
    depth_single_blocks: int
    context_in_dim: int
    vec_in_dim: int
    img_in_features: int
    out_features: int
    guidance_embed: bool
    axes_dim: list = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    @property
    def mlp_hidden_dim(self) -> int:
        """int(hidden_size * mlp_ratio), exactly as ComfyUI's blocks compute it."""
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    def comfy_flux_kwargs(self, patch_size: int = 2) -> dict:
        """Keyword arguments for ``comfy.ldm.flux.model.Flux`` (minus image_model/dtype/operations).

        ComfyUI's Flux takes ``in_channels`` per pixel and multiplies by patch_size**2;
        a 1x1-patch DC-Gen model with C channels runs as patch_size=2, in_channels=C/4
        on a pixel-shuffled latent.
        """
        p2 = patch_size * patch_size
        for what, n in (("img_in features", self.img_in_features), ("output features", self.out_features)):
            if n % p2:
                raise mismatch(f"FLUX {what}", f"a multiple of patch_size^2 = {p2}", n)
        return dict(
            in_channels=self.img_in_features // p2,
            out_channels=self.out_features // p2,
            vec_in_dim=self.vec_in_dim,
            context_in_dim=self.context_in_dim,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single_blocks=self.depth_single_blocks,
            axes_dim=list(self.axes_dim),
            theta=self.theta,
            patch_size=patch_size,
            qkv_bias=self.qkv_bias,
            guidance_embed=self.guidance_embed,
        )


def _count_blocks(keys, prefix: str) -> int:
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    if idx and idx != set(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise mismatch(f"FLUX state dict ({prefix}N)", f"consecutive block indices 0..{max(idx)}",
                       f"missing {missing}", "The checkpoint is incomplete.")
    return len(idx)


def _mlp_ratio(hidden: int, mlp_hidden: int) -> float:
    ratio = mlp_hidden / hidden
    if int(hidden * ratio) != mlp_hidden:  # float rounding; nudge so ComfyUI's int() matches
        ratio = (mlp_hidden + 0.5) / hidden
    return ratio


def flux_config_from_state_dict(sd_bfl: dict, config_json: dict | None = None) -> FluxConfig:
    """Read the FLUX architecture from a BFL/ComfyUI state dict.

    ``config_json`` is the diffusers ``config.json`` of the transformer when available; it
    supplies ``axes_dims_rope`` (not recoverable from the weights) and is cross-checked.
    """
    sd = strip_prefix(sd_bfl)
    where = "FLUX state dict"

    def need(key):
        if key not in sd:
            raise mismatch(where, f"the tensor '{key}'", "none",
                           "Is this a FLUX transformer in BFL/ComfyUI layout?")
        return sd[key]

    def need_norm(module):  # BFL files and v0.3.64 name RMSNorm parameters ".scale", ComfyUI v0.33 ".weight"
        return sd[f"{module}.weight"] if f"{module}.weight" in sd else need(f"{module}.scale")

    img_in = need("img_in.weight")
    hidden = int(img_in.shape[0])
    depth = _count_blocks(sd, "double_blocks.")
    depth_single = _count_blocks(sd, "single_blocks.")
    if depth:
        head_dim = int(need_norm("double_blocks.0.img_attn.norm.query_norm").shape[0])
        mlp_hidden = int(need("double_blocks.0.img_mlp.0.weight").shape[0])
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in sd
    elif depth_single:
        head_dim = int(need_norm("single_blocks.0.norm.query_norm").shape[0])
        mlp_hidden = int(need("single_blocks.0.linear1.weight").shape[0]) - 3 * hidden
        qkv_bias = True
    else:
        raise mismatch(where, "double_blocks.N / single_blocks.N tensors", "no transformer blocks")
    if head_dim <= 0 or hidden % head_dim:
        raise mismatch(where, f"a head dim dividing the hidden size {hidden}", head_dim)
    num_heads = hidden // head_dim
    cfg = config_json or {}

    if cfg.get("axes_dims_rope") is not None:
        axes_dim = [int(a) for a in cfg["axes_dims_rope"]]
    elif head_dim == 128:
        axes_dim = [16, 56, 56]
    else:
        raise mismatch(where, "head dim 128 (FLUX) to infer the RoPE axes", f"head dim {head_dim}",
                       "Provide the transformer's config.json (axes_dims_rope).")
    if sum(axes_dim) != head_dim:
        raise mismatch(f"{where} config.json axes_dims_rope {axes_dim}",
                       f"dims summing to the head dim {head_dim}", sum(axes_dim))
    for cfg_key, value in (("num_attention_heads", num_heads), ("attention_head_dim", head_dim),
                           ("num_layers", depth), ("num_single_layers", depth_single)):
        if cfg.get(cfg_key) is not None and int(cfg[cfg_key]) != value:
            raise mismatch(f"{where} vs config.json {cfg_key}", cfg[cfg_key], f"{value} in the weights",
                           "The config.json belongs to another model.")

    return FluxConfig(
        hidden_size=hidden,
        num_heads=num_heads,
        head_dim=head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        context_in_dim=int(need("txt_in.weight").shape[1]),
        vec_in_dim=int(need("vector_in.in_layer.weight").shape[1]),
        img_in_features=int(img_in.shape[1]),
        out_features=int(need("final_layer.linear.weight").shape[0]),
        guidance_embed="guidance_in.in_layer.weight" in sd,
        axes_dim=axes_dim,
        theta=10000,
        mlp_ratio=_mlp_ratio(hidden, mlp_hidden),
        qkv_bias=qkv_bias,
    )


# --------------------------------------------------------------------------------------
# Module-level mapping (LoRA)
# --------------------------------------------------------------------------------------


def fused_part_sizes(target_module: str, hidden_size: int, mlp_hidden_dim: int) -> list[int]:
    """Row sizes of the parts of a fused BFL weight (qkv: 3 x hidden; linear1: 3 x hidden + mlp)."""
    if target_module.endswith(".linear1"):
        return [hidden_size] * 3 + [mlp_hidden_dim]
    return [hidden_size] * 3


def diffusers_flux_module_to_bfl(
    name: str,
    hidden_size: int | None = None,
    mlp_hidden_dim: int | None = None,
    *,
    config: FluxConfig | None = None,
) -> tuple[str, tuple[int, int, int] | None]:
    """Map a diffusers FLUX module path to ``(bfl_key, offset)``.

    ``name`` is a module path such as ``transformer_blocks.3.attn.to_k`` (wrapper
    prefixes are removed). It may also end in ``.weight`` / ``.bias``; the BFL key is
    for that parameter (``.weight`` when none is given). ``offset`` is ``None`` for an
    unfused weight, else ``(0, start, length)``: the rows of the fused BFL weight
    holding this module (the ComfyUI LoRA ``narrow`` convention).

    ``hidden_size`` (and ``mlp_hidden_dim`` for ``proj_mlp``; default 4 x hidden, the
    FLUX ratio) or ``config`` are needed for fused modules. For ``norm_out.linear``
    (see ``SCALE_SHIFT_SWAPPED_MODULES``) a delta must go through ``swap_scale_shift``.
    Raises DCGenError for a path that is not a FLUX module.
    """
    if config is not None:
        hidden_size = config.hidden_size if hidden_size is None else hidden_size
        mlp_hidden_dim = config.mlp_hidden_dim if mlp_hidden_dim is None else mlp_hidden_dim
    path = strip_key_prefix(name)
    param = "weight"
    target = _resolve_module(path)
    if target is None:
        module, p = _split_param(path)
        if p in ("weight", "bias"):
            target = _resolve_module(module)
            param = p
    if target is None:
        raise DCGenError(f"{name}: expected a diffusers FLUX module path "
                         "(e.g. transformer_blocks.0.attn.to_q), found an unknown name.")
    key = _bfl_param(target, param)
    if target.part is None:
        return key, None
    if hidden_size is None:
        raise DCGenError(f"{name}: the offset in the fused weight {key} needs hidden_size (or a FluxConfig).")
    if mlp_hidden_dim is None:
        mlp_hidden_dim = 4 * hidden_size
    sizes = fused_part_sizes(target.module, hidden_size, mlp_hidden_dim)
    start = sum(sizes[: target.part])
    return key, (0, start, sizes[target.part])


def diffusers_flux_module_names(config: FluxConfig) -> list[str]:
    """Every diffusers module path holding a weight for a FLUX model of this config."""
    names = [k for k in _TOP if config.guidance_embed or "guidance_embedder" not in k]
    for i in range(config.depth):
        for k in (*_DOUBLE, *_DOUBLE_NORM, *_DOUBLE_FUSED):
            names.append(f"transformer_blocks.{i}.{k}")
    for i in range(config.depth_single_blocks):
        for k in (*_SINGLE, *_SINGLE_NORM, *_SINGLE_FUSED):
            names.append(f"single_transformer_blocks.{i}.{k}")
    return names
