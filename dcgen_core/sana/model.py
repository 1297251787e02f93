"""SANA transformer built the way ComfyUI builds its own ``comfy.ldm`` models.

``SanaTransformer(config, dtype=None, device=None, operations=None)`` creates every layer from
``operations`` (``comfy.ops.disable_weight_init`` / ``manual_cast`` / a quantized variant), so
ComfyUI's weight casting, offloading and LoRA patching apply to it. Parameter names are exactly
diffusers' ``SanaTransformer2DModel`` state-dict keys (a diffusers state dict loads with
``strict=True``), and the arithmetic follows diffusers' order so outputs agree to float rounding:

- self-attention: ``SanaLinearAttnProcessor2_0`` -- ReLU linear attention computed in float32, with
  the value tensor padded by a row of ones (the padded row yields the normaliser) and eps 1e-15;
- cross-attention: ``SanaAttnProcessor2_0`` -- softmax attention over the projected caption, the
  caption mask turned into an additive bias of ``(1 - mask) * -10000`` (diffusers' convention, so a
  caption whose tokens are all dropped attends uniformly, as in diffusers, instead of giving NaN);
- timestep: ``AdaLayerNormSingle`` (sinusoidal 256, flip to cos-sin, shift 0, computed in float32),
  or SANA-Sprint's ``SanaCombinedTimestepGuidanceEmbeddings`` when ``guidance_embeds``.

Timesteps are on diffusers' scale (0..1000 for SANA, as the transformer receives them); the
pipeline-level factors ``timestep_scale`` and ``guidance_embeds_scale`` are stored in the config
but, as in diffusers' transformer, not applied here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..shared.errors import DCGenError, mismatch

_COMFY: dict = {}


def _comfy():
    """ComfyUI's attention module and ``cast_to`` once ComfyUI is importable (looked up lazily: ComfyUI may be
    put on ``sys.path`` after this module is imported); ``{}`` without ComfyUI (plain PyTorch fallbacks)."""
    if not _COMFY:
        try:
            import comfy.model_management as mm
            from comfy.ldm.modules import attention
        except ImportError:
            return {}
        _COMFY.update(attention=attention, cast_to=mm.cast_to)
    return _COMFY


SUPPORTED_QK_NORMS = (None, "rms_norm_across_heads")
_MASK_BIAS = -10000.0  # diffusers SanaTransformer2DModel.forward: (1 - mask) * -10000.0


@dataclass(frozen=True)
class SanaConfig:
    """SANA architecture; field names and defaults are diffusers' ``SanaTransformer2DModel`` config."""

    in_channels: int = 32
    out_channels: int = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int = 20
    cross_attention_head_dim: int = 112
    cross_attention_dim: int = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None  # None: no positional embedding (SANA <= 1K); 2K: 1.0, 4K: 2.0
    guidance_embeds: bool = False  # SANA-Sprint
    guidance_embeds_scale: float = 0.1  # pipeline-level, not applied by the transformer
    qk_norm: str | None = None  # SANA-1.5 / Sprint: "rms_norm_across_heads"
    timestep_scale: float = 1.0  # pipeline-level, not applied by the transformer

    def __post_init__(self):
        if self.qk_norm not in SUPPORTED_QK_NORMS:
            raise mismatch("SANA config qk_norm", " or ".join(repr(q) for q in SUPPORTED_QK_NORMS),
                           repr(self.qk_norm), "Other qk norms are not used by any SANA model.")
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                     "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
                     "caption_channels", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise mismatch(f"SANA config {name}", "a positive integer", repr(v))
        if self.mlp_ratio <= 0 or int(self.mlp_ratio * self.hidden_size) <= 0:
            raise mismatch("SANA config mlp_ratio", "a positive ratio", repr(self.mlp_ratio))

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_channels(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)  # diffusers GLUMBConv: int(expand_ratio * in_channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> SanaConfig:
        """From a diffusers ``config.json`` dict (``_class_name`` etc. and unknown keys are ignored)."""
        if not isinstance(cfg, dict):
            raise mismatch("SANA config", "a dict (the transformer's config.json)", type(cfg).__name__)
        cls_name = cfg.get("_class_name")
        if cls_name is not None and cls_name != "SanaTransformer2DModel":
            raise mismatch("SANA config.json _class_name", "'SanaTransformer2DModel'", repr(cls_name))
        if "cross_attention_dim" in cfg and cfg["cross_attention_dim"] is None:
            raise DCGenError("SANA config.json: cross_attention_dim is null (a SANA transformer without "
                             "cross-attention); this is not supported (diffusers cannot run it either).")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        for k in ("num_cross_attention_heads", "cross_attention_head_dim"):
            if k in kw and kw[k] is None:
                raise mismatch(f"SANA config.json {k}", "an integer", "null")
        return cls(**kw)

    def to_diffusers_config(self) -> dict:
        """A dict ``SanaTransformer2DModel.from_config`` accepts (config.json content)."""
        d = {"_class_name": "SanaTransformer2DModel"}
        d.update(asdict(self))
        d["dropout"] = 0.0
        return d


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A parameter used directly (scale-shift tables) in the compute dtype/device, as comfy ldm models do."""
    cast_to = _comfy().get("cast_to")
    if cast_to is not None:
        return cast_to(t, dtype=like.dtype, device=like.device)
    return t.to(dtype=like.dtype, device=like.device)


def _default_operations():
    try:
        import comfy.ops

        return comfy.ops.disable_weight_init
    except ImportError:
        return SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, LayerNorm=nn.LayerNorm, RMSNorm=None)


class _RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` parameter, for ``operations`` without an ``RMSNorm`` (casts like comfy's)."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x):
        w = None if self.weight is None else _cast(self.weight, x)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def _rms_norm(operations, dim, eps, dtype, device):
    cls = getattr(operations, "RMSNorm", None) or _RMSNorm
    return cls(dim, eps=eps, elementwise_affine=True, dtype=dtype, device=device)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``, float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def sincos_pos_embed(embed_dim: int, grid_hw: tuple[int, int], base_size: int, interpolation_scale: float,
                     device=None) -> torch.Tensor:
    """diffusers ``get_2d_sincos_pos_embed(embed_dim, (h, w), base_size, interpolation_scale)`` -> (h*w, D) fp32.

    Reproduces diffusers including its raw reshape of the (h, w) grid to (w, h) for non-square latents.
    """
    gh, gw = grid_hw
    f64 = torch.float32 if (device is not None and torch.device(device).type == "mps") else torch.float64
    grid_h = torch.arange(gh, device=device, dtype=torch.float32) / (gh / base_size) / interpolation_scale
    grid_w = torch.arange(gw, device=device, dtype=torch.float32) / (gw / base_size) / interpolation_scale
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0).reshape(2, 1, gw, gh)

    def one_d(d, pos):
        omega = torch.arange(d // 2, device=pos.device, dtype=f64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = torch.outer(pos.reshape(-1), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    if embed_dim % 2 or (embed_dim // 2) % 2:
        raise mismatch("SANA positional embedding width", "a multiple of 4", embed_dim)
    emb = torch.cat([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], dim=1)
    return emb.float()


# --------------------------------------------------------------------------------------
# modules (names = diffusers submodule names)
# --------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, in_channels, hidden, patch_size, dtype, device, operations):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size, bias=True,
                                      dtype=dtype, device=device)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, dim, dtype, device, operations):
        super().__init__()
        self.linear_1 = operations.Linear(in_channels, dim, bias=True, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(dim, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimestepOnly(nn.Module):  # diffusers PixArtAlphaCombinedTimestepSizeEmbeddings without size conditions
    def __init__(self, dim, dtype, device, operations):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype, device, operations)


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim, dtype, device, operations):
        super().__init__()
        self.emb = _TimestepOnly(dim, dtype, device, operations)
        self.linear = operations.Linear(dim, 6 * dim, bias=True, dtype=dtype, device=device)

    def forward(self, timestep, guidance, hidden_dtype):
        embedded = self.emb.timestep_embedder(timestep_embedding(timestep).to(hidden_dtype))
        return self.linear(F.silu(embedded)), embedded


class TimestepGuidanceEmbedding(nn.Module):  # diffusers SanaCombinedTimestepGuidanceEmbeddings (SANA-Sprint)
    def __init__(self, dim, dtype, device, operations):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype, device, operations)
        self.guidance_embedder = TimestepEmbedding(256, dim, dtype, device, operations)
        self.linear = operations.Linear(dim, 6 * dim, bias=True, dtype=dtype, device=device)

    def forward(self, timestep, guidance, hidden_dtype):
        if guidance is None:
            raise DCGenError("This SANA model has a guidance embedding (SANA-Sprint) and needs a guidance value; "
                             "none was given.")
        t_emb = self.timestep_embedder(timestep_embedding(timestep).to(hidden_dtype))
        g_emb = self.guidance_embedder(timestep_embedding(guidance).to(hidden_dtype))
        conditioning = t_emb + g_emb
        return self.linear(F.silu(conditioning)), conditioning


class CaptionProjection(nn.Module):  # diffusers PixArtAlphaTextProjection (act_fn gelu_tanh)
    def __init__(self, in_features, hidden, dtype, device, operations):
        super().__init__()
        self.linear_1 = operations.Linear(in_features, hidden, bias=True, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _Out(nn.ModuleList):
    """``to_out`` = [Linear, Dropout]: keys ``to_out.0.*`` as in diffusers."""


class _AttentionBase(nn.Module):
    def __init__(self, query_dim, kv_dim, heads, head_dim, qkv_bias, qk_norm, dtype, device, operations):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = operations.Linear(query_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        self.to_k = operations.Linear(kv_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        self.to_v = operations.Linear(kv_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        if qk_norm == "rms_norm_across_heads":  # diffusers Attention: RMSNorm(dim_head * heads, eps=1e-5)
            self.norm_q = _rms_norm(operations, inner, 1e-5, dtype, device)
            self.norm_k = _rms_norm(operations, inner, 1e-5, dtype, device)
        else:
            self.norm_q = None
            self.norm_k = None
        self.to_out = _Out([operations.Linear(inner, query_dim, bias=True, dtype=dtype, device=device),
                            nn.Identity()])

    def _qkv(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q = self.norm_q(q)
            k = self.norm_k(k)
        return q, k, v


class LinearSelfAttention(_AttentionBase):
    """diffusers ``SanaLinearAttnProcessor2_0``."""

    def forward(self, x, transformer_options=None):
        dtype = x.dtype
        q, k, v = self._qkv(x, x)
        q = q.transpose(1, 2).unflatten(1, (self.heads, -1))  # B, h, d, N
        k = k.transpose(1, 2).unflatten(1, (self.heads, -1)).transpose(2, 3)  # B, h, N, d
        v = v.transpose(1, 2).unflatten(1, (self.heads, -1))  # B, h, d, N
        q = F.relu(q)
        k = F.relu(k)
        q, k, v = q.float(), k.float(), v.float()
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # B, h, d+1, N: the last row gives the normaliser
        out = torch.matmul(torch.matmul(v, k), q)  # B, h, d+1, N
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = self.to_out[0](out)
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(_AttentionBase):
    """diffusers ``SanaAttnProcessor2_0`` via ComfyUI's ``optimized_attention`` (SDPA without ComfyUI)."""

    def forward(self, x, context, mask_bias=None, transformer_options=None):
        q, k, v = self._qkv(x, context)
        attention = _comfy().get("attention")
        if attention is not None:  # the backend ComfyUI chose (read at call time), transformer_options overrides
            out = attention.optimized_attention(q, k, v, self.heads, mask=mask_bias,
                                                transformer_options=transformer_options or {})
        else:
            b = q.shape[0]
            q, k, v = (t.view(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            m = None if mask_bias is None else mask_bias.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            out = out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)
        return self.to_out[0](out.to(q.dtype))


class GLUMBConv(nn.Module):
    def __init__(self, dim, hidden, dtype, device, operations):
        super().__init__()
        self.conv_inverted = operations.Conv2d(dim, hidden * 2, 1, 1, 0, dtype=dtype, device=device)
        self.conv_depth = operations.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2, dtype=dtype,
                                            device=device)
        self.conv_point = operations.Conv2d(hidden, dim, 1, 1, 0, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        x = F.silu(self.conv_inverted(x))
        x, gate = torch.chunk(self.conv_depth(x), 2, dim=1)
        return self.conv_point(x * F.silu(gate))


class SanaTransformerBlock(nn.Module):
    def __init__(self, cfg: SanaConfig, dtype, device, operations):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = operations.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.attn1 = LinearSelfAttention(dim, dim, cfg.num_attention_heads, cfg.attention_head_dim,
                                         cfg.attention_bias, cfg.qk_norm, dtype, device, operations)
        self.norm2 = operations.LayerNorm(dim, elementwise_affine=cfg.norm_elementwise_affine, eps=cfg.norm_eps,
                                          dtype=dtype, device=device)
        self.attn2 = CrossAttention(dim, cfg.cross_attention_dim, cfg.num_cross_attention_heads,
                                    cfg.cross_attention_head_dim, True, cfg.qk_norm, dtype, device, operations)
        self.ff = GLUMBConv(dim, cfg.mlp_hidden_channels, dtype, device, operations)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim, dtype=dtype, device=device))

    def forward(self, x, context, mask_bias, temb, height, width, transformer_options=None):
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            _cast(self.scale_shift_table, temb)[None] + temb.reshape(b, 6, -1)
        ).chunk(6, dim=1)

        h = self.norm1(x)
        h = (h * (1 + scale_msa) + shift_msa).to(x.dtype)
        x = x + gate_msa * self.attn1(h, transformer_options=transformer_options)

        x = self.attn2(x, context, mask_bias, transformer_options=transformer_options) + x

        h = self.norm2(x)
        h = h * (1 + scale_mlp) + shift_mlp
        h = h.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        h = self.ff(h).flatten(2, 3).permute(0, 2, 1)
        return x + gate_mlp * h


class SanaModulatedNorm(nn.Module):
    def __init__(self, dim, dtype, device, operations):
        super().__init__()
        self.norm = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)

    def forward(self, x, embedded_timestep, scale_shift_table):
        x = self.norm(x)
        shift, scale = (scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        return x * (1 + scale) + shift


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------

class SanaTransformer(nn.Module):
    """SANA / SANA-1.5 / SANA-Sprint transformer; state-dict keys = diffusers ``SanaTransformer2DModel``."""

    def __init__(self, config: SanaConfig, dtype=None, device=None, operations=None):
        super().__init__()
        if isinstance(config, dict):
            config = SanaConfig.from_diffusers_config(config)
        if operations is None:
            operations = _default_operations()
        self.config = config
        self.dtype = dtype
        dim = config.hidden_size
        p = config.patch_size

        self.patch_embed = PatchEmbed(config.in_channels, dim, p, dtype, device, operations)
        if config.guidance_embeds:
            self.time_embed = TimestepGuidanceEmbedding(dim, dtype, device, operations)
        else:
            self.time_embed = AdaLayerNormSingle(dim, dtype, device, operations)
        self.caption_projection = CaptionProjection(config.caption_channels, dim, dtype, device, operations)
        self.caption_norm = _rms_norm(operations, dim, 1e-5, dtype, device)
        self.transformer_blocks = nn.ModuleList(
            [SanaTransformerBlock(config, dtype, device, operations) for _ in range(config.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, dtype=dtype, device=device))
        self.norm_out = SanaModulatedNorm(dim, dtype, device, operations)
        self.proj_out = operations.Linear(dim, p * p * config.out_channels, bias=True, dtype=dtype, device=device)

    def _mask_bias(self, attention_mask, batch, length, dtype):
        if attention_mask is None:
            return None
        m = attention_mask
        if m.ndim == 3 and m.shape[1] == 1:  # already [B, 1, L] (diffusers passes a bias through unchanged)
            bias = m.to(dtype)
        elif m.ndim == 2:
            bias = ((1 - m.to(dtype)) * _MASK_BIAS).unsqueeze(1)  # [B, 1, L]
        else:
            raise mismatch("SANA attention_mask", "shape [batch, text tokens] (1 keep / 0 drop)", tuple(m.shape))
        if bias.shape[-1] != length:
            raise mismatch("SANA attention_mask length", f"{length} (the text tokens in context)", bias.shape[-1])
        if bias.shape[0] != batch:
            if batch % bias.shape[0]:
                raise mismatch("SANA attention_mask batch", f"a divisor of {batch}", bias.shape[0])
            bias = bias.repeat(batch // bias.shape[0], 1, 1)
        return bias

    def forward(self, x, timesteps, context, attention_mask=None, transformer_options=None, guidance=None,
                controlnet_block_samples=None, **kwargs):
        """x [B, C, H, W], timesteps [B] (0..1000), context [B, L, caption_channels], attention_mask [B, L]."""
        cfg = self.config
        b, _, h_in, w_in = x.shape
        p = cfg.patch_size
        if p > 1 and (h_in % p or w_in % p):
            import comfy.ldm.common_dit

            x = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))
        height, width = x.shape[-2] // p, x.shape[-1] // p

        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=x.device)
        timesteps = timesteps.reshape(-1)
        if timesteps.shape[0] == 1 and b > 1:
            timesteps = timesteps.expand(b)
        if guidance is not None:
            if not torch.is_tensor(guidance):
                guidance = torch.tensor([guidance], device=x.device)
            guidance = guidance.reshape(-1)
            if guidance.shape[0] == 1 and b > 1:
                guidance = guidance.expand(b)

        hidden = self.patch_embed(x)
        if cfg.interpolation_scale is not None:
            pe = sincos_pos_embed(hidden.shape[-1], (height, width), cfg.sample_size // p, cfg.interpolation_scale,
                                  device=hidden.device)
            hidden = (hidden + pe.unsqueeze(0)).to(hidden.dtype)

        temb, embedded_timestep = self.time_embed(timesteps, guidance, hidden.dtype)

        context = self.caption_projection(context)
        context = context.view(b, -1, hidden.shape[-1])
        context = self.caption_norm(context)
        mask_bias = self._mask_bias(attention_mask, b, context.shape[1], hidden.dtype)

        for i, block in enumerate(self.transformer_blocks):
            hidden = block(hidden, context, mask_bias, temb, height, width, transformer_options=transformer_options)
            if controlnet_block_samples is not None and 0 < i <= len(controlnet_block_samples):
                hidden = hidden + controlnet_block_samples[i - 1]

        hidden = self.norm_out(hidden, embedded_timestep, _cast(self.scale_shift_table, embedded_timestep))
        hidden = self.proj_out(hidden)

        hidden = hidden.reshape(b, height, width, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        out = hidden.reshape(b, -1, height * p, width * p)
        return out[:, :, :h_in, :w_in]
