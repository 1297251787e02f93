"""DC-AE (deep compression autoencoder) in plain PyTorch.

Submodule and parameter names match diffusers' ``AutoencoderDC`` so that a
diffusers-layout state dict loads with ``strict=True``; the arithmetic follows
the same order so results agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DCAEConfig

# Activations run channels-last (NHWC) inside the encoder and decoder: the full-resolution 3x3
# convolutions are up to 1.5x faster that way on oneDNN (CPU) and cuDNN, and every op here keeps the
# format. Inputs and outputs stay ordinary contiguous NCHW tensors.
_CONV_FORMAT = torch.channels_last

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "mish": nn.Mish}


def _add_residual(y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``y + residual``, written into the fresh ``y`` when no autograd graph is recorded (inference)."""
    return y + residual if torch.is_grad_enabled() else y.add_(residual)


def make_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation '{name}' is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channel axis of an NCHW tensor, with weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        if torch.is_grad_enabled():
            return x * self.weight[:, None, None] + self.bias[:, None, None]
        return x.mul_(self.weight[:, None, None]).add_(self.bias[:, None, None])  # same math, no extra buffers


def make_norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return ChannelRMSNorm(channels)
    if norm_type == "batch_norm":
        return nn.BatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"norm '{norm_type}' is not supported; known: rms_norm, batch_norm")


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm_type: str, act_fn: str):
        super().__init__()
        self.nonlinearity = make_activation(act_fn)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = make_norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_residual(self.norm(self.conv2(self.nonlinearity(self.conv1(x)))), x)


class MultiscaleProjection(nn.Module):
    """Depthwise k x k then grouped 1x1 conv over the stacked q, k, v channels."""

    def __init__(self, inner_dim: int, num_heads: int, kernel_size: int):
        super().__init__()
        channels = 3 * inner_dim
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0, groups=3 * num_heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class LiteMLA(nn.Module):
    """EfficientViT multi-scale ReLU linear attention (``SanaMultiscaleLinearAttention``)."""

    eps = 1e-15

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        num_heads = channels // head_dim
        inner = num_heads * head_dim
        self.head_dim = head_dim
        self.norm_type = norm_type
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(inner, num_heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm_type, channels)

    def _linear_attention(self, q, k, v):
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)  # extra row of ones yields the normaliser
        out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q).float()
        return out[:, :, :-1] / (out[:, :, -1:] + self.eps)

    def _quadratic_attention(self, q, k, v):
        scores = torch.matmul(k.transpose(-1, -2), q).float()
        scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
        return torch.matmul(v, scores.to(v.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = x.dtype
        # Tiny feature maps use the exact quadratic form, as the reference implementation does.
        use_linear = h * w > self.head_dim
        cl = x.movedim(1, -1)
        qkv = torch.cat([self.to_q(cl), self.to_k(cl), self.to_v(cl)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], dim=1)
        if use_linear:
            qkv = qkv.float()
        # Groups of 3*head_dim consecutive channels form one head (the original fused-qkv layout).
        q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, h * w).chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        if use_linear:
            out = self._linear_attention(q, k, v).to(dtype)
        else:
            out = self._quadratic_attention(q, k, v)
        out = self.to_out(out.reshape(b, -1, h, w).movedim(1, -1)).movedim(-1, 1)
        return _add_residual(self.norm_out(out), x)


class GLUMBConv(nn.Module):
    """Inverted bottleneck with a gated depthwise conv; RMS-normed, residual."""

    def __init__(self, channels: int, expand_ratio: int = 4):
        super().__init__()
        hidden = expand_ratio * channels
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(channels, hidden * 2, 1, 1, 0)
        self.conv_depth = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2)
        self.conv_point = nn.Conv2d(hidden, channels, 1, 1, 0, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_depth(self.nonlinearity(self.conv_inverted(x)))
        y, gate = y.chunk(2, dim=1)
        y = self.conv_point(y * self.nonlinearity(gate))
        return _add_residual(self.norm(y), x)


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DCDownBlock2d(nn.Module):
    """2x downsample: strided conv or conv + pixel-unshuffle, optional space-to-channel averaging shortcut."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group_size = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if pixel_unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, 3, stride=1 if pixel_unshuffle else 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.pixel_unshuffle:
            y = F.pixel_unshuffle(y, 2)
        if self.shortcut:
            y = y + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return y


class DCUpBlock2d(nn.Module):
    """2x upsample: nearest interpolate + conv, or conv + pixel-shuffle; optional channel-duplicating shortcut."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = out_channels * 4 // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else out_channels * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            y = y + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        return y


def _make_block(block_type: str, channels: int, cfg: DCAEConfig, norm_type: str, act_fn: str, scales) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    return EfficientViTBlock(channels, cfg.attention_head_dim, scales, norm_type)


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        pixel_unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1)
        else:  # an empty first stage is replaced by a downsampling stem
            self.conv_in = DCDownBlock2d(cfg.in_channels, widths[1], pixel_unshuffle, shortcut=False)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            blocks = [
                _make_block(cfg.encoder_block_types[i], width, cfg, "rms_norm", "silu", cfg.encoder_qkv_multiscales[i])
                for _ in range(depth)
            ]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DCDownBlock2d(width, widths[i + 1], pixel_unshuffle, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, 1, 1)
        self.out_shortcut = cfg.encoder_out_shortcut
        self.out_group_size = widths[-1] // cfg.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x.contiguous(memory_format=_CONV_FORMAT))
        for stage in self.down_blocks:
            x = stage(x)
        y = self.conv_out(x)
        if self.out_shortcut:
            y = y + x.unflatten(1, (-1, self.out_group_size)).mean(dim=2)
        return y.contiguous()


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.in_repeats = widths[-1] // cfg.latent_channels
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            blocks = []
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DCUpBlock2d(widths[i + 1], width, interpolate, shortcut=True))
            blocks += [
                _make_block(cfg.decoder_block_types[i], width, cfg, cfg.decoder_norm_types[i],
                            cfg.decoder_act_fns[i], cfg.decoder_qkv_multiscales[i])
                for _ in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)  # indexed like the encoder; run last to first
        head_channels = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = ChannelRMSNorm(head_channels)
        self.conv_act = make_activation(cfg.decoder_conv_act_fn)
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(head_channels, cfg.in_channels, 3, 1, 1)
        else:  # an empty first stage is replaced by an upsampling head
            self.conv_out = DCUpBlock2d(head_channels, cfg.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.contiguous(memory_format=_CONV_FORMAT)
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            x = stage(x)
        return self.conv_out(self.conv_act(self.norm_out(x))).contiguous()


class DCAE(nn.Module):
    """DC-AE encoder/decoder. ``encode`` returns the raw latent; ``decode`` returns an image in [-1, 1] scale.

    No scaling factor is applied here: callers multiply latents by
    ``config.scaling_factor`` after encoding and divide before decoding.
    """

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode(self, x: torch.Tensor, tiled: bool | None = False) -> torch.Tensor:
        """Image (B, C, H, W), H and W multiples of ``spatial_compression`` -> latent (B, latent_C, H/f, W/f).

        ``tiled=None`` tiles only when the estimated activation memory does not fit the device.
        """
        f = self.spatial_compression
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"DC-AE encode: expected height and width divisible by {f}, found {tuple(x.shape[-2:])}")
        x = x.to(device=self.device, dtype=self.dtype)
        from .tiling import encode_tiled, should_tile_encode

        if tiled or (tiled is None and should_tile_encode(self.config, x.shape, x.dtype, x.device)):
            return encode_tiled(self, x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latent (B, latent_C, h, w) -> image (B, C, h*f, w*f).

        ``tiled=None`` tiles only when the estimated activation memory does not fit the device.
        """
        z = z.to(device=self.device, dtype=self.dtype)
        from .tiling import decode_tiled, should_tile_decode

        if tiled or (tiled is None and should_tile_decode(self.config, z.shape, z.dtype, z.device)):
            return decode_tiled(self, z)
        return self.decoder(z)
