"""Baselines that put every score in context: random, center, edge.

They ignore the model; a method that does not beat them on a metric has shown
nothing about the model on that metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import generator, register_method


@register_method("random", paper="Baseline: uniform noise (Adebayo et al. 2018 use it as a reference)",
                 family="baseline", needs_grad=False)
def random_heatmap(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [0,1) from a generator seeded with ``seed``: Tensor[B,H,W]."""
    b, _, h, w = images.shape
    return torch.rand(b, h, w, generator=generator(seed)).to(images.device)


@register_method("center", paper="Baseline: centre prior (TorchRay's center baseline, Zhang et al. 2016)",
                 family="baseline", needs_grad=False)
def center(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, sigma: float = 0.25) -> torch.Tensor:
    """A Gaussian centred on pixel (H//2, W//2) with std ``sigma`` x min(H,W): Tensor[B,H,W].

    Its unique maximum is the centre pixel, the pointing game's centre baseline.
    """
    b, _, h, w = images.shape
    s = sigma * min(h, w)
    yy = (torch.arange(h, device=images.device, dtype=torch.float32) - h // 2) ** 2
    xx = (torch.arange(w, device=images.device, dtype=torch.float32) - w // 2) ** 2
    g = torch.exp(-(yy[:, None] + xx[None, :]) / (2 * s * s))
    return g.expand(b, h, w).clone()


@register_method("edge", paper="Baseline: Sobel edge magnitude (Adebayo et al. 2018 compare saliency to an edge detector)",
                 family="baseline", needs_grad=False)
def edge(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the channel-mean image (replicate padding): Tensor[B,H,W]."""
    gray = images.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1).sqrt()
