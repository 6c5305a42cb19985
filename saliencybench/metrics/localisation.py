"""Box IoU and localisation accuracy from thresholded heatmaps (CAM / Grad-CAM protocols).

Normalisation. Each heatmap is normalised on its own before any threshold:
``normalise="minmax"`` (default) maps it to [0, 1] by ``(h - min) / (max - min)``,
what the CAM authors' PyTorch code (``returnCAM``) and the Grad-CAM authors' code do;
an offset (RISE's maps carry a large one) is removed, so an offset plus a bump gives
the bump's box. ``normalise="max"`` divides by the maximum only (the old rule, a
fraction of the maximum without offset removal). A map that ``minmax`` cannot
normalise (constant) or ``max`` cannot (no positive value) has no box.

Box protocols (``box_protocol``):

- ``"largest_component"`` (default; the CAM paper's rule, Zhou et al. CVPR 2016,
  Sec. 4.1, and Grad-CAM's, Selvaraju et al. ICCV 2017): keep pixels with normalised
  value >= ``threshold``, take the largest 8-connected component (pixel count; ties:
  the one met first in row-major order) and its bounding box. ``threshold=0.15`` is
  Grad-CAM's; 0.20 is the CAM paper's threshold.
- ``"cam_code"``: the box generator the CAM authors released
  (metalbubble/CAM ``bboxgenerator/dt_box.cpp`` + ``dt.c``, driven by
  ``generate_bbox.m`` / ``ILSVRC_evaluate_bbox.m``), written here from its behaviour,
  see :func:`cam_code_box`. It has its own normalisation and thresholds:
  ``normalise`` and ``threshold`` do not apply to it.

Boxes are (x1, y1, x2, y2) with x2, y2 exclusive. Localisation is correct at IoU >= 0.5
with some ground-truth box, combined with top-1 / top-5 classification for the
localisation error (Russakovsky et al. IJCV 2015): :func:`localisation_correct`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..validation import check_boxes, check_heatmaps
from .base import register_metric

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
NORMALISATIONS = ("minmax", "max")
BOX_PROTOCOLS = ("largest_component", "cam_code")
CAM_CODE_THRESHOLDS = (20, 100, 110)  # generate_bbox.m's bbox_threshold, gray levels of 255
CAM_CODE_MARGIN = 5  # dt_box.cpp's getBBox keeps boxes 5 px short of the right and bottom edges
CAM_CODE_EROSION = 10  # dt_box.cpp's fromDT: keep distance-transform levels > 10 of 255


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; raises :class:`InvalidInputError` for non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else :class:`InvalidInputError` listing them."""
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_heatmap_batch(heatmaps: Any) -> torch.Tensor:
    """A finite float Tensor[B,H,W] (B >= 1); raises :class:`InvalidInputError` otherwise."""
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.ndim != 3 or heatmaps.shape[0] == 0:
        raise InvalidInputError(
            f"heatmaps must be a Tensor[B,H,W] with B >= 1, got {getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    return check_heatmaps(heatmaps, tuple(heatmaps.shape))


def normalise_heatmaps(heatmaps: torch.Tensor, normalise: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image normalised heatmaps Tensor[B,H,W] (float64) and ``valid`` bool Tensor[B].

    ``minmax``: ``(h - min) / (max - min)`` (as ``normalize_scoremap`` of Choe et al.'s
    wsolevaluation: subtract the minimum, divide by the new maximum; a constant map
    gives zeros and ``valid`` False). ``max``: ``h / max`` (``valid`` False, zeros, where
    the maximum is not positive).
    """
    check_choice("normalise", normalise, NORMALISATIONS)
    h = heatmaps.detach().double()
    flat = h.flatten(1)
    hi = flat.amax(1)[:, None, None]
    if normalise == "minmax":
        shifted = h - flat.amin(1)[:, None, None]
        top = shifted.flatten(1).amax(1)[:, None, None]
        valid = top.flatten() > 0
        out = torch.where(top > 0, shifted / top.clamp(min=1e-300), torch.zeros_like(h))
    else:
        valid = hi.flatten() > 0
        out = torch.where(hi > 0, h / hi.clamp(min=1e-300), torch.zeros_like(h))
    return out, valid


def _component_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes int[n,4] (x1, y1, x2, y2 exclusive) and pixel counts int[n] of the 8-connected
    components of ``mask[H,W]``, in row-major order of their first pixel."""
    from scipy import ndimage  # scipy is imported by the metrics that use it, on first use

    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64)
    slices = ndimage.find_objects(labels)
    boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.int64)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return boxes, sizes


def largest_component_box(mask: np.ndarray) -> torch.Tensor | None:
    """Box Tensor[4] of the largest 8-connected component of bool ``mask[H,W]`` (ties: the
    first in row-major order), or ``None`` for an empty mask."""
    boxes, sizes = _component_boxes(mask)
    if len(sizes) == 0:
        return None
    return torch.tensor(boxes[int(sizes.argmax())], dtype=torch.float32)


def _cam_code_erode(fg: np.ndarray) -> np.ndarray:
    """dt_box.cpp's ``fromDT`` after the gray threshold: the Euclidean distance of each
    foreground pixel to the nearest background pixel of the image (Felzenszwalb's exact
    transform in ``dt.c``; scipy's ``distance_transform_edt`` is the same exact distance),
    scaled by ``255 / max`` and rounded half up (``double_to_image``), kept where > 10.
    A mask without background or without foreground is left as it is (``double_to_image``
    returns early when min == max)."""
    from scipy import ndimage  # scipy is imported by the metrics that use it, on first use

    if fg.all() or not fg.any():
        return fg
    dist = ndimage.distance_transform_edt(fg)
    scale = 255.0 / dist.max()
    level = np.floor(dist * scale + 0.5)
    return level > CAM_CODE_EROSION


def cam_code_box(heatmap: torch.Tensor) -> torch.Tensor | None:
    """The box of the CAM authors' released generator for ``heatmap[H,W]``: Tensor[4] or ``None``.

    Behaviour of metalbubble/CAM (checked against ``ILSVRC_generate_heatmap.m``,
    ``generate_bbox.m``, ``bboxgenerator/dt_box.cpp`` and ``dt.c`` at commit c63f285):

    1. the map divided by its maximum and written as an 8-bit gray image (MATLAB
       ``imwrite``: values clipped to [0, 1], ``round(255 v)``); the JPEG compression
       of the released pipeline is not reproduced. No positive value: no box;
    2. for each gray threshold 20, 100, 110 (about 8%, 39%, 43% of the maximum):
       foreground = gray > t (``cvThreshold`` BINARY), eroded by the distance transform
       (:func:`_cam_code_erode`: kept where round(255 d / d_max) > 10);
    3. the bounding rectangle (x, y, w, h) of every contour of the eroded mask
       (``findContours`` RETR_CCOMP: outer borders, which are the 8-connected
       components, and hole borders, whose rectangles lie inside their component's and
       so never win step 4), clipped by ``getBBox``: x = min(x, W - 5), y = min(y, H - 5),
       w = min(w, W - x_raw - 5), h = min(h, H - y_raw - 5), i.e. 5 px short of the right
       and bottom edges (a component within the last 4 columns gets a negative width,
       whose corners MATLAB's min/max then swap; reproduced);
    4. all rectangles of the three thresholds ranked by area w * h, largest first
       (``rankBBox``); the first is the box (``boxData_formulate(1,:)``, the one
       ``ILSVRC_evaluate_bbox.m`` scores as "bbox1"; the later ``mergeBBox`` only removes
       boxes after it). Ties: the first by threshold, then row-major order
       (``std::sort`` leaves ties unspecified).

    The box is (x, y, x + w, y + h), x2/y2 exclusive, in the map's pixels.
    """
    h = heatmap.detach().double().cpu().numpy()
    peak = h.max()
    if not peak > 0:
        return None
    gray = np.floor(np.clip(h / peak, 0.0, 1.0) * 255.0 + 0.5)
    height, width = gray.shape
    best, best_area = None, None
    for t in CAM_CODE_THRESHOLDS:
        boxes, _ = _component_boxes(_cam_code_erode(gray > t))
        for x1, y1, x2, y2 in boxes.tolist():
            x = min(x1, width - CAM_CODE_MARGIN)
            y = min(y1, height - CAM_CODE_MARGIN)
            w = min(x2 - x1, width - x1 - CAM_CODE_MARGIN)
            hh = min(y2 - y1, height - y1 - CAM_CODE_MARGIN)
            if best_area is None or w * hh > best_area:
                best_area = w * hh
                best = [min(x, x + w), min(y, y + hh), max(x, x + w), max(y, y + hh)]
    return None if best is None else torch.tensor(best, dtype=torch.float32)


def heatmap_box(heatmap: torch.Tensor, threshold: float = 0.15, *, normalise: str = "minmax",
                box_protocol: str = "largest_component") -> torch.Tensor | None:
    """Bounding box Tensor[4] (x1, y1, x2, y2, x2/y2 exclusive) of ``heatmap[H,W]`` by
    ``box_protocol`` (module docstring), or ``None`` when the map has no box (it cannot
    be normalised, or nothing is kept)."""
    if not isinstance(heatmap, torch.Tensor) or heatmap.ndim != 2:
        raise InvalidInputError(f"heatmap must be a Tensor[H,W], got {getattr(heatmap, 'shape', heatmap)}")
    heat = check_heatmap_batch(heatmap[None])
    threshold = _check_threshold(threshold)
    check_choice("box_protocol", box_protocol, BOX_PROTOCOLS)
    check_choice("normalise", normalise, NORMALISATIONS)
    if box_protocol == "cam_code":
        return cam_code_box(heat[0])
    norm, valid = normalise_heatmaps(heat, normalise)
    if not bool(valid[0]):
        return None
    return largest_component_box((norm[0] >= threshold).cpu().numpy())


def _check_threshold(threshold: Any) -> float:
    threshold = check_finite("threshold", threshold)
    if not 0 < threshold <= 1:
        raise InvalidInputError(f"threshold is a fraction of the normalised map in (0, 1], got {threshold}")
    return threshold


def iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one box Tensor[4] with boxes Tensor[n,4] (x2, y2 exclusive): Tensor[n]."""
    ix = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    iy = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


@register_metric(
    "box_iou",
    paper="Zhou et al. CAM, CVPR 2016; Selvaraju et al. Grad-CAM, ICCV 2017 (weakly supervised localisation)",
    higher_is_better=True,
    inputs="boxes",
    criterion="localisation",
    heatmap="as_is",
    ranked=False,
    unit="IoU",
    constraints={"threshold": "(0,1]", "normalise": NORMALISATIONS, "box_protocol": BOX_PROTOCOLS},
)
def box_iou(
    heatmaps: torch.Tensor, boxes: list[torch.Tensor], *, threshold: float = 0.15, normalise: str = "minmax",
    box_protocol: str = "largest_component", return_boxes: bool = False,
):
    """Best IoU of each heatmap's box with its ground-truth boxes: Tensor[B] in [0,1].

    heatmaps Tensor[B,H,W]; boxes a list of B float Tensors[n_i,4] (x1, y1, x2, y2),
    x2/y2 exclusive. The heatmap is normalised (``normalise``, default ``minmax``) and
    its box found by ``box_protocol`` (default ``largest_component`` at ``threshold``,
    0.15 as Grad-CAM; 0.20 is the CAM paper's threshold; ``cam_code``: the CAM
    authors' released generator, its own fixed thresholds): see the module docstring.
    A fixed-threshold diagnostic (the threshold decides much of the score, Choe et al.
    CVPR 2020): registered unranked; :func:`~saliencybench.metrics.wsol.max_box_acc` is
    the ranked protocol. With ``return_boxes=True`` also returns the predicted boxes
    Tensor[B,4] (NaN where none) and ``no_box`` bool Tensor[B] (IoU 0 there).
    """
    heatmaps = check_heatmap_batch(heatmaps)
    threshold = _check_threshold(threshold)
    check_choice("normalise", normalise, NORMALISATIONS)
    check_choice("box_protocol", box_protocol, BOX_PROTOCOLS)
    b, h, w = heatmaps.shape
    gt = check_boxes(boxes, b, h, w)
    ious = torch.zeros(b)
    pred = torch.full((b, 4), float("nan"))
    no_box = torch.zeros(b, dtype=torch.bool)
    if box_protocol == "largest_component":
        norm, valid = normalise_heatmaps(heatmaps, normalise)
        masks = (norm >= threshold).cpu().numpy()
        found = [largest_component_box(masks[i]) if bool(valid[i]) else None for i in range(b)]
    else:
        found = [cam_code_box(heatmaps[i]) for i in range(b)]
    for i, box in enumerate(found):
        if box is None:
            no_box[i] = True
            continue
        pred[i] = box
        ious[i] = iou(box, gt[i]).max()
    ious = ious.to(heatmaps.device)
    return (ious, pred, no_box) if return_boxes else ious


def localisation_correct(ious: torch.Tensor, class_correct: torch.Tensor | None = None,
                         min_iou: float = 0.5) -> torch.Tensor:
    """Localisation correctness Tensor[B] of bool: IoU >= ``min_iou`` (and the class in top-k, if given).

    The ILSVRC localisation error (Russakovsky et al. IJCV 2015; CAM and Grad-CAM report
    top-1 / top-5 error) is ``1 - mean(localisation_correct(box_iou(...), top_k_correct))``
    at a fixed threshold; ``class_correct`` bool Tensor[B] says whether the label is among
    the top-k predictions.
    """
    min_iou = check_finite("min_iou", min_iou)
    if not 0 < min_iou <= 1:
        raise InvalidInputError(f"min_iou must be in (0, 1], got {min_iou}")
    ok = ious >= min_iou
    return ok if class_correct is None else ok & class_correct.to(ok.device).bool()
