"""Localisation protocols (normalisation, CAM box rules, MaxBoxAccV2, PxAP, pointing game options)
and the RISE target / group scorer of deletion and insertion, against slow references written from
the papers' definitions, test-only re-enactments of the authors' code (OpenCV calls as theirs),
Quantus, and hand-made cases."""

from __future__ import annotations

import json
import math
import warnings
from collections import deque

import cv2
import numpy as np
import pytest
import quantus
import torch
from scipy import ndimage

import saliencybench as sb
from saliencybench.errors import ConstantHeatmapWarning, InvalidInputError
from saliencybench.metrics.base import GROUPS, Pooled, ScoreBatch
from saliencybench.metrics.localisation import cam_code_box, heatmap_box, normalise_heatmaps
from saliencybench.metrics.perturbation_curves import score_perturbation_curves
from saliencybench.metrics.pointing import pointing_reduce, torchray_smooth
from saliencybench.metrics.wsol import box_hits, contour_boxes, max_box_acc_reduce, pixel_counts, pxap_reduce

from conftest import make_images, make_model

N8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
N4 = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def bfs_components(mask: np.ndarray, neighbours) -> list[list[tuple[int, int]]]:
    """Slow flood fill: connected components of ``mask`` as pixel lists, in row-major order of the first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                queue, comp = deque([(y, x)]), []
                while queue:
                    cy, cx = queue.popleft()
                    comp.append((cy, cx))
                    for dy, dx in neighbours:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
                comps.append(comp)
    return comps


def pixel_box(comp) -> list[int]:
    ys, xs = [p[0] for p in comp], [p[1] for p in comp]
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


def slow_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def smooth_maps(b: int, h: int, w: int, seed: int, sigma: float = 2.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(np.stack([ndimage.gaussian_filter(rng.random((h, w)), sigma) for _ in range(b)]),
                        dtype=torch.float32)


def blob_maps(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Maps of 2-4 Gaussian blobs of random size and height, some reaching the edges, a small negative offset."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    maps = []
    for _ in range(b):
        m = np.zeros((h, w))
        for _ in range(int(rng.integers(2, 5))):
            cy, cx, sd = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 14)
            m += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd ** 2))
        maps.append(m - 0.05)
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def near_boxes(heats: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Ground truth near what the maps show: a component's box at a random threshold, each side moved by up to
    3 px, plus a random box, so that hits vary across thresholds and IoU levels."""
    rng = np.random.default_rng(seed)
    out = []
    for h in heats.double().numpy():
        h, (hh, ww) = (h - h.min()) / (h.max() - h.min()), h.shape
        comps = bfs_components(h >= rng.uniform(0.2, 0.8), N8)
        b = np.array(pixel_box(comps[int(rng.integers(len(comps)))])) + rng.integers(-3, 4, 4)
        b = np.clip(b, 0, [ww - 1, hh - 1, ww, hh])
        b[2:] = np.maximum(b[2:], b[:2] + 1)
        out.append(torch.tensor(np.stack([b, [0, 0, ww // 2, hh // 2]]), dtype=torch.float32))
    return out


def random_boxes(b: int, h: int, w: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(b):
        n = int(rng.integers(1, 3))
        x1, y1 = rng.integers(0, w - 4, n), rng.integers(0, h - 4, n)
        x2, y2 = x1 + rng.integers(2, w // 2, n), y1 + rng.integers(2, h // 2, n)
        out.append(torch.tensor(np.stack([x1, y1, np.minimum(x2, w), np.minimum(y2, h)], 1), dtype=torch.float32))
    return out


# ---- box_iou: normalisation and the largest-component rule ---------------------------------------------

def test_offset_and_bump_gives_the_bump_box_after_minmax():
    """RISE-like map: a large offset plus a bump. Fraction-of-max keeps the whole image; min-max the bump."""
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), indexing="ij")
    bump = torch.exp(-((yy - 12) ** 2 + (xx - 30) ** 2) / (2 * 3.0 ** 2))
    heat = (10.0 + bump)[None]
    gt = [torch.tensor([[25.0, 7.0, 36.0, 18.0]])]
    iou, box, _ = sb.metrics.box_iou(heat, gt, return_boxes=True)
    kept = (bump >= 0.15).numpy()  # the offset cancels in (h - min) / (max - min) up to float rounding
    assert box[0].tolist() == pixel_box(max(bfs_components(kept, N8), key=len))
    assert iou.item() > 0.7
    _, whole, _ = sb.metrics.box_iou(heat, gt, normalise="max", return_boxes=True)
    assert whole[0].tolist() == [0.0, 0.0, 48.0, 40.0]


def test_largest_component_equals_slow_reference():
    heats = smooth_maps(6, 20, 24, seed=3) - 0.5  # signed maps: min-max and max differ
    for normalise in ("minmax", "max"):
        for threshold in (0.15, 0.2, 0.6):
            for i in range(len(heats)):
                h = heats[i].double().numpy()
                if normalise == "minmax":
                    n = (h - h.min()) / (h - h.min()).max()
                else:
                    n = h / h.max()
                comps = bfs_components(n >= threshold, N8)
                ref = pixel_box(max(comps, key=len)) if comps else None  # max keeps the first of equal sizes
                got = heatmap_box(heats[i], threshold, normalise=normalise)
                assert (got is None and ref is None) or got.tolist() == ref


def test_maps_without_a_box():
    gt = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])] * 3
    heat = torch.stack([torch.full((8, 8), 2.0), -torch.rand(8, 8) - 0.1, torch.full((8, 8), -1.0)])
    _, _, no_box = sb.metrics.box_iou(heat, gt, return_boxes=True)
    assert no_box.tolist() == [True, False, True]  # constant: nothing to normalise; negative-only: min-max works
    _, _, no_box = sb.metrics.box_iou(heat, gt, normalise="max", return_boxes=True)
    assert no_box.tolist() == [False, True, True]  # a positive constant map: everything >= threshold x max
    norm, valid = normalise_heatmaps(heat, "minmax")
    assert valid.tolist() == [False, True, False] and float(norm[0].abs().max()) == 0.0


# ---- the CAM authors' released box generator --------------------------------------------------------------

def released_cam_box(heat: np.ndarray):
    """The released generator re-enacted step by step (dt_box.cpp + dt.c + ILSVRC_evaluate_bbox.m), with a
    brute-force distance transform and OpenCV's findContours as the C++ code calls it.
    Returns (the largest area, all boxes of that area) or None."""
    peak = heat.max()
    if not peak > 0:
        return None
    gray = np.floor(np.clip(heat / peak, 0, 1) * 255 + 0.5).astype(np.uint8)  # imwrite's round(255 v)
    H, W = gray.shape
    ys, xs = np.mgrid[:H, :W]
    rects = []
    for t in (20, 100, 110):
        img = np.where(gray > t, 255, 0).astype(np.uint8)  # cvThreshold BINARY
        fg = img > 0
        if fg.any() and not fg.all():  # dt_binary + double_to_image (which returns early when min == max)
            by, bx = ys[~fg], xs[~fg]
            d2 = np.full(fg.shape, np.inf)
            for k in range(0, len(by), 512):  # brute force: every background pixel, in chunks
                near = (ys[..., None] - by[k:k + 512]) ** 2 + (xs[..., None] - bx[k:k + 512]) ** 2
                d2 = np.minimum(d2, near.min(-1))
            dist = np.sqrt(d2)
            scale = 255.0 / dist.max()
            img = np.clip(np.floor(dist * scale + 0.5), 0, 255).astype(np.uint8)
        _, img = cv2.threshold(img, 10, 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(img, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0]
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            limit = lambda v, lo, hi: lo if v < lo else (hi if v > hi else v)  # noqa: E731 - dt_box.cpp's LIMIT
            cx, cy = limit(x, 0, W - 5), limit(y, 0, H - 5)
            cw, ch = limit(w, 0, W - x - 5), limit(h, 0, H - y - 5)
            rects.append((cw * ch, [min(cx, cx + cw), min(cy, cy + ch), max(cx, cx + cw), max(cy, cy + ch)]))
    if not rects:
        return None
    top = max(a for a, _ in rects)
    return top, [r for a, r in rects if a == top]


def test_cam_code_equals_the_released_generator_on_random_maps():
    heats = [*blob_maps(6, 64, 72, seed=11), *(smooth_maps(3, 30, 30, seed=12, sigma=4.0) - 0.45)]
    for i in range(len(heats)):
        ref = released_cam_box(heats[i].double().numpy())
        got = cam_code_box(heats[i])
        if ref is None:
            assert got is None
            continue
        area, boxes = ref
        assert got.tolist() in boxes, (i, got, boxes)
        assert float((got[2] - got[0]) * (got[3] - got[1])) == area


def test_cam_code_erosion_and_edge_clipping_hand_cases():
    heat = torch.zeros(100, 100)
    heat[20:80, 10:70] = 1.0  # 60 x 60: max distance 30, so distance 1 maps to round(8.5) = 9 <= 10: eroded
    assert cam_code_box(heat).tolist() == [11.0, 21.0, 69.0, 79.0]
    small = torch.zeros(40, 40)
    small[5:25, 5:25] = 1.0  # max distance 10: distance 1 -> round(25.5) = 26 > 10: nothing eroded
    assert cam_code_box(small).tolist() == [5.0, 5.0, 25.0, 25.0]
    edge = torch.zeros(40, 40)
    edge[10:30, 20:40] = 1.0  # reaches the right edge: clipped 5 px short of it
    assert cam_code_box(edge).tolist() == [20.0, 10.0, 35.0, 30.0]
    # max-normalised, no offset removal: the offset-and-bump map gives the whole image (less the margin)
    off = 10.0 + torch.exp(-((torch.arange(40.0)[:, None] - 20) ** 2 + (torch.arange(40.0) - 20) ** 2) / 18)
    iou, box, _ = sb.metrics.box_iou(off[None], [torch.tensor([[15.0, 15.0, 26.0, 26.0]])], box_protocol="cam_code",
                                     return_boxes=True)
    assert box[0].tolist() == [0.0, 0.0, 35.0, 35.0] and iou.item() < 0.1
    assert cam_code_box(-torch.rand(10, 10)) is None


# ---- MaxBoxAccV2 ---------------------------------------------------------------------------------------

def wsol_reference_hits(heat: torch.Tensor, gt: np.ndarray, taus, deltas) -> np.ndarray:
    """Choe et al.'s compute_bboxes_from_scoremaps(multi_contour_eval=True) + BoxEvaluator.accumulate, with
    OpenCV called as theirs; boxes kept as boundingRect gives them (x, y, x + w, y + h) and IoU on exclusive
    boxes, the convention documented in saliencybench.metrics.wsol."""
    cam = heat.double().numpy().copy()
    if cam.min() == cam.max():
        cam = np.zeros_like(cam)
    else:
        cam -= cam.min()
        cam /= cam.max()
    scoremap_image = np.expand_dims((cam * 255).astype(np.uint8), 2)
    hits = np.zeros((len(taus), len(deltas)), dtype=np.uint8)
    for k, tau in enumerate(taus):
        _, thr = cv2.threshold(src=scoremap_image, thresh=int(tau * np.max(scoremap_image)), maxval=255,
                               type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=thr, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            continue  # theirs: a dummy (0, 0, 0, 0) box; here a miss
        best = 0.0
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            best = max(best, max(slow_iou([x, y, x + w, y + h], g) for g in gt.tolist()))
        hits[k] = best >= np.asarray(deltas)
    return hits


def test_contour_boxes_equal_opencv_retr_tree():
    rng = np.random.default_rng(5)
    for trial in range(300):
        h, w = rng.integers(3, 18, 2)
        m = rng.random((h, w)) < rng.uniform(0.3, 0.8) if trial % 2 else \
            ndimage.gaussian_filter(rng.random((h, w)), 1.2) > 0.5
        contours = cv2.findContours((m * 255).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        ref = sorted((x, y, x + bw, y + bh) for x, y, bw, bh in (cv2.boundingRect(c) for c in contours))
        _, ours = contour_boxes(m[None])
        assert sorted(map(tuple, ours.tolist())) == ref


def test_box_hits_equal_the_reference_code_and_the_slow_definition():
    heats = torch.cat([smooth_maps(4, 24, 28, seed=21, sigma=1.5), blob_maps(4, 24, 28, seed=22)])
    gts = near_boxes(heats, seed=23)
    taus = np.arange(0, 1, 0.01)
    deltas = (0.3, 0.5, 0.7)
    ours = box_hits(heats, gts)
    assert ours.dtype == np.uint8 and ours.shape == (8, 100, 3)
    assert 0.1 < ours.mean() < 0.9 and len({tuple(r) for r in ours.reshape(-1, 3).tolist()}) == 4  # varied hits
    for i in range(len(heats)):
        assert np.array_equal(ours[i], wsol_reference_hits(heats[i], gts[i].numpy(), taus, deltas)), i
    # the slow definition: boxes of the 8-connected components and of the enclosed 4-connected holes (grown by 1)
    few = [0.05, 0.3, 0.55, 0.8]
    ours = box_hits(heats[:3], gts[:3], cam_thresholds=few)
    for i in range(3):
        h = heats[i].double().numpy()
        gray = ((h - h.min()) / (h - h.min()).max() * 255).astype(np.uint8)
        for k, tau in enumerate(few):
            fg = gray > int(tau * 255)
            boxes = [pixel_box(c) for c in bfs_components(fg, N8)]
            for c in bfs_components(~fg, N4):
                b = pixel_box(c)
                if b[0] > 0 and b[1] > 0 and b[2] < fg.shape[1] and b[3] < fg.shape[0]:
                    boxes.append([b[0] - 1, b[1] - 1, b[2] + 1, b[3] + 1])
            best = max((slow_iou(b, g) for b in boxes for g in gts[i].tolist()), default=0.0)
            assert ours[i, k].tolist() == [int(best >= d) for d in deltas]


def test_max_box_acc_hand_cases():
    # offset + hard-edged bump: the bump's box at every threshold
    heat = torch.full((1, 30, 30), 5.0)
    heat[0, 8:20, 4:14] += 1.0
    res = sb.metrics.max_box_acc(heat, [torch.tensor([[4.0, 8.0, 14.0, 20.0]])])
    assert res == {"max_box_acc@0.3": 1.0, "max_box_acc@0.5": 1.0, "max_box_acc@0.7": 1.0, "best_threshold@0.3": 0.0,
                   "best_threshold@0.5": 0.0, "best_threshold@0.7": 0.0, "max_box_acc_v2": 1.0}
    # two blobs: a big weak one and a small strong one; the ground truth is the small one
    two = torch.zeros(1, 40, 40)
    two[0, 2:30, 2:30] = 0.5
    two[0, 32:38, 32:38] = 1.0
    gt = [torch.tensor([[32.0, 32.0, 38.0, 38.0]])]
    hits = box_hits(two, gt)[0]
    assert hits[:, 1].tolist() == [1] * 100  # every threshold keeps the small blob as its own component
    assert sb.metrics.box_iou(two, gt, threshold=0.15).item() == 0.0  # the largest component is the big one
    # a ring: its hole's box (grown by one pixel) is the best box, as OpenCV's hole contours give it
    ring = torch.zeros(1, 30, 30)
    ring[0, 5:25, 5:25] = 1.0
    ring[0, 7:23, 7:23] = 0.0
    hole_box = [torch.tensor([[6.0, 6.0, 24.0, 24.0]])]
    assert box_hits(ring, hole_box)[0, :, 2].all()
    assert wsol_reference_hits(ring[0], hole_box[0].numpy(), [0.5], [0.7]).item() == 1
    # a constant map: nothing above any threshold, a miss everywhere
    flat = sb.metrics.max_box_acc(torch.ones(2, 10, 10), [torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 2)
    assert flat["max_box_acc_v2"] == 0.0


def test_max_box_acc_equals_slow_definition_and_reduce():
    heats = blob_maps(6, 20, 20, seed=31)
    gts = near_boxes(heats, seed=32)
    hits = box_hits(heats, gts)
    acc = hits.astype(float).mean(0)  # BoxAcc(tau, delta)
    res = sb.metrics.max_box_acc(heats, gts)
    for j, d in enumerate((0.3, 0.5, 0.7)):
        assert res[f"max_box_acc@{d:g}"] == pytest.approx(acc[:, j].max())
        assert res[f"best_threshold@{d:g}"] == pytest.approx(np.arange(0, 1, 0.01)[acc[:, j].argmax()])
    assert res["max_box_acc_v2"] == pytest.approx(acc.max(0).mean())
    spec = sb.get_metric("max_box_acc")
    pooled = spec.reduce(Pooled(np.full(6, np.nan), hits), spec.params)
    assert pooled["max_box_acc"] == res["max_box_acc_v2"] and all(pooled[k] == v for k, v in res.items())
    idx = np.array([0, 0, 3, 5])
    sub = max_box_acc_reduce(Pooled(np.full(6, np.nan), hits).take(idx), spec.params)
    assert sub["max_box_acc"] == sb.metrics.max_box_acc(heats[idx], [gts[i] for i in idx])["max_box_acc_v2"]


def test_data_set_level_scoring_through_the_spec():
    heats = smooth_maps(3, 16, 16, seed=41)
    masks = [torch.rand(16, 16, generator=torch.Generator().manual_seed(i)) > 0.6 for i in range(3)]
    boxes = random_boxes(3, 16, 16, seed=42)
    batch = ScoreBatch(None, torch.zeros(3, 3, 16, 16), torch.zeros(3, dtype=torch.long), heats, masks=masks,
                       boxes=boxes)
    res = sb.get_metric("max_box_acc").score(batch, {})
    assert res.stats.shape == (3, 100, 3) and np.isnan(res.values["max_box_acc"]).all()
    assert np.array_equal(res.stats, box_hits(heats, boxes))
    res = sb.get_metric("pxap").score(batch, {"cam_thresholds": [0.0, 0.5]})
    assert res.stats.shape == (3, 2, 4)
    assert np.array_equal(res.stats, pixel_counts(heats, torch.stack(masks), cam_thresholds=[0.0, 0.5]))
    assert pxap_reduce(Pooled(res.values, res.stats), {}) == pytest.approx(
        sb.metrics.pxap(heats, torch.stack(masks), cam_thresholds=[0.0, 0.5]))


def test_wsol_bad_input():
    heat, gt = torch.rand(1, 8, 8), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
    for bad in ((0.0, 0.5), (0.5, 1.5), (float("nan"),), ()):
        with pytest.raises(InvalidInputError, match="iou_thresholds"):
            sb.metrics.max_box_acc(heat, gt, iou_thresholds=bad)
    for bad in ([0.5, 0.2], [0.0, 1.0], [float("nan")], "x"):
        with pytest.raises(InvalidInputError, match="cam_thresholds"):
            sb.metrics.pxap(heat, torch.ones(1, 8, 8, dtype=torch.bool), cam_thresholds=bad)
    with pytest.raises(InvalidInputError, match="cam_thresholds"):
        sb.get_metric("max_box_acc").check_params({"cam_thresholds": [0.3, 0.1]})
    with pytest.raises(InvalidInputError, match="Tensor\\[B,H,W\\]"):
        sb.metrics.max_box_acc(torch.rand(8, 8), gt)
    with pytest.raises(InvalidInputError, match="masks must have"):
        sb.metrics.pxap(heat, torch.ones(1, 4, 4, dtype=torch.bool))


# ---- PxAP ----------------------------------------------------------------------------------------------

def mask_evaluator_ap(heats: torch.Tensor, masks: torch.Tensor, taus) -> float:
    """Choe et al.'s MaskEvaluator.accumulate / compute, as their code does it (histograms, reversed cumsum)."""
    edges = np.append(taus, [1.0, 2.0, 3.0])
    true_hist, false_hist = np.zeros(len(taus) + 2), np.zeros(len(taus) + 2)
    for h, m in zip(heats, masks):
        s = h.double().numpy().copy()
        s -= s.min()
        s /= s.max()
        true_hist += np.histogram(s[m.numpy()], bins=edges)[0]
        false_hist += np.histogram(s[~m.numpy()], bins=edges)[0]
    tp = true_hist[::-1].cumsum()
    fn = true_hist.sum() - tp
    fp = false_hist[::-1].cumsum()
    nonzero = (tp + fp) != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum())


def slow_pxap(heats, masks, taus) -> float:
    """From the definition: precision/recall of pooled pixels at each threshold, descending, AP as a sum."""
    s = torch.cat([((h.double() - h.min()) / (h.double() - h.min()).max()).flatten() for h in heats]).numpy()
    m = torch.cat([mm.flatten() for mm in masks]).numpy()
    ap, prev_recall = 0.0, 0.0
    for t in sorted(list(taus) + [1.0], reverse=True):
        pred = s >= t
        if pred.sum() == 0:
            continue
        recall = (pred & m).sum() / m.sum()
        ap += (pred & m).sum() / pred.sum() * (recall - prev_recall)
        prev_recall = recall
    return ap


def test_pxap_equals_mask_evaluator_and_the_definition():
    g = torch.Generator().manual_seed(7)
    heats = torch.cat([smooth_maps(4, 20, 20, seed=51), torch.randint(0, 5, (2, 20, 20), generator=g).float()])
    masks = torch.rand(6, 20, 20, generator=g) < 0.3
    masks[:, 5:12, 5:12] |= heats[:, 5:12, 5:12] > heats.mean()
    taus = np.arange(0, 1, 0.01)
    ours = sb.metrics.pxap(heats, masks)
    assert ours == pytest.approx(mask_evaluator_ap(heats, masks, taus), abs=1e-12)
    assert ours == pytest.approx(slow_pxap(heats, masks, taus), abs=1e-12)
    counts = pixel_counts(heats, masks)
    assert counts.shape == (6, 2, 102) and counts.dtype == np.int64
    assert (counts[:, 0, 0] == masks.flatten(1).sum(1).numpy()).all() and (counts[:, :, 0].sum(1) == 400).all()
    assert (np.diff(counts, axis=2) <= 0).all()  # fewer pixels at higher thresholds


def test_pxap_hand_cases():
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    perfect = 3.0 + masks.float()  # offset + the mask itself
    assert sb.metrics.pxap(perfect, masks) == pytest.approx(1.0)
    # a constant map predicts every pixel at threshold 0 and none above: AP = the positive fraction
    assert sb.metrics.pxap(torch.ones(2, 10, 10), masks) == pytest.approx(16 / 100)
    assert math.isnan(sb.metrics.pxap(torch.rand(1, 10, 10), torch.zeros(1, 10, 10, dtype=torch.bool)))


# ---- pointing game --------------------------------------------------------------------------------------

def test_ties_any_equals_quantus_and_first_scores_the_first_maximum():
    g = torch.Generator().manual_seed(3)
    heat = torch.randint(0, 4, (24, 10, 10), generator=g).float()  # many tied maxima
    masks = torch.rand(24, 10, 10, generator=g) < 0.15
    masks[:, 0, 0] = True
    metric = quantus.PointingGame(disable_warnings=True, display_progressbar=False, normalise=False, abs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = metric(model=make_model("resnet10t", dtype=torch.float32), x_batch=np.zeros((24, 3, 10, 10), np.float32),
                     y_batch=np.zeros(24, int), a_batch=heat[:, None].numpy(),
                     s_batch=masks[:, None].numpy().astype(np.float32), device="cpu")
    anyhit = sb.metrics.pointing_game(heat, masks, tolerance=0, ties="any")
    first = sb.metrics.pointing_game(heat, masks, tolerance=0)
    assert anyhit.tolist() == [float(v) for v in ref]
    assert (first <= anyhit).all() and first.sum() < anyhit.sum()
    flat = heat.flatten(1)
    idx = flat.argmax(1)  # the first maximum, row-major
    assert first.tolist() == masks.flatten(1)[torch.arange(24), idx].float().tolist()


def test_ties_any_with_tolerance_hand_case():
    heat = torch.zeros(1, 30, 30)
    heat[0, 2, 2] = heat[0, 15, 20] = 1.0  # two maxima; the first is far from the mask, the second 4 px away
    mask = torch.zeros(1, 30, 30, dtype=torch.bool)
    mask[0, 15, 24:28] = True
    assert sb.metrics.pointing_game(heat, mask, tolerance=5, ties="first").item() == 0.0
    assert sb.metrics.pointing_game(heat, mask, tolerance=5, ties="any").item() == 1.0
    assert sb.metrics.pointing_game(heat, mask, tolerance=4, ties="any").item() == 0.0  # 16 is not < 16
    with pytest.warns(ConstantHeatmapWarning):
        assert sb.metrics.pointing_game(torch.ones(1, 30, 30), mask, ties="any").item() == 1.0


def slow_torchray_smooth(h: np.ndarray, fraction: float = 0.02) -> np.ndarray:
    """TorchRay's imsmooth from its definition: 2-D sum over the separable kernel, replicate borders."""
    H, W = h.shape
    sigma = fraction * max(H, W)
    r = math.ceil(4 * sigma)
    i = np.arange(-r, r + 1)
    f = np.exp(-(i / (math.sqrt(2) * sigma)) ** 2)
    f /= f.sum()
    out = np.zeros_like(h)
    for a, dy in enumerate(i):
        for b, dx in enumerate(i):
            out += f[a] * f[b] * h[np.clip(np.arange(H) + dy, 0, H - 1)][:, np.clip(np.arange(W) + dx, 0, W - 1)]
    return out


def test_torchray_smoothing_and_its_effect_on_the_point():
    heat = smooth_maps(2, 60, 80, seed=61, sigma=1.0)
    ours = torchray_smooth(heat.double())
    for i in range(2):
        assert np.allclose(ours[i].numpy(), slow_torchray_smooth(heat[i].double().numpy()), atol=1e-6)
    # a one-pixel spike outside the object beats a broad blob inside it, until the map is smoothed
    yy, xx = torch.meshgrid(torch.arange(100.0), torch.arange(100.0), indexing="ij")
    spiky = (0.8 * torch.exp(-((yy - 70) ** 2 + (xx - 70) ** 2) / 200))[None]
    spiky[0, 10, 10] = 1.0
    mask = ((yy - 70) ** 2 + (xx - 70) ** 2 < 100)[None]
    assert sb.metrics.pointing_game(spiky, mask, tolerance=0).item() == 0.0
    assert sb.metrics.pointing_game(spiky, mask, tolerance=0, smooth=True).item() == 1.0


def test_tolerance_scales_with_the_image():
    spec = sb.get_metric("pointing_game")
    assert spec.scaled(224, 224) == {"tolerance": 15.0}
    assert spec.scaled(375, 500) == {"tolerance": round(15 * 375 / 224, 2)} == {"tolerance": 25.11}
    assert spec.resolve_params({}, (112, 112))["tolerance"] == 7.5
    assert spec.resolve_params({"tolerance": 3}, (112, 112))["tolerance"] == 3
    heat = torch.zeros(2, 224, 224)
    mask = torch.zeros(2, 224, 224, dtype=torch.bool)
    mask[:, 100:120, 100:120] = True
    heat[0, 110, 85] = heat[1, 110, 86] = 1.0  # 15 and 14 px from the mask
    assert sb.metrics.pointing_game(heat, mask).tolist() == sb.metrics.pointing_game(heat, mask, tolerance=15).tolist()
    assert sb.metrics.pointing_game(heat, mask).tolist() == [0.0, 1.0]


def test_pointing_accuracy_present_vs_all_classes():
    hits, classes = [1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 3]
    assert sb.metrics.pointing_accuracy(hits, classes) == pytest.approx((1 + 0 + 1) / 3)
    # TorchRay: hits / max(hits + misses, 1) per class over all 5 classes, absent ones 0
    torchray = (torch.tensor([3.0, 0, 0, 1, 0]) / torch.tensor([3.0, 2, 0, 1, 0]).clamp(min=1)).mean().item()
    assert sb.metrics.pointing_accuracy(hits, classes, n_classes=5) == pytest.approx(torchray) == pytest.approx(0.4)
    assert sb.metrics.pointing_accuracy(hits, classes, n_classes=4) == pytest.approx(2 / 4)
    with pytest.raises(InvalidInputError, match="n_classes"):
        sb.metrics.pointing_accuracy(hits, classes, n_classes=3)
    with pytest.raises(InvalidInputError, match="one class per hit"):
        sb.metrics.pointing_accuracy(hits, classes[:-1])


def test_pointing_reduce_class_average():
    pool = Pooled(np.array([1.0, 1.0, 0.0, np.nan, 1.0]), labels=np.array([0, 0, 1, 1, 2]), n_classes=4)
    assert pointing_reduce(pool, {}) == pytest.approx((1 + 0 + 1) / 3)  # default "present"; NaN left out
    assert pointing_reduce(pool, {"class_average": "all"}) == pytest.approx(2 / 4)
    assert pointing_reduce(pool, {"class_average": "none"}) == pytest.approx(3 / 4)
    assert sb.get_metric("pointing_game").reduce is pointing_reduce
    with pytest.raises(InvalidInputError, match="n_classes"):
        pointing_reduce(Pooled(pool.values, labels=pool.labels), {"class_average": "all"})
    with pytest.raises(InvalidInputError, match="labels"):
        pointing_reduce(Pooled(pool.values), {})


def test_pointing_bad_params_and_registrations():
    heat, mask = torch.rand(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool)
    for kwargs, match in (({"tolerance": float("nan")}, "finite"), ({"tolerance": -1}, ">= 0"),
                          ({"ties": "all"}, "ties"), ({"class_average": "mean"}, "class_average"),
                          ({"smooth": 1}, "smooth")):
        with pytest.raises(InvalidInputError, match=match):
            sb.metrics.pointing_game(heat, mask, **kwargs)
    spec = sb.get_metric("pointing_game")
    for params in ({"tolerance": float("nan")}, {"tolerance": -2}, {"ties": "x"}, {"class_average": "x"}):
        with pytest.raises(InvalidInputError):
            spec.check_params(params)
    assert sb.get_metric("energy_pointing_game").heatmap == "positive"
    for name in ("box_iou", "pointing_game", "max_box_acc", "pxap", "deletion", "insertion"):
        assert sb.get_metric(name).constraints and sb.get_metric(name).heatmap == "as_is"
    assert sb.get_metric("box_iou").ranked is False and sb.get_metric("max_box_acc").ranked is True
    for kwargs in ({"threshold": float("nan")}, {"threshold": 0}, {"normalise": "l2"}, {"box_protocol": "x"}):
        with pytest.raises(InvalidInputError):
            sb.metrics.box_iou(heat, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], **kwargs)
        with pytest.raises(InvalidInputError):
            sb.get_metric("box_iou").check_params(kwargs)
    with pytest.raises(InvalidInputError, match="min_iou"):
        sb.metrics.localisation_correct(torch.tensor([0.6]), min_iou=float("nan"))
    assert sb.metrics.localisation_correct(torch.tensor([0.6, 0.4, 0.7]), torch.tensor([1, 1, 0])).tolist() == \
        [True, False, False]


# ---- deletion / insertion: the RISE target and the group scorer -----------------------------------------

@pytest.fixture(scope="module")
def curve_case():
    model = make_model("resnet10t")
    x = make_images(3, 24, seed=5)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    labels = (pred + 1) % 10  # every label differs from the prediction
    heat = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(8))
    return model, x, labels, pred, logits, heat


def test_target_predicted_tracks_the_clean_top1_class(curve_case):
    model, x, labels, pred, logits, heat = curve_case
    for fn in (sb.metrics.deletion, sb.metrics.insertion):
        by_pred = fn(model, x, labels, heat, n_steps=4, target="predicted")
        assert torch.allclose(by_pred, fn(model, x, pred, heat, n_steps=4), atol=1e-6)
        assert not torch.allclose(by_pred, fn(model, x, labels, heat, n_steps=4), atol=1e-4)
    both = sb.metrics.deletion_insertion(model, x, labels, heat, n_steps=4, target="predicted")
    given = sb.metrics.deletion_insertion(model, x, labels, heat, n_steps=4, target="predicted", clean_logits=logits)
    ref = sb.metrics.deletion_insertion(model, x, pred, heat, n_steps=4)
    for m in ("deletion", "insertion"):
        assert torch.allclose(both[m][1], ref[m][1], atol=1e-6) and torch.allclose(given[m][1], ref[m][1], atol=1e-6)
    with pytest.raises(InvalidInputError, match="clean_logits"):
        sb.metrics.deletion_insertion(model, x, labels, heat, target="predicted", clean_scores=torch.ones(3))
    with pytest.raises(InvalidInputError, match="target"):
        sb.metrics.deletion(model, x, labels, heat, target="top1")


def test_group_scorer_shares_one_call_and_falls_back_per_curve(curve_case):
    model, x, labels, _, logits, heat = curve_case
    assert GROUPS["perturbation_curves"] is score_perturbation_curves
    batch = ScoreBatch(model, x, labels, heat, logits=logits, seed=4)
    params = {m: sb.get_metric(m).resolve_params({"n_steps": 4}) for m in ("deletion", "insertion")}
    out = score_perturbation_curves(batch, params)
    ref = sb.metrics.deletion_insertion(model, x, labels, heat, n_steps=4, seed=4)
    for m in ("deletion", "insertion"):
        assert np.allclose(out[m].values[m], ref[m][0].numpy(), atol=1e-6)
        assert out[m].params["seed"] == 4 and "return_curves" not in out[m].params
        curves = [json.loads(c) for c in out[m].extra["curve"]]
        assert np.allclose(curves, ref[m][1].numpy(), atol=1e-6)
        assert all(c == round(c, 6) for row in curves for c in row)
    params["insertion"] = {**params["insertion"], "target": "predicted", "seed": 9}  # differs: each on its own
    out = score_perturbation_curves(batch, params)
    assert np.allclose(out["insertion"].values["insertion"],
                       sb.metrics.insertion(model, x, labels, heat, n_steps=4, seed=9, target="predicted").numpy(),
                       atol=1e-6)
    assert np.allclose(out["deletion"].values["deletion"], ref["deletion"][0].numpy(), atol=1e-6)
    only = score_perturbation_curves(batch, {"deletion": params["deletion"]})
    assert list(only) == ["deletion"]
    with pytest.raises(InvalidInputError, match="perturbation_curves"):
        score_perturbation_curves(batch, {"pxap": {}})


def test_perturbation_constraints():
    spec = sb.get_metric("deletion")
    for params in ({"n_steps": 0}, {"step": 0}, {"substrate": "noise"}, {"score": "softmax"}, {"target": "top1"},
                   {"batch_size": 0}, {"batch_size": "big"}, {"precision": "int8"}, {"seed": -1},
                   {"n_steps": float("nan")}):
        with pytest.raises(InvalidInputError):
            spec.check_params(params)
    spec.check_params({"substrate": 0.5, "batch_size": "auto", "target": "predicted", "seed": 3})
    model, x, heat = make_model("resnet10t"), make_images(1, 16), torch.rand(1, 16, 16)
    for kwargs in ({"n_steps": float("nan")}, {"step": float("nan")}, {"step": 2.5}, {"seed": -1},
                   {"substrate": "noise"}, {"score": "softmax"}):
        with pytest.raises(InvalidInputError):
            sb.metrics.deletion(model, x, torch.tensor([0]), heat, **kwargs)

