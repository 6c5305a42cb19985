"""Threshold-free weakly supervised localisation: MaxBoxAccV2 and PxAP.

Choe, Oh, Lee, Chun, Akata, Shim. Evaluating Weakly Supervised Object Localization
Methods Right. CVPR 2020 (code: clovaai/wsolevaluation, ``evaluation.py``,
``inference.py``). A fixed CAM threshold decides much of a box score; these report
the score at the best threshold of a sweep. When a paper's number is reproduced the
best threshold should be chosen on a held-out split (their ``train-fullsup``); here it
is chosen on the scored images themselves (as their ``compute()`` does on any split).

Common steps, as their code: each map is min-max normalised on its own
(``normalize_scoremap``: subtract the minimum, divide by the new maximum; a constant map
becomes all zeros); the CAM thresholds default to ``np.arange(0, 1, 0.01)``
(0.00 .. 0.99, their ``cam_curve_interval=0.01``).

MaxBoxAccV2 (``compute_bboxes_from_scoremaps`` with ``multi_contour_eval=True`` and
``BoxEvaluator``): the normalised map is quantised to 8 bits (``(s * 255)`` cast to
uint8, i.e. floored); at CAM threshold tau the foreground is gray > ``int(tau * max
gray)`` (``cv2.threshold`` BINARY is a strict comparison); the boxes are the bounding
rectangles of all contours ``cv2.findContours(RETR_TREE)`` returns: those of the
8-connected foreground components and those of the holes (4-connected background
components not reaching the image border), whose border-following rectangle is the hole's
box grown by one pixel on each side (checked against OpenCV on thousands of random masks,
see the tests). A sample is correct at IoU delta when its best box overlaps some
ground-truth box by IoU >= delta; BoxAcc(tau, delta) is the mean over samples,
MaxBoxAcc(delta) its maximum over tau, MaxBoxAccV2 the mean over delta in
{0.3, 0.5, 0.7}. Two deliberate differences, both in their box arithmetic: their code
takes ``x + w`` of ``cv2.boundingRect`` as an inclusive corner (clipped to W - 1) and
adds 1 to every side in the IoU, so both boxes count one pixel wider and taller; here
IoU is that of the exact pixel boxes (x2, y2 exclusive), as in :mod:`.localisation`.
And a threshold with no foreground gives their code a dummy box (0, 0, 0, 0), a 1x1
pixel box at the origin; here it gives no box (a miss).

PxAP (``MaskEvaluator``): all pixels of all images pooled; at each threshold t of the
sweep and at 1.0, TP(t) / FP(t) = ground-truth positive / negative pixels with normalised
score >= t (their histogram bins [t_k, t_k+1)); precision = TP / (TP + FP), recall =
TP / P; AP = sum over thresholds in descending order of precision_k (recall_k -
recall_k-1), starting from recall 0 and skipping thresholds with no prediction. Their
``num_gt_true`` counts the positives with score >= the lowest threshold: all of them for
thresholds starting at 0 (theirs always do); P here is all positives. Their ignore
region (OpenImages' ``_ignore`` masks) is not modelled: every pixel is positive or
negative. Both scores are in [0, 1] (theirs x 100).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..validation import check_boxes, check_masks
from .base import Pooled, register_metric
from .localisation import check_heatmap_batch, normalise_heatmaps

PAPER = ("Choe, Oh, Lee, Chun, Akata, Shim. Evaluating Weakly Supervised Object Localization Methods Right. "
         "CVPR 2020")
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8[1] = True  # 8-connectivity within a threshold's slice, none across slices
_SLICE_4 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_4[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # 4-connectivity (ndimage.generate_binary_structure(2, 1))
_CHUNK_PIXELS = 1 << 22  # thresholds labelled together, at most this many pixels


def default_cam_thresholds() -> np.ndarray:
    """Their sweep ``np.arange(0, 1, 0.01)``: float64[100], 0.00 .. 0.99."""
    return np.arange(0, 1, 0.01)


def cam_threshold_array(cam_thresholds: Any) -> np.ndarray:
    """``cam_thresholds`` (None: :func:`default_cam_thresholds`) as float64[T], checked:
    finite, strictly increasing, in [0, 1)."""
    if cam_thresholds is None:
        return default_cam_thresholds()
    try:
        t = np.asarray(cam_thresholds, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"cam_thresholds must be a list of numbers in [0, 1), got {cam_thresholds!r}") from None
    if t.ndim != 1 or len(t) == 0 or not np.isfinite(t).all() or (t < 0).any() or (t >= 1).any() \
            or (np.diff(t) <= 0).any():
        raise InvalidInputError(
            f"cam_thresholds must be a non-empty, strictly increasing list of finite numbers in [0, 1), "
            f"got {cam_thresholds!r}")
    return t


def iou_threshold_array(iou_thresholds: Any) -> np.ndarray:
    """``iou_thresholds`` as float64[D], checked: non-empty, finite, each in (0, 1]."""
    try:
        d = np.asarray(iou_thresholds, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"iou_thresholds must be a list of numbers in (0, 1], got {iou_thresholds!r}") from None
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all() or (d <= 0).any() or (d > 1).any():
        raise InvalidInputError(f"iou_thresholds must be a non-empty list of finite numbers in (0, 1], "
                                f"got {iou_thresholds!r}")
    return d


def _problem(check: Any) -> Any:
    """A registry constraint from a checker that raises: the message, or None."""
    def rule(value: Any) -> str | None:
        try:
            check(value)
        except InvalidInputError as e:
            return str(e)
        return None
    return rule


def contour_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes ``cv2.findContours(RETR_TREE)`` + ``boundingRect`` give, for each mask of
    bool ``masks[T,H,W]``: (slice int[n], boxes int[n,4] as x1, y1, x2, y2 exclusive).

    Outer contours: the 8-connected components of each slice. Hole contours: the
    4-connected background components not reaching the image border, their box grown
    by one pixel on each side (the foreground border pixels around the hole).
    """
    from scipy import ndimage  # scipy is imported by the metrics that use it, on first use

    _, h, w = masks.shape
    labels, n = ndimage.label(masks, structure=_SLICE_8)
    t_out, b_out = _label_boxes(labels, n)
    labels, n = ndimage.label(~masks, structure=_SLICE_4)
    t_in, b_in = _label_boxes(labels, n)
    inner = (b_in[:, 0] > 0) & (b_in[:, 1] > 0) & (b_in[:, 2] < w) & (b_in[:, 3] < h)
    holes = b_in[inner] + np.array([-1, -1, 1, 1])
    return np.concatenate([t_out, t_in[inner]]), np.concatenate([b_out, holes]).reshape(-1, 4)


def _label_boxes(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(slice int[n], bounding boxes int[n,4] as x1, y1, x2, y2 exclusive) of the components 1..n of
    ``labels[T,H,W]``, in label order (as ``ndimage.find_objects``), vectorised over all pixels."""
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64)
    t, y, x = np.nonzero(labels)
    ids = labels[t, y, x]
    order = np.argsort(ids, kind="stable")
    ids, t, y, x = ids[order], t[order], y[order], x[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    boxes = np.stack([np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts),
                      np.maximum.reduceat(x, starts) + 1, np.maximum.reduceat(y, starts) + 1], 1)
    return t[starts].astype(np.int64), boxes.astype(np.int64)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU float64[n,m] of boxes a[n,4] with boxes b[m,4] (x1, y1, x2, y2, x2/y2 exclusive)."""
    a, b = a.astype(np.float64)[:, None], b.astype(np.float64)[None]
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    union = area_a + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_hits(heatmaps: torch.Tensor, boxes: list[torch.Tensor], *, iou_thresholds: Any = IOU_THRESHOLDS,
             cam_thresholds: Any = None) -> np.ndarray:
    """Per-image MaxBoxAccV2 statistics: uint8[B, T, D], 1 where the sample is correct at CAM
    threshold t and IoU threshold d (protocol in the module docstring).

    heatmaps Tensor[B,H,W]; boxes a list of B float Tensors[n_i,4] (x1, y1, x2, y2,
    x2/y2 exclusive); ``cam_thresholds`` float[T] (None: 0.00 .. 0.99), ``iou_thresholds``
    float[D].
    """
    heatmaps = check_heatmap_batch(heatmaps)
    taus, deltas = cam_threshold_array(cam_thresholds), iou_threshold_array(iou_thresholds)
    b, h, w = heatmaps.shape
    gt = [g.double().numpy() for g in check_boxes(boxes, b, h, w)]
    norm, _ = normalise_heatmaps(heatmaps, "minmax")
    gray = (norm.cpu().numpy() * 255).astype(np.uint8)
    hits = np.zeros((b, len(taus), len(deltas)), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (h * w))
    for i in range(b):
        levels = (taus * int(gray[i].max())).astype(np.int64)  # int(tau * max) truncates, as theirs
        best = np.zeros(len(taus))
        for start in range(0, len(taus), chunk):
            lv = levels[start:start + chunk]
            t_idx, found = contour_boxes(gray[i][None] > lv[:, None, None])
            if len(found):
                np.maximum.at(best, start + t_idx, pairwise_iou(found, gt[i]).max(1))
        hits[i] = best[:, None] >= deltas[None, :]
    return hits


def _box_acc_summary(hits: np.ndarray, taus: np.ndarray, deltas: np.ndarray) -> dict[str, float]:
    """MaxBoxAcc per delta, the best threshold per delta and the V2 mean from hits[N,T,D]."""
    n = hits.shape[0]
    if n == 0:
        raise InvalidInputError("max_box_acc needs at least one image")
    flat = hits.reshape(n, -1)
    acc = (flat.sum(0, dtype=np.int64) if np.issubdtype(flat.dtype, np.integer) else flat.sum(0)).reshape(
        hits.shape[1:]) / n
    best = acc.argmax(0)
    top = acc[best, np.arange(len(deltas))]
    out = {f"max_box_acc@{d:g}": float(v) for d, v in zip(deltas, top)}
    out.update({f"best_threshold@{d:g}": float(taus[k]) for d, k in zip(deltas, best)})
    out["max_box_acc_v2"] = float(top.mean())
    return out


def max_box_acc_reduce(pool: Pooled, params: Mapping[str, Any]) -> dict[str, float]:
    """The registry's data-set score of ``max_box_acc`` from ``pool.stats`` uint8[N,T,D]:
    ``{"max_box_acc": V2 mean, "max_box_acc@d": ..., "best_threshold@d": ..., "max_box_acc_v2": ...}``."""
    if pool.stats is None:
        raise InvalidInputError("max_box_acc's reduce needs the per-image hits (Pooled.stats)")
    summary = _box_acc_summary(np.asarray(pool.stats), cam_threshold_array(params.get("cam_thresholds")),
                               iou_threshold_array(params.get("iou_thresholds", IOU_THRESHOLDS)))
    return {"max_box_acc": summary["max_box_acc_v2"], **summary}


@register_metric(
    "max_box_acc", paper=PAPER, higher_is_better=True, inputs="boxes", criterion="localisation", heatmap="as_is",
    level="dataset", stats=box_hits, reduce=max_box_acc_reduce,
    outputs=(*(f"{k}@{d:g}" for k in ("max_box_acc", "best_threshold") for d in IOU_THRESHOLDS), "max_box_acc_v2"),
    constraints={"iou_thresholds": _problem(iou_threshold_array), "cam_thresholds": _problem(cam_threshold_array)},
)
def max_box_acc(heatmaps: torch.Tensor, boxes: list[torch.Tensor], *,
                iou_thresholds: tuple[float, ...] | list[float] = IOU_THRESHOLDS,
                cam_thresholds: tuple[float, ...] | list[float] | None = None) -> dict[str, float]:
    """MaxBoxAccV2 (Choe et al. CVPR 2020) of heatmaps Tensor[B,H,W] against boxes (a list of
    B float Tensors[n_i,4], x1, y1, x2, y2 with x2/y2 exclusive), protocol in the module
    docstring.

    Returns ``{"max_box_acc@0.3", "max_box_acc@0.5", "max_box_acc@0.7"}`` (one per IoU
    threshold, in [0, 1]), ``"best_threshold@d"`` (the first CAM threshold reaching it)
    and ``"max_box_acc_v2"`` (their mean). The registry scores it at the data-set level
    from :func:`box_hits` pooled by :func:`max_box_acc_reduce`.
    """
    hits = box_hits(heatmaps, boxes, iou_thresholds=iou_thresholds, cam_thresholds=cam_thresholds)
    return _box_acc_summary(hits, cam_threshold_array(cam_thresholds), iou_threshold_array(iou_thresholds))


def pixel_counts(heatmaps: torch.Tensor, masks: torch.Tensor, *, cam_thresholds: Any = None) -> np.ndarray:
    """Per-image PxAP statistics: int64[B, 2, T+2]: row 0 the positive (TP), row 1 the negative (FP)
    pixels with normalised score >= each threshold of (-inf, t_0 .. t_T-1, 1.0), ascending; column 0
    (-inf) is every positive / negative pixel.

    heatmaps Tensor[B,H,W], masks bool Tensor[B,H,W]; min-max normalised maps, computed
    on the heatmaps' device in float64.
    """
    heatmaps = check_heatmap_batch(heatmaps)
    masks = check_masks(masks, heatmaps)
    taus = cam_threshold_array(cam_thresholds)
    b = heatmaps.shape[0]
    norm, _ = normalise_heatmaps(heatmaps, "minmax")
    edges = torch.tensor(np.concatenate([[-np.inf], taus, [1.0]]), dtype=torch.float64, device=norm.device)
    n_edges = len(edges)
    # index of the largest edge <= score: the histogram bin as np.histogram counts it
    bins = torch.bucketize(norm.flatten(1), edges, right=True) - 1
    offset = torch.arange(b, device=norm.device)[:, None] * n_edges
    flat_masks = masks.flatten(1)
    out = np.zeros((b, 2, n_edges), dtype=np.int64)
    for row, sel in ((0, flat_masks), (1, ~flat_masks)):
        hist = torch.bincount((bins + offset)[sel], minlength=b * n_edges).view(b, n_edges)
        out[:, row] = hist.flip(1).cumsum(1).flip(1).cpu().numpy()  # count with score >= edge
    return out


def average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """MaskEvaluator's AP from pooled TP, FP int[T+2] at thresholds (-inf, t_0 .., 1.0), ascending."""
    positives = float(tp[0])
    if positives <= 0:
        return float("nan")
    tp = np.concatenate([[0], tp[:0:-1]]).astype(np.float64)  # descending thresholds, from "above 1"
    fp = np.concatenate([[0], fp[:0:-1]]).astype(np.float64)
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = tp / positives
    return float((precision[1:] * np.diff(recall))[predicted[1:] > 0].sum())


def pxap_reduce(pool: Pooled, params: Mapping[str, Any]) -> float:
    """The registry's data-set score of ``pxap``: AP of the counts pooled over ``pool.stats`` [N, 2, T+2]."""
    if pool.stats is None:
        raise InvalidInputError("pxap's reduce needs the per-image pixel counts (Pooled.stats)")
    total = np.asarray(pool.stats).sum(0)
    return average_precision(total[0], total[1])


@register_metric(
    "pxap", paper=PAPER, higher_is_better=True, inputs="masks", criterion="localisation", heatmap="as_is",
    level="dataset", stats=pixel_counts, reduce=pxap_reduce,
    constraints={"cam_thresholds": _problem(cam_threshold_array)},
)
def pxap(heatmaps: torch.Tensor, masks: torch.Tensor, *,
         cam_thresholds: tuple[float, ...] | list[float] | None = None) -> float:
    """Pixel average precision PxAP (Choe et al. CVPR 2020) in [0, 1] of heatmaps Tensor[B,H,W]
    against masks bool Tensor[B,H,W], pixels pooled over the images (module docstring).
    NaN when no pixel is positive."""
    total = pixel_counts(heatmaps, masks, cam_thresholds=cam_thresholds).sum(0)
    return average_precision(total[0], total[1])
