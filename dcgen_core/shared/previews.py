"""Latent previews for DC-AE latents.

ComfyUI previews latents with a linear map latent -> RGB ("Latent2RGB").
DC-AE has no published factors, so we fit them when a DC-AE is loaded: encode
a few smooth colour fields, and solve a ridge regression from the (scaled)
latent pixels to the average colour of the image patch each latent pixel covers.
The fit takes one small encoder pass and is stored per latent channel count,
which is what a ComfyUI latent format knows about.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_registry: dict[int, tuple[list[list[float]], list[float]]] = {}


def _smooth_colour_fields(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


@torch.no_grad()
def fit_latent_rgb(encode, spatial_compression: int, scaling_factor: float, images: int = 8,
                   grid: int = 8, ridge: float = 1e-2) -> tuple[list[list[float]], list[float]]:
    """Fit (factors [C][3], bias [3]) so that rgb ~= scaled_latent @ factors + bias.

    ``encode`` maps images in [-1, 1] (B, 3, H, W) to raw latents.
    """
    g = torch.Generator().manual_seed(0)
    size = spatial_compression * grid
    pixels = _smooth_colour_fields(images, size, g)
    latents = encode(pixels).float() * scaling_factor
    target = F.avg_pool2d(pixels, spatial_compression)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    eye = torch.eye(x1.shape[1], dtype=torch.float64) * ridge
    eye[-1, -1] = 0
    w = torch.linalg.solve(x1.T @ x1 + eye, x1.T @ y.double()).float()
    return w[:-1].tolist(), w[-1].tolist()


def register(latent_channels: int, factors, bias):
    _registry[latent_channels] = (factors, bias)


def lookup(latent_channels: int):
    return _registry.get(latent_channels, (None, None))
