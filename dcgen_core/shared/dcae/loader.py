"""Loading DC-AE weights: layout detection, architecture inference, strict load."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import torch

from ..checkpoints import load_checkpoint, owned
from ..errors import DCGenError, mismatch
from .config import VARIANTS, DCAEConfig
from .convert import convert_original_to_diffusers, is_original_layout
from .model import DCAE

_PREFIXES = ("vae.", "first_stage_model.", "model.")
_KL_MARKERS = ("encoder.down.", "decoder.up.", "encoder.mid.", "mid_block.", ".resnets.", "quant_conv.")


def _strip_common_prefix(sd: dict) -> dict:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def is_kl_autoencoder(sd: dict) -> bool:
    """Whether a state dict (any key prefix) is a KL autoencoder (SD/FLUX-style VAE) rather than a DC-AE."""
    return any(m in k for k in sd for m in _KL_MARKERS)


def _check_is_dcae(sd: dict, source: str) -> None:
    expected = "DC-AE encoder/decoder keys (encoder.down_blocks.*, encoder.conv_out)"
    kl_keys = [k for k in sd if any(m in k for m in _KL_MARKERS)]
    if kl_keys:
        raise DCGenError(
            f"{source} is not a DC-AE: expected {expected} but found a KL autoencoder "
            f"(SD/FLUX-style VAE; e.g. '{kl_keys[0]}'). Pick a DC-AE file (e.g. dc-ae-f32c32-sana-1.1)."
        )
    has_dcae = "encoder.conv_out.weight" in sd or any(
        k.startswith(("encoder.down_blocks.", "encoder.stages.", "decoder.up_blocks.", "decoder.stages.")) for k in sd
    )
    if not has_dcae:
        sample = ", ".join(sorted(sd)[:3]) or "no tensors"
        raise DCGenError(f"{source} is not a DC-AE: expected {expected}, found keys like {sample}.")


# ---------------------------------------------------------------- architecture from weights

# First child module name inside a stage element -> what the element is.
_KIND_OF_CHILD = {"conv1": "ResBlock", "conv2": "ResBlock", "norm": "ResBlock",
                  "attn": "EfficientViTBlock", "conv_out": "EfficientViTBlock", "conv": "sampler"}


def _block_kinds(sd: dict, prefix: str) -> dict[int, dict[int, str]]:
    """{stage: {index: 'ResBlock' | 'EfficientViTBlock' | 'sampler'}} for keys under ``prefix``."""
    kinds: dict[int, dict[int, str]] = {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\d+)\.(\w+)\.")
    for key in sd:
        m = pattern.match(key)
        if m and m[3] in _KIND_OF_CHILD:
            kinds.setdefault(int(m[1]), {})[int(m[2])] = _KIND_OF_CHILD[m[3]]
    return kinds


_WIDTH_SOURCES = {  # (key inside a block, axis holding the block width), first present wins
    "ResBlock": (("conv1.weight", 0), ("conv2.weight", 0), ("conv1.bias", 0)),
    "EfficientViTBlock": (("attn.to_q.weight", 1), ("attn.to_k.weight", 1), ("attn.to_v.weight", 1),
                          ("conv_out.conv_inverted.weight", 1), ("conv_out.conv_point.weight", 0)),
}


def _block_width(sd: dict, prefix: str, kind: str) -> int:
    for key, axis in _WIDTH_SOURCES[kind]:
        if prefix + key in sd:
            return sd[prefix + key].shape[axis]
    raise DCGenError(f"expected the weights of {prefix[:-1]} ({kind}), found none of them")


def _multiscales(sd: dict, prefix: str) -> tuple[int, ...]:
    sizes, s = [], 0
    while f"{prefix}attn.to_qkv_multiscale.{s}.proj_in.weight" in sd:
        sizes.append(sd[f"{prefix}attn.to_qkv_multiscale.{s}.proj_in.weight"].shape[-1])
        s += 1
    return tuple(sizes)


def _infer_side(sd: dict, side: str, n: int):
    """Element kinds and per-stage (types, widths, layers, multiscales, norms) of one side; empty stage width None."""
    prefix = f"{side}.{'down_blocks' if side == 'encoder' else 'up_blocks'}."
    kinds = _block_kinds(sd, prefix)
    types, widths, layers, scales, norms = [], [], [], [], []
    for i in range(n):
        blocks = {j: k for j, k in kinds.get(i, {}).items() if k != "sampler"}
        first = min(blocks) if blocks else None
        kind = blocks[first] if blocks else "ResBlock"
        block_prefix = f"{prefix}{i}.{first}."
        types.append(kind)
        layers.append(len(blocks))
        widths.append(_block_width(sd, block_prefix, kind) if blocks else None)
        scales.append(_multiscales(sd, block_prefix) if blocks and kind == "EfficientViTBlock" else ())
        norm_key = block_prefix + ("norm.running_mean" if kind == "ResBlock" else "attn.norm_out.running_mean")
        norms.append("batch_norm" if blocks and norm_key in sd else "rms_norm")
    # An empty stage has no weights and its settings are unused; copy the next stage, as the releases do.
    for i in reversed(range(n - 1)):
        if layers[i] == 0:
            types[i], norms[i] = types[i + 1], norms[i + 1]
    return kinds, types, widths, layers, scales, norms


def _fill_empty_widths(widths: list) -> tuple[int, ...]:
    # An empty stage has no weights; its width is never used by the model. Use the
    # released configs' convention (128 before 256): half of the next stage.
    out = list(widths)
    for i in reversed(range(len(out))):
        if out[i] is None:
            out[i] = out[i + 1] // 2 if i + 1 < len(out) and out[i + 1] else 1
    return tuple(out)


def _architecture_from_weights(sd: dict) -> DCAEConfig:
    stage_pattern = re.compile(r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.")
    stage_ids = [int(m[1]) for m in map(stage_pattern.match, sd) if m]
    if not stage_ids or "encoder.conv_out.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise DCGenError("expected encoder.down_blocks.*, encoder.conv_out and decoder.conv_in (a complete DC-AE)")
    n = max(stage_ids) + 1
    _, e_types, e_widths, e_layers, e_scales, _ = _infer_side(sd, "encoder", n)
    d_kinds, d_types, d_widths, d_layers, d_scales, d_norms = _infer_side(sd, "decoder", n)
    e_widths, d_widths = _fill_empty_widths(e_widths), _fill_empty_widths(d_widths)

    # Downsample kind: a pixel-unshuffle conv emits a quarter of the next stage's channels.
    stem = sd.get("encoder.conv_in.conv.weight")
    down = "conv"
    for i in range(n - 1):
        key = f"encoder.down_blocks.{i}.{e_layers[i]}.conv.weight"
        if e_layers[i] and key in sd:
            down = "pixel_unshuffle" if sd[key].shape[0] * 4 == e_widths[i + 1] else "conv"
            break
    else:
        if stem is not None:
            down = "pixel_unshuffle" if stem.shape[0] * 4 == e_widths[1] else "conv"

    # Upsample kind: an interpolating conv emits the stage's own width, a pixel-shuffle conv 4x it.
    up = "pixel_shuffle"
    for i in range(n - 1):
        if d_layers[i] and d_kinds.get(i, {}).get(0) == "sampler":
            conv_rows = sd[f"decoder.up_blocks.{i}.0.conv.weight"].shape[0]
            up = "interpolate" if conv_rows == d_widths[i] else "pixel_shuffle"
            break

    head_dims = [sd[k].shape[1] for k in sd if re.search(r"attn\.to_qkv_multiscale\.0\.proj_out\.weight$", k)]
    return DCAEConfig(
        in_channels=sd["encoder.conv_in.weight" if stem is None else "encoder.conv_in.conv.weight"].shape[1],
        latent_channels=sd["encoder.conv_out.weight"].shape[0],
        # not stored in the weights without multiscale branches; every released DC-AE uses 32
        attention_head_dim=head_dims[0] if head_dims else 32,
        encoder_block_types=tuple(e_types),
        decoder_block_types=tuple(d_types),
        encoder_block_out_channels=e_widths,
        decoder_block_out_channels=d_widths,
        encoder_layers_per_block=tuple(e_layers),
        decoder_layers_per_block=tuple(d_layers),
        encoder_qkv_multiscales=tuple(e_scales),
        decoder_qkv_multiscales=tuple(d_scales),
        upsample_block_type=up,
        downsample_block_type=down,
        decoder_norm_types=tuple(d_norms),
        # activations are not in the weights; in every release batch-norm stages use relu, the rest silu
        decoder_act_fns=tuple("relu" if norm == "batch_norm" else "silu" for norm in d_norms),
    )


# ---------------------------------------------------------------- which released variant

def _family(cfg: DCAEConfig) -> str:
    """Architecture family, the part of a variant that the weights do reveal."""
    attention = cfg.has_attention
    if cfg.num_stages == 6 and cfg.downsample_block_type == "conv":
        return "sana" if attention else "lite"
    if cfg.num_stages == 6:
        return "f32-imagenet"
    if cfg.num_stages == 7:
        return "f64-imagenet" if attention or cfg.decoder_has_batch_norm else "1.5"
    if cfg.num_stages == 8:
        return "f128-imagenet"
    return "unknown"


_FAMILY_DEFAULT = {  # used when nothing but the weights is known
    "sana": "dc-ae-f32c32-sana-1.1",
    "lite": "dc-ae-lite-f32c32",
    "f32-imagenet": "dc-ae-f32c32-mix-1.0",
    "f64-imagenet": "dc-ae-f64c128-mix-1.0",
    "f128-imagenet": "dc-ae-f128c512-mix-1.0",
    "1.5": "dc-ae-1.5-f64c128",
}


def _name_tokens(path: str | None) -> list[str]:
    """Lower-case tokens of the file name (or folder name) only; parent folders are not evidence."""
    if not path:
        return []
    name = os.path.basename(os.path.normpath(path)).lower()
    name = re.sub(r"\.(safetensors|sft)$", "", name)
    return [t for t in re.split(r"[^a-z0-9.]+", name) if t]


def _hinted_variant(tokens: list[str], family: str) -> str | None:
    joined = "-".join(tokens)
    hints = {
        "sana": [("dc-ae-f32c32-sana-1.1", "sana-1.1" in joined), ("dc-ae-f32c32-sana-1.0", "sana-1.0" in joined)],
        "lite": [("dc-ae-lite-f32c32", "lite" in tokens)],
        "1.5": [("dc-ae-1.5-f64c128", "1.5" in tokens or "1_5" in joined or "v1.5" in tokens)],
    }
    for prefix in ("f32c32", "f64c128", "f128c512"):
        fam = {"f32c32": "f32-imagenet", "f64c128": "f64-imagenet", "f128c512": "f128-imagenet"}[prefix]
        hints[fam] = [(f"dc-ae-{prefix}-in-1.0", "in" in tokens), (f"dc-ae-{prefix}-mix-1.0", "mix" in tokens)]
    for name, matched in hints.get(family, []):
        if matched:
            return name
    return None


_UNSTORED_SETTINGS = ("encoder_out_shortcut", "decoder_in_shortcut", "decoder_conv_act_fn", "scaling_factor")


def _known_variant(variant: str) -> DCAEConfig:
    if variant not in VARIANTS:
        raise mismatch("DC-AE variant", "one of " + ", ".join(VARIANTS) + " or 'auto'", f"'{variant}'")
    return VARIANTS[variant]


def infer_config(sd: dict, config_json: dict | None = None, filename: str | None = None,
                 variant: str = "auto") -> DCAEConfig:
    """Work out the DC-AE config for a diffusers-layout state dict.

    Architecture (stages, latent channels, widths, layers, block kinds, up/down
    sampling, multiscales, norms): from ``config_json`` when given, else read
    from the weight shapes.

    Settings the weights cannot show (in vs mix, SANA 1.0 vs 1.1, the
    scaling factor, shortcuts, decoder activations), first rule that applies:

    1. an explicit ``variant`` name (must match the weights' family: stage
       count, decoder attention, down-sampling kind);
    2. ``config_json``; the shortcut/activation flags and scaling factor it
       lacks come from the variant detected by rules 3-4 (configs from
       diffusers < 0.35 cannot express DC-AE-1.5's flags);
    3. hints in the file/folder name: "lite", "1.5", "sana-1.0"/"sana-1.1",
       "in"/"mix" tokens, only among variants of the weights' family;
    4. the family default: f32 with strided-conv encoder and attention decoder
       -> SANA 1.1; same without decoder attention -> Lite; f64 with no
       attention and no batch norm -> DC-AE-1.5; other f32/f64/f128 -> the
       "mix" release (as diffusers' single-file loader does).
    """
    if variant != "auto":
        named = _known_variant(variant)
    if config_json is not None:
        class_name = config_json.get("_class_name", "AutoencoderDC")
        if class_name != "AutoencoderDC":
            raise mismatch("config.json", "an AutoencoderDC config", f"'{class_name}'")
        arch = DCAEConfig.from_diffusers_dict(config_json)
    else:
        arch = _architecture_from_weights(sd)
    family = _family(arch)

    if variant != "auto":
        if _family(named) != family:
            raise mismatch(
                f"DC-AE variant '{variant}'",
                f"weights of its kind ({named.num_stages} stages, f{named.spatial_compression}, "
                f"{'attention' if named.has_attention else 'conv-only'} decoder)",
                f"{arch.num_stages} stages (f{arch.spatial_compression}), "
                f"{'attention' if arch.has_attention else 'conv-only'} decoder, "
                f"{arch.downsample_block_type} downsampling",
            )
        return arch.with_flags_of(named)

    guess = _hinted_variant(_name_tokens(filename), family) or _FAMILY_DEFAULT.get(family)
    if config_json is not None:
        if guess is None:
            return replace(arch, variant="custom")
        # Keys a config.json lacks come from the detected release, not diffusers' defaults: configs
        # written before diffusers 0.35 cannot express DC-AE-1.5's shortcut/activation flags.
        known = VARIANTS[guess]
        fill = {k: getattr(known, k) for k in _UNSTORED_SETTINGS if k not in config_json}
        return replace(arch, variant=guess, **fill)
    if guess is None:
        raise DCGenError(
            f"unrecognised DC-AE architecture ({arch.num_stages} stages, widths {arch.encoder_block_out_channels}): "
            "expected one of the released variants. Pass variant=<name> or put its diffusers config.json beside it."
        )
    return arch.with_flags_of(VARIANTS[guess])


# ---------------------------------------------------------------- loading

def _summarise(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(model: DCAE, sd: dict, source: str) -> None:
    expected = model.state_dict()
    for key in expected:  # older exports omit this BatchNorm counter; it does not affect inference
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"{len(missing)} missing ({_summarise(missing)})")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected ({_summarise(unexpected)})")
        raise mismatch(source, f"the tensors of a {model.config.variant} DC-AE", "; ".join(found),
                       "The file may be incomplete or a different DC-AE; try variant=<name> or its config.json.")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise mismatch(source, "tensor shapes of the inferred DC-AE config", f"{len(wrong)} differing: " +
                       "; ".join(wrong[:3]), "Its config.json does not match the weights, or pass variant=<name>.")


def load_dcae(path: str, variant: str = "auto", dtype: torch.dtype = torch.float32, device="cpu") -> DCAE:
    """Load a DC-AE from a single safetensors file, a diffusers folder or a pipeline folder (vae/)."""
    ckpt = load_checkpoint(path, component="vae")
    sd = _strip_common_prefix(ckpt.state_dict)
    _check_is_dcae(sd, path)
    if is_original_layout(sd):
        sd = convert_original_to_diffusers(sd)
    try:
        config = infer_config(sd, ckpt.config, filename=path, variant=variant)
    except DCGenError as e:
        raise DCGenError(f"{path}: {e}") from e
    except (KeyError, ValueError) as e:
        raise DCGenError(f"{path}: could not read a DC-AE architecture from the weights ({e}).") from e
    with torch.device("meta"):
        model = DCAE(config)
    _check_keys(model, sd, path)
    # private copies in the target dtype, one at a time (the file may change or vanish while the VAE is cached)
    model.load_state_dict({k: owned(sd.pop(k), dtype) for k in list(sd)}, strict=True, assign=True)
    return model.to(device=device).eval().requires_grad_(False)
