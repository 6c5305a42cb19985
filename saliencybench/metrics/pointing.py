"""Pointing game (Zhang et al. ECCV 2016) and energy-based pointing game (Wang et al. 2020).

Pointing game protocol (as TorchRay's ``benchmark/pointing_game.py`` and
``examples/attribution_benchmark.py``, facebookresearch/TorchRay):

- the point is the map's maximum; ``ties="first"`` (default) takes the first maximum in
  row-major order (``torch.argmax`` of the flattened map, TorchRay's
  ``_saliency_to_point``); ``ties="any"`` counts a hit if any tied maximum hits
  (Quantus ``PointingGame``: ``any(mask * (a == a.max()))``);
- ``smooth=True``: TorchRay's smoothing of gradient-type maps before the maximum
  (``saliency(..., smooth=0.02)``: ``imsmooth`` with sigma = 0.02 x max(H, W), kernel
  radius ceil(4 sigma), replicate padding, separable vertical then horizontal);
- a hit when some ground-truth pixel lies at squared distance < tolerance^2 from the
  point (TorchRay: 15 px); the point itself on the mask always hits (``tolerance=0``:
  Quantus's rule). ``tolerance=None`` (default): 15 x min(H, W) / 224 rounded to 2
  decimals, TorchRay's 15 px at a 224 px image (the registry resolves it from the
  model-input size, the function from the maps it is given);
- the data-set score is the mean over classes of the per-class hit rate
  (:func:`pointing_accuracy`; the registry's ``class_average``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConstantHeatmapWarning, InvalidInputError
from ..validation import check_heatmaps, check_masks
from .base import Pooled, register_metric

TIES = ("first", "any")
CLASS_AVERAGES = ("present", "all", "none")
POINTING_PAPER = ("Zhang, Bargal, Lin, Brandt, Shen, Sclaroff. Top-down Neural Attention by Excitation Backprop. "
                  "ECCV 2016 (protocol as TorchRay's benchmark)")


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


def default_tolerance(height: int, width: int) -> float:
    """TorchRay's 15 px at 224 px, scaled: ``round(15 * min(H, W) / 224, 2)`` pixels."""
    return round(15 * min(height, width) / 224, 2)


def torchray_smooth(heatmaps: torch.Tensor, fraction: float = 0.02) -> torch.Tensor:
    """TorchRay's ``imsmooth`` as ``saliency(smooth=fraction)`` applies it: Tensor[B,H,W].

    sigma = fraction x max(H, W); 1-D kernel f_i = exp(-(i / (sqrt(2) sigma + eps))^2),
    i in [-ceil(4 sigma), ceil(4 sigma)], normalised to sum 1 (eps = float32 machine
    epsilon, as theirs); replicate padding; vertical then horizontal pass.
    """
    _, h, w = heatmaps.shape
    sigma = fraction * max(h, w)
    radius = math.ceil(4 * sigma)
    i = torch.arange(-radius, radius + 1, dtype=heatmaps.dtype, device=heatmaps.device)
    f = torch.exp(-(i / (math.sqrt(2) * sigma + torch.finfo(torch.float32).eps)) ** 2)
    f = f / f.sum()
    x = F.pad(heatmaps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, f.view(1, 1, -1, 1))
    return F.conv2d(x, f.view(1, 1, 1, -1))[:, 0]


def max_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """The pointing location (row, col) of each heatmap: LongTensor[B,2].

    Ties: the first maximum in row-major order (``argmax`` of the flattened map, as
    TorchRay). A constant heatmap has no maximum to speak of: it warns with
    :class:`ConstantHeatmapWarning` and points at pixel (0, 0).
    """
    flat = heatmaps.flatten(1)
    _warn_constant(flat)
    idx = flat.argmax(1)
    w = heatmaps.shape[-1]
    return torch.stack([idx // w, idx % w], 1)


def _warn_constant(flat: torch.Tensor) -> None:
    const = (flat.amax(1) == flat.amin(1)).nonzero().flatten().tolist()
    if const:
        warnings.warn(
            f"heatmaps of samples {const} are constant: the pointing game's point is then pixel (0, 0) by the "
            "first-maximum rule (every pixel by ties='any'), which scores the method by chance",
            ConstantHeatmapWarning,
            stacklevel=4,
        )


def _any_tied_hit(heatmaps: torch.Tensor, masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Hit Tensor[B] of bool where some tied maximum lies on the mask or at squared distance
    < tolerance^2 of it (distances from the exact nearest mask pixel, scipy's EDT indices)."""
    from scipy import ndimage  # scipy is imported by the metrics that use it, on first use

    flat = heatmaps.flatten(1)
    _warn_constant(flat)
    tied = (heatmaps == flat.amax(1)[:, None, None]).cpu().numpy()
    m = masks.cpu().numpy()
    hits = np.zeros(len(m), dtype=bool)
    h, w = m.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    for i in range(len(m)):
        if (tied[i] & m[i]).any():
            hits[i] = True
            continue
        iy, ix = ndimage.distance_transform_edt(~m[i], return_distances=False, return_indices=True)
        d2 = (yy - iy) ** 2 + (xx - ix) ** 2
        hits[i] = bool((d2[tied[i]] < tolerance ** 2).any())
    return torch.from_numpy(hits).to(heatmaps.device)


def _check_tolerance(tolerance: Any, h: int, w: int) -> float:
    if tolerance is None:
        return default_tolerance(h, w)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise InvalidInputError(f"tolerance must be a finite number of pixels >= 0 (or None), got {tolerance!r}")
    if tolerance < 0:
        raise InvalidInputError(f"tolerance must be >= 0 pixels, got {tolerance}")
    return float(tolerance)


def pointing_reduce(pool: Pooled, params: Mapping[str, Any]) -> float:
    """The registry's data-set score of ``pointing_game`` by ``params["class_average"]``:
    ``"present"`` (default) the mean of per-class hit rates over the classes present in
    ``pool.labels``; ``"all"`` over all ``pool.n_classes`` classes, absent ones 0
    (TorchRay); ``"none"`` the mean over images. NaN values (not scored) are left out."""
    mode = params.get("class_average", "present")
    if mode not in CLASS_AVERAGES:
        raise InvalidInputError(f"class_average must be one of {list(CLASS_AVERAGES)}, got {mode!r}")
    values = np.asarray(pool.values, dtype=float)
    ok = np.isfinite(values)
    if not ok.any():
        return float("nan")
    if mode == "none":
        return float(values[ok].mean())
    if pool.labels is None:
        raise InvalidInputError(f"class_average={mode!r} needs the samples' classes (Pooled.labels); "
                                "use class_average='none' for the mean over images")
    if mode == "all" and pool.n_classes is None:
        raise InvalidInputError("class_average='all' needs the data set's number of classes (Pooled.n_classes); "
                                "use 'present' to average over the classes present")
    return pointing_accuracy(values[ok], np.asarray(pool.labels)[ok], pool.n_classes if mode == "all" else None)


@register_metric(
    "pointing_game",
    paper=POINTING_PAPER,
    higher_is_better=True,
    inputs="masks",
    criterion="localisation",
    heatmap="as_is",
    scaled=lambda h, w: {"tolerance": default_tolerance(h, w)},
    reduce=pointing_reduce,
    constraints={"tolerance": ">=0", "ties": TIES, "class_average": CLASS_AVERAGES},
)
def pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor, *, tolerance: float | None = None,
                  ties: str = "first", smooth: bool = False, class_average: str = "present") -> torch.Tensor:
    """Pointing game hits: Tensor[B] of 1.0 (hit) / 0.0 (miss).

    heatmaps Tensor[B,H,W], masks bool Tensor[B,H,W] (the target class's region). The
    point, ties, smoothing and tolerance follow the module docstring (``tolerance=None``:
    15 x min(H, W) / 224 px; ``ties="first"``: the first maximum is scored). Empty masks
    are errors. ``class_average`` (``"present"``, ``"all"``, ``"none"``) only says how
    the registry pools the hits (:func:`pointing_reduce`); the hits do not depend on it.
    """
    heatmaps, masks = _checked(heatmaps, masks)
    b, h, w = heatmaps.shape
    tol = _check_tolerance(tolerance, h, w)
    if ties not in TIES:
        raise InvalidInputError(f"ties must be one of {list(TIES)}, got {ties!r}")
    if class_average not in CLASS_AVERAGES:
        raise InvalidInputError(f"class_average must be one of {list(CLASS_AVERAGES)}, got {class_average!r}")
    if not isinstance(smooth, bool):
        raise InvalidInputError(f"smooth must be True or False, got {smooth!r}")
    if smooth:
        heatmaps = torchray_smooth(heatmaps)
    if ties == "any":
        return _any_tied_hit(heatmaps, masks, tol).float()
    pts = max_points(heatmaps)
    on_mask = masks[torch.arange(b, device=masks.device), pts[:, 0], pts[:, 1]]
    yy = torch.arange(h, device=heatmaps.device, dtype=torch.float32)
    xx = torch.arange(w, device=heatmaps.device, dtype=torch.float32)
    d2 = (yy[None, :, None] - pts[:, 0, None, None]) ** 2 + (xx[None, None, :] - pts[:, 1, None, None]) ** 2
    near = ((d2 < tol ** 2) & masks).flatten(1).any(1)
    return (on_mask | near).float()


def pointing_accuracy(hits: Sequence[float] | torch.Tensor | np.ndarray, classes: Sequence[int] | torch.Tensor |
                      np.ndarray, n_classes: int | None = None) -> float:
    """Pointing accuracy: the hit rate of each class, averaged over classes.

    ``n_classes=None`` (default): over the classes present in ``classes``. With
    ``n_classes``: over all classes 0 .. n_classes-1, a class with no sample counting 0
    (TorchRay's ``PointingGame.accuracy``: hits / max(hits + misses, 1), then the mean);
    the two agree when every class is present.
    """
    hit = torch.as_tensor(hits).double().cpu().numpy().ravel()
    cls = torch.as_tensor(classes).cpu().numpy().ravel()
    if len(hit) == 0:
        raise InvalidInputError("pointing_accuracy needs at least one hit/miss")
    if len(cls) != len(hit):
        raise InvalidInputError(f"pointing_accuracy needs one class per hit, got {len(hit)} hits, {len(cls)} classes")
    if not np.isfinite(hit).all():
        raise InvalidInputError("pointing_accuracy: hits must be finite (0/1); drop the samples not scored")
    if not np.issubdtype(cls.dtype, np.integer) or (cls < 0).any():
        raise InvalidInputError("pointing_accuracy: classes must be non-negative integer class indices")
    cls = cls.astype(np.int64)
    if n_classes is not None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise InvalidInputError(f"n_classes must be a positive integer, got {n_classes!r}")
        if cls.max() >= n_classes:
            raise InvalidInputError(f"classes must be < n_classes={n_classes}, got class {int(cls.max())}")
    size = int(max(cls.max() + 1, n_classes or 0))
    sums = np.bincount(cls, weights=hit, minlength=size)
    counts = np.bincount(cls, minlength=size)
    if n_classes is None:
        present = counts > 0
        return float((sums[present] / counts[present]).mean())
    return float((sums / np.maximum(counts, 1)).mean())


@register_metric(
    "energy_pointing_game",
    paper="Wang et al. Score-CAM: Score-Weighted Visual Explanations for CNNs. CVPR-W 2020 "
    "(energy-based pointing game)",
    higher_is_better=True,
    inputs="masks",
    criterion="localisation",
    heatmap="positive",
)
def energy_pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the heatmap's positive mass inside the ground-truth region: Tensor[B] in [0,1].

    sum(relu(h) * mask) / sum(relu(h)) (registered with ``heatmap="positive"``); a
    heatmap with no positive mass scores 0 and warns with :class:`ConstantHeatmapWarning`.
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
