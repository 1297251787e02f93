"""nunchaku SVDQuant FLUX files (int4 / fp4) as ComfyUI FLUX MODELs, with or without nunchaku installed.

The paper's 4-bit DC-Gen-FLUX is a nunchaku SVDQuant FLUX.1-Krea-dev plus the DC-Gen aligned embedding and
LoRA. This module builds ComfyUI's FLUX around the file's 4-bit linears: each FLUX linear whose weight nunchaku
quantized becomes an :class:`SVDQuantLinear` holding nunchaku's packed tensors (read by :mod:`.svdquant`), where
single blocks' ``linear1`` is nunchaku's ``qkv_proj`` + ``mlp_fc1`` (rows) and ``linear2`` its ``out_proj`` +
``mlp_fc2`` (input columns, outputs summed). It runs nunchaku's CUDA kernels when nunchaku is installed and
supports the GPU, otherwise dequantizes each layer in pure torch (weight-only: activations are not quantized, so
results differ from nunchaku's by its activation rounding). The bf16 rest (embedders, head, norms) loads as in the
bf16 loader, so DC-Gen Add Embedding and DC-Gen Load LoRA (a runtime low-rank term on 4-bit layers, as
nunchaku's own LoRA is a low-rank term) turn a base file into DC-Gen-FLUX.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..shared.quant import svdquant
from ..shared.errors import DCGenError
from .dcgen import _install_latent_space
from .comfy_model import build_comfy_flux, dcgen_channels
from ..shared.latent_space import load_with_cached_init, resolve_scaling
from .keys import diffusers_flux_module_to_bfl, diffusers_to_bfl, flux_config_from_state_dict
from ..shared.quant.nvfp4 import LogicalWeight

_SVDQ_TENSORS = ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wcscales", "wtscale")
_SVDQ_SCALARS = ("kind", "group_size", "in_features", "out_features", "act_shift", "name")
_AWQ_TENSORS = ("qweight", "wscales", "wzeros", "bias")
_AWQ_SCALARS = ("group_size", "adanorm_splits", "name")


class SVDQuantLinear(torch.nn.Module):
    """A FLUX linear made of nunchaku 4-bit parts: ``rows`` (outputs concatenated), ``cols`` (input slices, outputs
    summed) or one part. The packed tensors are buffers (they move with the model and size it for ComfyUI)."""

    def __init__(self, parts: list[tuple], mode: str, in_features: int, out_features: int, use_kernel: bool | None):
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, in_features, out_features
        self.use_kernel = use_kernel
        self.logical_weight = LogicalWeight((out_features, in_features))
        self._parts = []
        for i, (weight, span) in enumerate(parts):
            awq = isinstance(weight, svdquant.AWQW4A16Weight)
            for name in (_AWQ_TENSORS if awq else _SVDQ_TENSORS):
                t = getattr(weight, name)
                self.register_buffer(f"p{i}_{name}", None if t is None else t.clone(memory_format=torch.contiguous_format))
            scalars = {n: getattr(weight, n) for n in (_AWQ_SCALARS if awq else _SVDQ_SCALARS)}
            self._parts.append((awq, scalars, span))

    def part(self, i: int):
        awq, scalars, _ = self._parts[i]
        names = _AWQ_TENSORS if awq else _SVDQ_TENSORS
        tensors = {n: getattr(self, f"p{i}_{n}") for n in names}
        return (svdquant.AWQW4A16Weight if awq else svdquant.SVDQuantWeight)(**tensors, **scalars)

    def _run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w = self.part(i)
        if isinstance(w, svdquant.AWQW4A16Weight):
            weight, bias = w.to_diffusers(torch.float32)
            return F.linear(x.float(), weight.to(x.device), None if bias is None else bias.to(x.device)).to(x.dtype)
        return w.forward(x, use_kernel=self.use_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "rows":
            return torch.cat([self._run(i, x) for i in range(len(self._parts))], dim=-1)
        if self.mode == "cols":
            y = None
            for i, (_, _, (start, n)) in enumerate(self._parts):
                part = self._run(i, x[..., start:start + n])
                y = part if y is None else y + part
            return y
        return self._run(0, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parts={len(self._parts)} ({self.mode})"


def _resolve_backend(backend: str, kind: str, device) -> bool | None:
    """True: nunchaku's kernels (required), False: pure torch, None: kernels where the input's GPU supports them."""
    if backend == "torch":
        return False
    if backend == "nunchaku":
        svdquant.require_nunchaku(device, kind)
        return True
    try:
        svdquant.require_nunchaku(device, kind)
        logging.info("SVDQuant: nunchaku's CUDA kernels on %s.", device)
        return None
    except DCGenError as e:
        logging.info("SVDQuant: pure-torch weight-only path (%s)", e)
        return False


def _targets(f: svdquant.SVDQuantFile, hidden: int, mlp_hidden: int) -> dict[str, list]:
    """BFL module -> [(weight, (start, n) of its rows or input columns, 'rows'|'cols'|'one')]."""
    targets: dict[str, list] = {}
    for path, weight in sorted({**f.linears, **f.awq}.items()):
        info = svdquant.flux_module_info(path)
        if info is None:
            raise DCGenError(f"{f.path}: expected nunchaku FLUX modules (transformer_blocks.N.qkv_proj, "
                             f"single_transformer_blocks.N.mlp_fc1, ...), found '{path}': not a FLUX file of "
                             "nunchaku's layout.")
        prefix = path[: -len(info.name)]
        key, offset = diffusers_flux_module_to_bfl(prefix + info.diffusers[0], hidden, mlp_hidden)
        module = key[: -len(".weight")]
        if info.fuse == "in_slice":
            entry = (weight, (info.in_slice[0] * hidden, weight.in_features), "cols")
        elif offset is not None:
            entry = (weight, (offset[1], weight.out_features), "rows")
        else:
            entry = (weight, None, "one")
        targets.setdefault(module, []).append(entry)
    return targets


def _assemble(source: str, module: str, entries: list, use_kernel) -> SVDQuantLinear:
    modes = {mode for _, _, mode in entries}
    if len(modes) != 1 or (modes == {"one"} and len(entries) != 1):
        raise DCGenError(f"{source}: expected nunchaku modules that tile FLUX's '{module}', found "
                         f"{len(entries)} of kinds {sorted(modes)}.")
    mode = modes.pop()
    entries = sorted(entries, key=lambda e: e[1][0] if e[1] else 0)
    parts = [(w, span) for w, span, _ in entries]
    if mode == "one":
        w = parts[0][0]
        return SVDQuantLinear(parts, mode, w.in_features, w.out_features, use_kernel)
    position, sizes = 0, set()
    for w, (start, n) in parts:
        if start != position:
            raise DCGenError(f"{source}: expected nunchaku modules covering FLUX's '{module}' without gaps, found a "
                             f"part starting at {start} where {position} was expected.")
        position += n
        sizes.add(w.in_features if mode == "rows" else w.out_features)
    if len(sizes) != 1:
        raise DCGenError(f"{source}: expected the parts of FLUX's '{module}' to share their "
                         f"{'input' if mode == 'rows' else 'output'} width, found {sorted(sizes)}.")
    (shared,) = sizes
    in_f, out_f = (shared, position) if mode == "rows" else (position, shared)
    return SVDQuantLinear(parts, mode, in_f, out_f, use_kernel)


def _plain_bfl(f: svdquant.SVDQuantFile) -> dict:
    """The file's bf16 tensors under BFL keys (nunchaku's q/k norm names mapped to diffusers' first)."""
    renamed = {}
    for k, v in f.other.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[1].isdigit():
            attn = svdquant.NUNCHAKU_FLUX_PLAIN_KEYS.get((parts[0], parts[2]))
            if attn is not None:
                k = ".".join([parts[0], parts[1], attn, *parts[3:]])
        renamed[k] = v
    try:
        return diffusers_to_bfl(renamed, strict=True)
    except DCGenError as e:
        raise DCGenError(f"{f.path}: expected the bf16 part of a nunchaku FLUX file in diffusers names, found "
                         f"{e}") from e


def _load_svdquant_patcher(path: str, backend: str = "auto", vae=None, disable_dynamic: bool = False):
    import comfy.model_management as mm

    f = svdquant.read_svdquant_file(path)
    cfg_json = f.config or {}
    heads, head_dim = cfg_json.get("num_attention_heads"), cfg_json.get("attention_head_dim")
    if not heads or not head_dim:
        raise DCGenError(f"{path}: expected header metadata 'config' with num_attention_heads and "
                         f"attention_head_dim (a diffusers Flux config), found {sorted(cfg_json) or 'none'}.")
    hidden = int(heads) * int(head_dim)
    fc1 = next((w for p, w in f.linears.items() if p.endswith(".mlp_fc1")), None)
    mlp_hidden = fc1.out_features if fc1 is not None else 4 * hidden
    use_kernel = _resolve_backend(backend, f.quant.kind, mm.get_torch_device())
    replace = {m: _assemble(path, m, entries, use_kernel) for m, entries in _targets(f, hidden, mlp_hidden).items()}
    sd = _plain_bfl(f)
    for module, layer in replace.items():  # shape stand-ins for the architecture reader
        sd[f"{module}.weight"] = layer.logical_weight
        sd[f"{module}.bias"] = LogicalWeight((layer.out_features,))
    cfg = flux_config_from_state_dict(sd, cfg_json)
    channels = dcgen_channels(cfg, path)
    scaling = None if channels is None else resolve_scaling(channels, vae, path)
    m = build_comfy_flux(sd, cfg, "default", source=path, disable_dynamic=disable_dynamic, replace=replace)
    m.model_options["dcgen_quantization"] = {"format": f"svdquant-{f.quant.kind}", "layers": len(replace),
                                             "rank": f.quant.rank,
                                             "ops": "nunchaku kernels" if use_kernel is not False else "torch"}
    if channels is not None:
        _install_latent_space(m, channels, scaling, own_model=True)
    del f
    return m


def load_svdquant_flux(path: str, vae=None, backend: str = "auto"):
    """Load a nunchaku SVDQuant FLUX file as a ComfyUI MODEL (``backend``: auto / nunchaku / torch)."""
    return load_with_cached_init(_load_svdquant_patcher, path, backend, vae=vae)
