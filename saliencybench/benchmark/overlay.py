"""``sb.show_heatmap``: a heatmap over its image, the overlay pytorch-grad-cam's ``show_cam_on_image``
and Captum's ``visualize_image_attr`` give, as a matplotlib figure.

Display scaling follows Captum's visualisation: the map is divided by a high
percentile of its absolute values (``clip``, default the 99th) and clipped, so a few
extreme gradient values do not make the rest of the map invisible. Non-negative maps
use a sequential colour map from 0 to 1; maps with negative values a diverging one
centred at 0. The image keeps its aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError


def display_scale(heatmap: np.ndarray, clip: float = 99.0) -> tuple[np.ndarray, bool]:
    """(the map divided by the ``clip`` percentile of |h| and clipped to [-1, 1], whether it is signed)."""
    h = np.asarray(heatmap, dtype=np.float64)
    signed = bool((h < 0).any())
    top = np.percentile(np.abs(h), clip) if h.size else 0.0
    if not top > 0:
        top = float(np.abs(h).max()) or 1.0
    return np.clip(h / top, -1.0, 1.0), signed


def show_heatmap(image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, ax: Any = None,
                 boxes: torch.Tensor | Sequence[Sequence[float]] | None = None, *, alpha: float = 0.5,
                 clip: float = 99.0, cmap: str | None = None, title: str | None = None, colorbar: bool = True) -> Any:
    """Overlay ``heatmap`` [H,W] on ``image`` [3,H,W] (or [H,W,3]) in [0,1]; returns the matplotlib Figure.

    ``boxes``: ground-truth boxes [n,4] (x1, y1, x2, y2, x2/y2 exclusive), drawn in green.
    A heatmap of another size is resized to the image (bilinear). ``ax``: draw into this axes.
    """
    import matplotlib.pyplot as plt

    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).detach().float().cpu()
    if img.ndim == 3 and img.shape[0] == 3:
        img = img.permute(1, 2, 0)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise InvalidInputError(f"image must be [3,H,W] or [H,W,3] in [0,1], got {tuple(img.shape)}")
    heat = torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, torch.Tensor) else heatmap).detach().float()
    heat = heat.cpu().squeeze()
    if heat.ndim != 2:
        raise InvalidInputError(f"heatmap must be [H,W], got {tuple(heat.shape)}")
    if tuple(heat.shape) != tuple(img.shape[:2]):
        heat = torch.nn.functional.interpolate(heat[None, None], size=tuple(img.shape[:2]), mode="bilinear",
                                               align_corners=False)[0, 0]
    shown, signed = display_scale(heat.numpy(), clip)
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.2, 3.2 * img.shape[0] / img.shape[1]))
    else:
        fig = ax.figure
    ax.imshow(img.clamp(0, 1).numpy())
    im = ax.imshow(shown, cmap=cmap or ("RdBu_r" if signed else "inferno"), alpha=alpha,
                   vmin=-1 if signed else 0, vmax=1)
    for x1, y1, x2, y2 in (torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist()
                           if boxes is not None else []):
        ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.2))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=f"map / {clip:g}th pct of |map|")
    return fig
