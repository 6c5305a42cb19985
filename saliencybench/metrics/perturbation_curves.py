"""Deletion and insertion (Petsiuk, Das, Saenko. RISE. BMVC 2018).

Protocol. Pixels are ranked by heatmap value, highest first; ties are broken by
a seeded random permutation, so flat regions are not removed in raster order.
All channels of a pixel change together, ``step`` pixels per step (default the
image width, RISE's 224 at 224x224), so there are n = ceil(H*W/step) steps and
n+1 points. Deletion moves from the image to the substrate (default zeros in
normalised space, i.e. the dataset mean); insertion moves from a blurred copy
(Gaussian kernel 11, sigma 5, zero padding, as RISE's code) to the image. The
tracked score is a class's softmax probability (``score="logit"`` optional):
``target="label"`` (default) the given target (the explained class, usually the
ground-truth label); ``target="predicted"`` the clean image's top-1 class, what RISE's
own evaluation code tracks (eclique/RISE ``evaluation.py``: the argmax of the model on
the clean image), which can differ from the label on misclassified images.
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

import json
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import batch_slices, generator, report_progress
from ..modelutil import (PRECISIONS, SCORES, autocast, fast_inference, model_guard, num_classes, resolve_batch_size,
                         safe_forward, target_score, upcast)
from ..validation import check_heatmaps, check_images, check_model_inputs, check_targets
from .base import MetricResult, ScoreBatch, heatmap_form, register_metric, register_metric_group

SUBSTRATES = ("zeros", "blur", "mean")
TARGETS = ("label", "predicted")
PAPER = "Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. BMVC 2018"


@lru_cache(maxsize=8)
def _rise_kernel(klen: int, sigma: float) -> np.ndarray:
    """RISE's ``gkern``: a centred delta filtered by scipy's gaussian_filter (klen x klen)."""
    from scipy.ndimage import gaussian_filter  # scipy is imported by the metrics that use it, on first use

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
    for name, v in (("step", step), ("n_steps", n_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise InvalidInputError(f"{name} must be a whole number (or None), got {v!r}")
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
        report_progress(sl.start, len(jobs))
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


def checked_batch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images Tensor[B,3,H,W] (matching the model's dtype and device), targets LongTensor[B] and heatmaps
    Tensor[B,H,W] checked for a model-input metric; raises :class:`InvalidInputError` naming the problem."""
    images = check_images(images)
    check_model_inputs(model, images)
    targets = check_targets(targets, images.shape[0], num_classes(model)).to(images.device)
    heatmaps = check_heatmaps(heatmaps, images).to(images.device)
    return images, targets, heatmaps


def _prepare(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, target: str,
             seed: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    images, targets, heatmaps = checked_batch(model, images, targets, heatmaps)
    if target not in TARGETS:
        raise InvalidInputError(f"target must be one of {list(TARGETS)} (the given targets or the clean top-1 class), "
                                f"got {target!r}")
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer (or None for 0), got {seed!r}")
    return images, targets, heatmaps, seed


def _forward_logits(model: nn.Module, images: torch.Tensor, batch_size: int, fmt: Callable) -> torch.Tensor:
    return torch.cat([upcast(safe_forward(model, fmt(images[sl]))).float() for sl in batch_slices(len(images),
                                                                                                  batch_size)])


def deletion_insertion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, deletion_substrate: str | float | torch.Tensor = "zeros",
    insertion_substrate: str | float | torch.Tensor = "blur", score: str = "probability", target: str = "label",
    seed: int | None = None, batch_size: int | str = 64, clean_scores: torch.Tensor | None = None,
    clean_logits: torch.Tensor | None = None, precision: str = "float32",
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Both curves with the clean image scored once: ``{"deletion"|"insertion": (auc[B], curves[B,n+1], x[n+1])}``.

    ``target``: ``"label"`` tracks ``targets``; ``"predicted"`` the clean images' top-1
    class (RISE's code). ``clean_logits`` Tensor[B,C]: the clean images' logits, when
    the caller has them (the clean images are then not scored here; with
    ``target="predicted"`` their argmax is the tracked class). ``clean_scores``
    Tensor[B]: the clean images' ``score`` of the tracked class instead (only with
    ``target="label"``). ``seed`` (None: 0) breaks heatmap ties. ``batch_size``
    ``"auto"`` sizes batches from free memory; any batch that runs out of memory is
    split. ``precision``: ``float32``, or ``bfloat16``/``float16`` autocast (for GPUs;
    check against float32 on your model).
    """
    images, targets, heatmaps, seed = _prepare(model, images, targets, heatmaps, target, seed)
    b, _, h, w = images.shape
    if clean_logits is not None and (not isinstance(clean_logits, torch.Tensor) or clean_logits.ndim != 2
                                     or clean_logits.shape[0] != b):
        raise InvalidInputError(f"clean_logits must be a Tensor[B,C] with B={b}, "
                                f"got {getattr(clean_logits, 'shape', type(clean_logits).__name__)}")
    if target == "predicted" and clean_scores is not None and clean_logits is None:
        raise InvalidInputError("target='predicted' tracks the clean top-1 class, which clean_scores cannot tell; "
                                "pass clean_logits instead")
    counts = curve_points(h * w, step, n_steps, w)
    xs = counts.double() / (h * w)
    ranks = pixel_ranks(heatmaps, seed)
    n = len(counts) - 1
    batch_size = resolve_batch_size(batch_size, model, images)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt, \
            autocast(images, precision):
        logits = clean_logits.float().to(images.device) if clean_logits is not None else None
        if logits is None and (clean_scores is None or target == "predicted"):
            logits = _forward_logits(model, images, batch_size, fmt)
        if target == "predicted":
            targets = logits.argmax(1)
        clean = clean_scores.float().to(images.device) if clean_scores is not None else \
            target_score(logits, targets, score).float()
        dele, ins = _score_paths(model, images, targets, ranks, counts, [
            (images, make_substrate(images, deletion_substrate), {0: clean}),
            (make_substrate(images, insertion_substrate), images, {n: clean})], score, batch_size, fmt)
    return {"deletion": (_auc(dele, xs), dele, xs), "insertion": (_auc(ins, xs), ins, xs)}


def _one_curve(
    kind: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, step: int | None,
    n_steps: int | None, substrate: str | float | torch.Tensor, score: str, target: str, seed: int | None,
    batch_size: int | str, return_curves: bool, precision: str,
):
    images, targets, heatmaps, seed = _prepare(model, images, targets, heatmaps, target, seed)
    _, _, h, w = images.shape
    counts = curve_points(h * w, step, n_steps, w)
    xs = counts.double() / (h * w)
    ranks = pixel_ranks(heatmaps, seed)
    sub = make_substrate(images, substrate)
    start, end = (images, sub) if kind == "deletion" else (sub, images)
    batch_size = resolve_batch_size(batch_size, model, images)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt, \
            autocast(images, precision):
        if target == "predicted":
            targets = _forward_logits(model, images, batch_size, fmt).argmax(1)
        curves, = _score_paths(model, images, targets, ranks, counts, [(start, end, {})], score, batch_size, fmt)
    auc = _auc(curves, xs)
    return (auc, curves, xs) if return_curves else auc


def _substrate_rule(value: object) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    return None if value in SUBSTRATES else f"must be one of {list(SUBSTRATES)} or a number"


def _batch_size_rule(value: object) -> str | None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "must be a positive integer or 'auto'"


CONSTRAINTS = {"step": ">=1", "n_steps": ">=1", "substrate": _substrate_rule, "score": SCORES, "target": TARGETS,
               "seed": ">=0", "batch_size": _batch_size_rule, "precision": tuple(PRECISIONS)}


@register_metric("deletion", paper=PAPER, higher_is_better=False, inputs="model", criterion="faithfulness",
                 heatmap="as_is", columns=("curve",), group="perturbation_curves", constraints=CONSTRAINTS)
def deletion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, substrate: str | float | torch.Tensor = "zeros",
    score: str = "probability", target: str = "label", seed: int | None = None, batch_size: int | str = 64,
    return_curves: bool = False, precision: str = "float32",
):
    """Deletion AUC (lower is better): remove the most salient pixels first.

    images Tensor[B,3,H,W], targets LongTensor[B], heatmaps Tensor[B,H,W] ->
    AUC Tensor[B]; with ``return_curves=True`` also curves Tensor[B,n+1] and the
    x-axis Tensor[n+1] (fraction of pixels removed). ``target``: ``"label"`` (default,
    track ``targets``) or ``"predicted"`` (the clean top-1 class, RISE's code).
    ``seed`` (None: 0; the runner: the run's seed), ``batch_size`` and ``precision`` as
    in :func:`deletion_insertion`.
    """
    return _one_curve("deletion", model, images, targets, heatmaps, step, n_steps, substrate, score, target, seed,
                      batch_size, return_curves, precision)


@register_metric("insertion", paper=PAPER, higher_is_better=True, inputs="model", criterion="faithfulness",
                 heatmap="as_is", columns=("curve",), group="perturbation_curves", constraints=CONSTRAINTS)
def insertion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    step: int | None = None, n_steps: int | None = None, substrate: str | float | torch.Tensor = "blur",
    score: str = "probability", target: str = "label", seed: int | None = None, batch_size: int | str = 64,
    return_curves: bool = False, precision: str = "float32",
):
    """Insertion AUC (higher is better): reveal the most salient pixels first onto ``substrate``.

    Shapes and ``target`` as :func:`deletion`; the x-axis is the fraction of pixels inserted.
    """
    return _one_curve("insertion", model, images, targets, heatmaps, step, n_steps, substrate, score, target, seed,
                      batch_size, return_curves, precision)


SHARED_KEYS = ("step", "n_steps", "score", "target", "seed", "batch_size", "precision")
_CURVE_FNS = {"deletion": deletion, "insertion": insertion}


def curve_column(curves: torch.Tensor) -> list[str]:
    """The runner's ``curve`` column: per image a JSON list of the curve rounded to 6 digits."""
    return [json.dumps([round(float(c), 6) for c in row]) for row in curves.tolist()]


def score_perturbation_curves(batch: ScoreBatch, params: dict[str, dict]) -> dict[str, MetricResult]:
    """The ``perturbation_curves`` group scorer: ``{metric: resolved params}`` for the requested
    members of ``deletion`` / ``insertion`` -> ``{metric: MetricResult}`` (AUC values, the
    ``curve`` column, the parameters used).

    Both requested with the same shared parameters (step, n_steps, score, target, seed,
    batch_size, precision): one :func:`deletion_insertion` call, the clean images scored
    from ``batch.logits`` when given. Otherwise each curve on its own. ``seed`` None (the
    default) takes ``batch.seed``.
    """
    unknown = sorted(set(params) - set(_CURVE_FNS))
    if unknown:
        raise InvalidInputError(f"metrics {unknown} are not in the perturbation_curves group ({sorted(_CURVE_FNS)})")
    used = {}
    for name, p in params.items():
        p = {k: v for k, v in p.items() if k != "return_curves"}
        used[name] = {**p, "seed": batch.seed if p.get("seed") is None else p["seed"]}
    heat = heatmap_form(batch.heatmaps, "as_is")  # both members are registered with heatmap="as_is"
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shared = {name: {k: p.get(k) for k in SHARED_KEYS} for name, p in used.items()}
    if len(used) == 2 and shared["deletion"] == shared["insertion"]:
        res = deletion_insertion(batch.model, batch.images, batch.targets, heat, **shared["deletion"],
                                 deletion_substrate=used["deletion"].get("substrate", "zeros"),
                                 insertion_substrate=used["insertion"].get("substrate", "blur"),
                                 clean_logits=batch.logits)
        results = {name: (res[name][0], res[name][1]) for name in used}
    else:
        for name, p in used.items():
            auc, curves, _ = _CURVE_FNS[name](batch.model, batch.images, batch.targets, heat, **p, return_curves=True)
            results[name] = (auc, curves)
    return {name: MetricResult({name: auc.detach().cpu().numpy()}, extra={"curve": curve_column(curves)},
                               params=used[name]) for name, (auc, curves) in results.items()}


register_metric_group("perturbation_curves", score_perturbation_curves)
