"""Pointing game (Zhang et al. 2016) and energy-based pointing game (Wang et al. 2020)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd
import torch

from ..errors import ConstantHeatmapWarning, InvalidInputError
from ..validation import check_heatmaps, check_masks
from .base import register_metric


def _checked(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.ndim != 3:
        raise InvalidInputError(
            f"heatmaps must be a Tensor[B,H,W], got {getattr(heatmaps, 'shape', type(heatmaps).__name__)}"
        )
    heatmaps = check_heatmaps(heatmaps, tuple(heatmaps.shape))
    masks = check_masks(masks, heatmaps)
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(
            f"masks of samples {empty} are empty: the target class must have a ground-truth region "
            "(drop those samples, as TorchRay skips absent classes)"
        )
    return heatmaps, masks


def max_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """The pointing location (row, col) of each heatmap: LongTensor[B,2].

    Ties: the first maximum in row-major order (numpy's ``argmax``, as TorchRay).
    A constant heatmap has no maximum to speak of: it warns with
    :class:`ConstantHeatmapWarning` and points at pixel (0, 0).
    """
    flat = heatmaps.flatten(1)
    const = (flat.amax(1) == flat.amin(1)).nonzero().flatten().tolist()
    if const:
        warnings.warn(
            f"heatmaps of samples {const} are constant: the pointing game's point is then pixel (0, 0) by the "
            "first-maximum rule, which scores the method by chance",
            ConstantHeatmapWarning,
            stacklevel=3,
        )
    idx = flat.argmax(1)
    w = heatmaps.shape[-1]
    return torch.stack([idx // w, idx % w], 1)


@register_metric(
    "pointing_game",
    paper="Zhang, Bargal, Lin, Brandt, Shen, Sclaroff. Top-down Neural Attention by Excitation Backprop. ECCV 2016 "
    "(protocol as TorchRay's benchmark)",
    higher_is_better=True,
    inputs="masks",
    criterion="localisation",
)
def pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 15) -> torch.Tensor:
    """Pointing game hits: Tensor[B] of 1.0 (hit) / 0.0 (miss).

    heatmaps Tensor[B,H,W], masks bool Tensor[B,H,W] (the target class's region).
    The point is the heatmap's maximum (:func:`max_points`); it hits when some
    ground-truth pixel lies at Euclidean distance < ``tolerance`` pixels (TorchRay:
    15). ``tolerance=0`` means the point itself must lie on the mask (Quantus).
    The data-set score is :func:`pointing_accuracy` (mean over classes).
    """
    heatmaps, masks = _checked(heatmaps, masks)
    if tolerance < 0:
        raise InvalidInputError(f"tolerance must be >= 0 pixels, got {tolerance}")
    b, h, w = heatmaps.shape
    pts = max_points(heatmaps)
    on_mask = masks[torch.arange(b, device=masks.device), pts[:, 0], pts[:, 1]]
    yy = torch.arange(h, device=heatmaps.device, dtype=torch.float32)
    xx = torch.arange(w, device=heatmaps.device, dtype=torch.float32)
    d2 = (yy[None, :, None] - pts[:, 0, None, None]) ** 2 + (xx[None, None, :] - pts[:, 1, None, None]) ** 2
    near = ((d2 < float(tolerance) ** 2) & masks).flatten(1).any(1)
    return (on_mask | near).float()


def pointing_accuracy(hits: Sequence[float] | torch.Tensor, classes: Sequence[int] | torch.Tensor) -> float:
    """TorchRay's data-set pointing accuracy: hit rate per class, then the mean over classes."""
    frame = pd.DataFrame({"hit": torch.as_tensor(hits).float().numpy(), "cls": torch.as_tensor(classes).numpy()})
    if frame.empty:
        raise InvalidInputError("pointing_accuracy needs at least one hit/miss")
    return float(frame.groupby("cls")["hit"].mean().mean())


@register_metric(
    "energy_pointing_game",
    paper="Wang et al. Score-CAM: Score-Weighted Visual Explanations for CNNs. CVPR-W 2020 (energy-based pointing game)",
    higher_is_better=True,
    inputs="masks",
    criterion="localisation",
)
def energy_pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the heatmap's positive mass inside the ground-truth region: Tensor[B] in [0,1].

    sum(relu(h) * mask) / sum(relu(h)); a heatmap with no positive mass scores 0
    and warns with :class:`ConstantHeatmapWarning`.
    """
    heatmaps, masks = _checked(heatmaps, masks)
    pos = heatmaps.clamp(min=0).double()
    total = pos.flatten(1).sum(1)
    inside = (pos * masks).flatten(1).sum(1)
    none = (total <= 0).nonzero().flatten().tolist()
    if none:
        warnings.warn(f"heatmaps of samples {none} have no positive mass; their energy share is 0",
                      ConstantHeatmapWarning, stacklevel=2)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total)).float()
