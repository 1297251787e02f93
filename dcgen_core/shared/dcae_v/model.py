"""DC-AE-V on plain torch modules, with the authors' state-dict names (``.pt`` weights load as they are).

Each 3x3x3 conv is a :class:`ChunkConv`. It takes ``cache``: a dict that carries, per conv, the last input frame
of the previous chunk (the authors' feature cache). Run the model chunk by chunk with one cache dict (see
:mod:`.chunked`) and the result equals one pass over the whole clip, with memory for one chunk only.

Frame counts that are not a multiple of a conv's chunk: as the authors' ``ConvLayer3d``, the conv then runs as a
plain zero-padded conv over what it was given, with no left context and without touching the cache. The chunked
runner only meets this in a clip's last, shorter chunk; it logs a warning there (see :mod:`.chunked`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DCAEVConfig


class RMSNorm3d(nn.Module):
    """RMS norm over channels of (B, C, T, H, W), with weight and bias (the authors' ``RMSNorm3d``)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = x / torch.sqrt(torch.square(x).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight + self.bias).permute(0, 4, 1, 2, 3)


def chunk_causal_conv(conv: nn.Conv3d, x: torch.Tensor, chunk: int | None, cache: dict | None, key: str):
    """``conv`` over chunks of ``chunk`` frames: left context from the previous chunk (or ``cache``), zeros right."""
    frames = x.shape[2]
    pad = conv.padding[0]
    if chunk is None or pad == 0 or frames % chunk:
        return conv(x)
    b, c, _, h, w = x.shape
    n = frames // chunk
    x = x.reshape(b, c, n, chunk, h, w)
    first = cache.get(key) if cache is not None else None
    if cache is not None:
        cache[key] = x[:, :, -1, -pad:].clone()
    if first is None:
        first = x.new_zeros(b, c, pad, h, w)
    left = torch.cat([first.unsqueeze(2), x[:, :, :-1, -pad:]], dim=2)
    x = torch.cat([left, x, x.new_zeros(b, c, n, pad, h, w)], dim=3)
    x = x.transpose(1, 2).reshape(b * n, c, chunk + 2 * pad, h, w)
    y = F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1], conv.padding[2]), conv.dilation,
                 conv.groups)
    return y.reshape(b, n, -1, chunk, h, w).transpose(1, 2).reshape(b, -1, frames, h, w)


class ChunkConv(nn.Module):
    """3x3x3 conv (chunk-causal in time), optional RMSNorm3d and SiLU: the authors' ``ConvLayer3d``."""

    def __init__(self, cin: int, cout: int, chunk: int, bias: bool = True, norm: bool = False, act: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1, bias=bias)
        self.norm = RMSNorm3d(cout, eps) if norm else None
        self.act = nn.SiLU() if act else None
        self.chunk = chunk
        self.cache_key = ""  # set by DCAEV: the module's name

    def forward(self, x, cache=None):
        x = chunk_causal_conv(self.conv, x, self.chunk, cache, self.cache_key)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


def pixel_unshuffle_3d(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // t, t, h // s, s, w // s, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * t * s * s, f // t, h // s, w // s)


def pixel_shuffle_3d(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    b, c, f, h, w = x.shape
    x = x.reshape(b, c // (t * s * s), t, s, s, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (t * s * s), f * t, h * s, w * s)


class ResBlock(nn.Module):
    def __init__(self, channels: int, chunk: int, eps: float):
        super().__init__()
        self.conv1 = ChunkConv(channels, channels, chunk, bias=True, act=True)
        self.conv2 = ChunkConv(channels, channels, chunk, bias=False, norm=True, eps=eps)

    def forward(self, x, cache=None):
        return self.conv2(self.conv1(x, cache), cache)


class Down(nn.Module):
    """Conv to cout / (s*s*t) channels, then pixel-unshuffle (s in space, t in time)."""

    def __init__(self, cin: int, cout: int, s: int, t: int, chunk: int):
        super().__init__()
        self.s, self.t = s, t
        self.conv = ChunkConv(cin, cout // (s * s * t), chunk)

    def forward(self, x, cache=None):
        return pixel_unshuffle_3d(self.conv(x, cache), self.s, self.t)


class Up(nn.Module):
    """Conv to cout * s*s*t channels, then pixel-shuffle (s in space, t in time)."""

    def __init__(self, cin: int, cout: int, s: int, t: int, chunk: int):
        super().__init__()
        self.s, self.t = s, t
        self.conv = ChunkConv(cin, cout * s * s * t, chunk)

    def forward(self, x, cache=None):
        return pixel_shuffle_3d(self.conv(x, cache), self.s, self.t)


class Residual(nn.Module):
    """``main(x) + shortcut(x)``; shortcut: identity, channel averaging (down) or duplicating (up)."""

    def __init__(self, main: nn.Module, shortcut: str = "identity", cout: int = 0):
        super().__init__()
        self.main = main
        self.kind, self.cout = shortcut, cout

    def _shortcut(self, x):
        if self.kind == "identity":
            return x
        s, t = self.main.s, self.main.t
        if self.kind == "averaging":
            x = pixel_unshuffle_3d(x, s, t)
            b, c, f, h, w = x.shape
            return x.view(b, self.cout, c // self.cout, f, h, w).mean(dim=2)
        x = x.repeat_interleave(self.cout * s * s * t // x.shape[1], dim=1)
        return pixel_shuffle_3d(x, s, t)

    def forward(self, x, cache=None):
        return self.main(x, cache) + self._shortcut(x)


class Stage(nn.Module):
    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x, cache=None):
        for op in self.op_list:
            x = op(x, cache) if isinstance(op, (ChunkConv, Residual, Up, Down)) else op(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEVConfig):
        super().__init__()
        n, w = cfg.num_stages, cfg.widths
        self.project_in = Down(cfg.in_channels, w[1], 2, 1, cfg.chunk_frames)
        stages = [Stage([])]
        for i in range(1, n):
            ops = [Residual(ResBlock(w[i], cfg.stage_chunk(i), cfg.norm_eps)) for _ in range(cfg.depths[i])]
            if i < n - 1:
                s, t = cfg.down_factors(i)
                ops.append(Residual(Down(w[i], w[i + 1], s, t, cfg.chunk_frames), "averaging", w[i + 1]))
            stages.append(Stage(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = ChunkConv(w[-1], cfg.latent_channels, cfg.chunk_latent_frames)

    def forward(self, x, cache=None):
        x = self.project_in(x, cache)
        for stage in self.stages:
            x = stage(x, cache)
        return self.project_out(x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEVConfig):
        super().__init__()
        n, w = cfg.num_stages, cfg.widths
        self.project_in = ChunkConv(cfg.latent_channels, w[-1], cfg.chunk_latent_frames)
        stages = [Stage([])]
        for i in range(1, n):
            ops = []
            if i < n - 1:
                s, t = cfg.down_factors(i)
                chunk = cfg.chunk_latent_frames if t > 1 else cfg.chunk_frames
                ops.append(Residual(Up(w[i + 1], w[i], s, t, chunk), "duplicating", w[i]))
            ops += [Residual(ResBlock(w[i], cfg.stage_chunk(i), cfg.norm_eps)) for _ in range(cfg.depths[i])]
            stages.append(Stage(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = Stage([RMSNorm3d(w[1], cfg.norm_eps), nn.SiLU(),
                                  Up(w[1], cfg.in_channels, 2, 1, cfg.chunk_frames)])

    def forward(self, z, cache=None):
        x = self.project_in(z, cache)
        for stage in reversed(self.stages):
            x = stage(x, cache)
        return self.project_out(x, cache)


class DCAEV(nn.Module):
    """The DC-AE-V. ``encoder(x, cache)`` / ``decoder(z, cache)`` run one chunk (or a whole clip, cache None)."""

    def __init__(self, config: DCAEVConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        for name, module in self.named_modules():
            if isinstance(module, ChunkConv):
                module.cache_key = name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
