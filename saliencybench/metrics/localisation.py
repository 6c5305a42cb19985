"""Box IoU and localisation accuracy from thresholded heatmaps (CAM / Grad-CAM protocol).

Protocol. Keep pixels >= ``threshold`` x the heatmap's maximum (Grad-CAM: 0.15;
CAM: 0.20), take the largest 8-connected component (ties: the one met first in
row-major order), its bounding box (x1, y1, x2, y2) with x2, y2 exclusive, and
the best IoU with the ground-truth boxes. A heatmap with no positive value has
no box: IoU 0 and a flag. Localisation is correct at IoU >= 0.5, combined with
top-1 / top-5 classification for the localisation error (Russakovsky et al.).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..errors import InvalidInputError
from ..validation import check_boxes, check_heatmaps
from .base import register_metric

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def heatmap_box(heatmap: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Bounding box Tensor[4] (x1, y1, x2, y2) of the largest 8-connected component of
    ``heatmap[H,W] >= threshold * max``; ``None`` when the heatmap has no positive value."""
    h = heatmap.detach().float().cpu().numpy()
    peak = h.max()
    if not peak > 0:
        return None
    labels, n = ndimage.label(h >= threshold * peak, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    rows, cols = np.nonzero(labels == int(sizes.argmax()))
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


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
    ranked=False,
)
def box_iou(
    heatmaps: torch.Tensor, boxes: list[torch.Tensor], *, threshold: float = 0.15, return_boxes: bool = False,
):
    """Best IoU of the heatmap's box with the ground-truth boxes: Tensor[B] in [0,1].

    heatmaps Tensor[B,H,W]; boxes a list of B float Tensors[n_i,4] (x1, y1, x2, y2),
    x2/y2 exclusive. With ``return_boxes=True`` also returns the predicted boxes
    Tensor[B,4] (NaN where none) and ``no_box`` bool Tensor[B] (no positive value).
    """
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.ndim != 3:
        raise InvalidInputError(f"heatmaps must be a Tensor[B,H,W], got {getattr(heatmaps, 'shape', heatmaps)}")
    heatmaps = check_heatmaps(heatmaps, tuple(heatmaps.shape))
    if not 0 < threshold <= 1:
        raise InvalidInputError(f"threshold is a fraction of the maximum in (0, 1], got {threshold}")
    b, h, w = heatmaps.shape
    gt = check_boxes(boxes, b, h, w)
    ious = torch.zeros(b)
    pred = torch.full((b, 4), float("nan"))
    no_box = torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        box = heatmap_box(heatmaps[i], threshold)
        if box is None:
            no_box[i] = True
            continue
        pred[i] = box
        ious[i] = iou(box, gt[i]).max()
    ious = ious.to(heatmaps.device)
    return (ious, pred, no_box) if return_boxes else ious


def localisation_correct(ious: torch.Tensor, class_correct: torch.Tensor | None = None, min_iou: float = 0.5):
    """Localisation correctness Tensor[B] of bool: IoU >= ``min_iou`` (and the class in top-k, if given)."""
    ok = ious >= min_iou
    return ok if class_correct is None else ok & class_correct.to(ok.device).bool()
