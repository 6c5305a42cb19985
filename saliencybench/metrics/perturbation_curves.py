"""Deletion and insertion (Petsiuk, Das, Saenko. RISE. BMVC 2018).

Protocol. Pixels are ranked by heatmap value, highest first; ties are broken by
a seeded random permutation, so flat regions are not removed in raster order.
All channels of a pixel change together, ``step`` pixels per step (default the
image width, RISE's 224 at 224x224), so there are n = ceil(H*W/step) steps and
n+1 points. Deletion moves from the image to the substrate (default zeros in
normalised space, i.e. the dataset mean); insertion moves from a blurred copy
(Gaussian kernel 11, sigma 5, zero padding, as RISE's code) to the image. The
tracked score is the target's softmax probability (``score="logit"`` optional).
AUC: trapezoid over the exact fraction of pixels changed at each point, both end
points included, so it lies in [0,1] for probabilities and equals RISE's
``(sum(s) - s_0/2 - s_n/2) / n`` when ``step`` divides H*W.

All (image, step) jobs are scored in forward passes of ``batch_size`` images,
built on the device; each point is scored once, and :func:`deletion_insertion`
scores the clean image once for both curves and the points of both curves in
shared batches. Float32 passes run channels_last with batch norms folded into
their convolutions (:func:`~saliencybench.modelutil.fast_inference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import batch_slices, generator
from ..modelutil import (autocast, fast_inference, model_guard, num_classes, resolve_batch_size, safe_forward,
                         target_score, upcast)
from ..validation import check_heatmaps, check_images, check_targets
from .base import register_metric

SUBSTRATES = ("zeros", "blur", "mean")
PAPER = "Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. BMVC 2018"


@lru_cache(maxsize=8)
def _rise_kernel(klen: int, sigma: float) -> np.ndarray:
    """RISE's ``gkern``: a centred delta filtered by scipy's gaussian_filter (klen x klen)."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    return gaussian_filter(delta, sigma).astype(np.float32)


def blur(images: torch.Tensor, klen: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: per-channel Gaussian blur with zero padding: Tensor[B,3,H,W]."""
    k = torch.from_numpy(_rise_kernel(klen, sigma)).to(images.device, images.dtype)
    c = images.shape[1]
    return F.conv2d(images, k.expand(c, 1, klen, klen), padding=klen // 2, groups=c)


def make_substrate(images: torch.Tensor, substrate: str | float | torch.Tensor) -> torch.Tensor:
    """The substrate image(s) Tensor[B,3,H,W] for ``zeros``/``blur``/``mean``/a value/a tensor."""
    if isinstance(substrate, torch.Tensor):
        sub = substrate.to(images.device, images.dtype)
        try:
            return sub.expand_as(images)
        except RuntimeError:
            raise InvalidInputError(
                f"substrate tensor of shape {tuple(sub.shape)} does not broadcast to the images' "
                f"{tuple(images.shape)}"
            ) from None
    if isinstance(substrate, (int, float)):
        return torch.full_like(images, float(substrate))
    if substrate == "zeros":
        return torch.zeros_like(images)
    if substrate == "blur":
        return blur(images)
    if substrate == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    raise InvalidInputError(f"unknown substrate {substrate!r}; use one of {SUBSTRATES}, a number or a tensor")


def pixel_ranks(heatmaps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of each pixel in descending heatmap order: LongTensor[B,H*W], 0 = most salient.

    Ties are broken by a random permutation per image drawn from ``seed``.
    """
    b, h, w = heatmaps.shape
    g = generator(seed)
    perm = torch.stack([torch.randperm(h * w, generator=g) for _ in range(b)]).to(heatmaps.device)
    vals = heatmaps.flatten(1).gather(1, perm)
    order = perm.gather(1, torch.argsort(vals, dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=heatmaps.device).expand(b, -1))
    return ranks


def curve_points(n_pixels: int, step: int | None, n_steps: int | None, width: int) -> torch.Tensor:
    """Number of pixels changed at each curve point: LongTensor[n+1], from 0 to ``n_pixels``."""
    if step is not None and n_steps is not None:
        raise InvalidInputError("give either step or n_steps, not both")
    if n_steps is not None:
        if n_steps < 1:
            raise InvalidInputError(f"n_steps must be >= 1, got {n_steps}")
        step = math.ceil(n_pixels / n_steps)
    step = width if step is None else int(step)
    if step < 1:
        raise InvalidInputError(f"step must be >= 1 pixel, got {step}")
    n = math.ceil(n_pixels / step)
    return (torch.arange(n + 1) * step).clamp(max=n_pixels)


def _score_paths(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor,
    paths: list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]], score: str, batch_size: int,
    fmt: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> list[torch.Tensor]:
    """Scores Tensor[B,n+1] along each path ``(start, end, skip)``, all paths' points in shared batches.

    At point k the ``counts[k]`` highest-ranked pixels come from ``end``
    Tensor[B,3,H,W], the rest from ``start``. Points in ``skip`` (index -> Tensor[B]
    of known scores) are not evaluated. ``fmt`` puts a batch in the model's memory
    format; each batch is written straight into one buffer in that format, an
    image's points as one broadcast ``where`` (no per-point copies of the images).
    """
    b, c, h, w = images.shape
    n_pts = len(counts)
    curves = [torch.empty(b, n_pts, device=images.device, dtype=torch.float32) for _ in paths]
    jobs = []  # (path, image, point), image-major within a path so an image's points are adjacent
    for p, (start, end, skip) in enumerate(paths):
        for k, v in skip.items():
            curves[p][:, k] = v
        todo = [k for k in range(n_pts) if k not in skip]
        jobs += [(p, i, k) for i in range(b) for k in todo]
    if not jobs:
        return curves
    sources = [(fmt(start), fmt(end)) for start, end, _ in paths]
    job_t = torch.tensor(jobs, dtype=torch.long, device=images.device)
    cnt = counts.to(images.device)
    buffer = fmt(torch.empty(min(batch_size, len(jobs)), c, h, w, device=images.device, dtype=images.dtype))
    for sl in batch_slices(len(jobs), batch_size):
        pp, ii, kk = job_t[sl].unbind(1)
        changed = (ranks[ii] < cnt[kk][:, None]).view(-1, 1, h, w)
        x = buffer[: len(pp)]
        first = 0
        for last in [*torch.nonzero((pp[1:] != pp[:-1]) | (ii[1:] != ii[:-1])).flatten().tolist(), len(pp) - 1]:
            p, i = jobs[sl.start + first][:2]
            start, end = sources[p]
            torch.where(changed[first : last + 1], end[i : i + 1], start[i : i + 1], out=x[first : last + 1])
            first = last + 1
        scores = target_score(upcast(safe_forward(model, x)), targets[ii], score).float()
        for p in pp.unique().tolist():
            sel = pp == p
            curves[p][ii[sel], kk[sel]] = scores[sel]
    return curves


def _auc(curves: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(curves, xs.to(curves), dim=1)


def _prepare(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor):
    images = check_images(images)
    targets = check_targets(targets, images.shape[0], num_classes(model)).to(images.device)
    heatmaps = check_heatmaps(heatmaps, images).to(images.device)
    return images, targets, heatmaps


def deletion_insertion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, deletion_substrate: str | float | torch.Tensor = "zeros",
    insertion_substrate: str | float | torch.Tensor = "blur", score: str = "probability", seed: int = 0,
    batch_size: int | str = 64, clean_scores: torch.Tensor | None = None, precision: str = "float32",
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Both curves with the clean image scored once: ``{"deletion"|"insertion": (auc[B], curves[B,n+1], x[n+1])}``.

    ``clean_scores`` Tensor[B]: the clean images' ``score``, when the caller has it
    already (then the clean images are not scored here at all). ``batch_size``
    ``"auto"`` sizes batches from free memory; any batch that runs out of memory
    is split. ``precision``: ``float32``, or ``bfloat16``/``float16`` autocast
    (for GPUs; check against float32 on your model).
    """
    images, targets, heatmaps = _prepare(model, images, targets, heatmaps)
    b, _, h, w = images.shape
    counts = curve_points(h * w, step, n_steps, w)
    xs = counts.double() / (h * w)
    ranks = pixel_ranks(heatmaps, seed)
    n = len(counts) - 1
    batch_size = resolve_batch_size(batch_size, model, images)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt, \
            autocast(images, precision):
        clean = clean_scores.float().to(images.device) if clean_scores is not None else torch.cat(
            [target_score(upcast(safe_forward(model, fmt(images[sl]))), targets[sl], score).float()
             for sl in batch_slices(b, batch_size)])
        dele, ins = _score_paths(model, images, targets, ranks, counts, [
            (images, make_substrate(images, deletion_substrate), {0: clean}),
            (make_substrate(images, insertion_substrate), images, {n: clean})], score, batch_size, fmt)
    return {"deletion": (_auc(dele, xs), dele, xs), "insertion": (_auc(ins, xs), ins, xs)}


def _one_curve(
    kind: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, step: int | None,
    n_steps: int | None, substrate: str | float | torch.Tensor, score: str, seed: int, batch_size: int | str,
    return_curves: bool, precision: str,
):
    images, targets, heatmaps = _prepare(model, images, targets, heatmaps)
    _, _, h, w = images.shape
    counts = curve_points(h * w, step, n_steps, w)
    xs = counts.double() / (h * w)
    ranks = pixel_ranks(heatmaps, seed)
    sub = make_substrate(images, substrate)
    start, end = (images, sub) if kind == "deletion" else (sub, images)
    batch_size = resolve_batch_size(batch_size, model, images)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt, \
            autocast(images, precision):
        curves, = _score_paths(model, images, targets, ranks, counts, [(start, end, {})], score, batch_size, fmt)
    auc = _auc(curves, xs)
    return (auc, curves, xs) if return_curves else auc


@register_metric("deletion", paper=PAPER, higher_is_better=False, inputs="model", criterion="faithfulness",
                 columns=("curve",), group="perturbation_curves")
def deletion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, substrate: str | float | torch.Tensor = "zeros",
    score: str = "probability", seed: int = 0, batch_size: int | str = 64, return_curves: bool = False,
    precision: str = "float32",
):
    """Deletion AUC (lower is better): remove the most salient pixels first.

    images Tensor[B,3,H,W], targets LongTensor[B], heatmaps Tensor[B,H,W] ->
    AUC Tensor[B]; with ``return_curves=True`` also curves Tensor[B,n+1] and the
    x-axis Tensor[n+1] (fraction of pixels removed). ``batch_size`` and
    ``precision`` as in :func:`deletion_insertion`.
    """
    return _one_curve("deletion", model, images, targets, heatmaps, step, n_steps, substrate, score, seed,
                      batch_size, return_curves, precision)


@register_metric("insertion", paper=PAPER, higher_is_better=True, inputs="model", criterion="faithfulness",
                 columns=("curve",), group="perturbation_curves")
def insertion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, substrate: str | float | torch.Tensor = "blur",
    score: str = "probability", seed: int = 0, batch_size: int | str = 64, return_curves: bool = False,
    precision: str = "float32",
):
    """Insertion AUC (higher is better): reveal the most salient pixels first onto ``substrate``.

    Shapes as :func:`deletion`; the x-axis is the fraction of pixels inserted.
    """
    return _one_curve("insertion", model, images, targets, heatmaps, step, n_steps, substrate, score, seed,
                      batch_size, return_curves, precision)
