"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci, Kasneci. A Consistent and
Efficient Evaluation Strategy for Attribution Methods. ICML 2022; code tleemann/road_evaluation).

Protocol. Pixels are ranked by heatmap value, highest first (ties broken by a
seeded random permutation, as :func:`~saliencybench.metrics.perturbation_curves.pixel_ranks`).
At each fraction f (default 0.1, 0.2, ..., 0.9) the k = int(H*W*f) most relevant
pixels (MoRF) or the k least relevant (LeRF) are removed by *noisy linear
imputation* (the authors' ``NoisyLinearImputer``): each removed pixel is the
weighted mean of its in-image 8-neighbours, weight 1/6 for the four direct and
1/12 for the four diagonal ones; neighbours outside the image are dropped and the
mean divides by the in-image weights' sum s_i (the authors' diagonal is
``-(1 - the outside weights)``). All removed pixels of an image are unknowns of
one sparse linear system, per channel:
``s_i x_i - sum_{j removed} w_ij x_j = sum_{k kept} w_ik v_k``, solved exactly;
then Gaussian noise of std ``noise`` (default 0.01) is added to the imputed
values. The images here are normalised for the model, so the noise is in
normalised space (the authors impute before normalising, in [0,1] pixel space:
their 0.01 is 0.01/std_c here, about 0.044 for ImageNet's stds; the imputation
itself commutes with the per-channel normalisation). The curve is the tracked
score at each fraction; its summary is the *mean of the curve over the
fractions* (an AUC with equal weights, the clean image not included).

Tracked score: the target's softmax probability (``score="probability"``);
``score="accuracy"`` (1 when the perturbed image's top class is the target) is
what the authors' ``road_eval`` reports as the ROAD curve and what Quantus'
``ROAD`` returns; ``score="logit"`` optional. ``target="label"`` tracks the given
targets (the authors' accuracy compares with the data set's labels),
``"predicted"`` the clean image's top class (their probability uses the model's
predictions). MoRF: lower is better; LeRF: higher is better. The authors' LeRF
call ``ImputedDataset(remove=False, th_p=p)`` removes the H*W - int(H*W*p) least
relevant pixels, i.e. our LeRF at 1 - p; our fractions always count removed pixels.
The authors break ties by adding fixed 1e-4 noise to the min-max normalised map;
we use the seeded permutation, which orders any tie-free map as they do unless two
values lie within ~1e-4 of the map's range. Quantus' ``ROAD`` (MoRF only,
percentages) equals ours with ``score="accuracy"``, except that Quantus 0.6 ranks
the map broadcast to the three channels and so fails on RGB images (see the tests).

Cost. The solve is the cost. Per (image, order, fraction) the system is built
straight into compressed-column form from a neighbour table cached per image
size, ordered by a geometric nested dissection of the pixel grid (computed once
per size; restricted to any removed set it is still a fill-reducing order), and
factorised once by SuperLU without pivoting (the matrix is symmetric positive
definite) for the three channels as one multi-right-hand-side solve. The removed
sets of the fractions are nested, but one factorisation cannot serve them all:
that needs the fractions' pixels eliminated shell by shell, which fills the
factor about five times more and is slower than nine separate solves. The
perturbed images of all fractions, orders and images share forward passes of
``batch_size`` on the model's device (:func:`~saliencybench.modelutil.fast_inference`). The
imputer is :mod:`saliencybench.metrics.road_imputation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import report_progress
from ..modelutil import (
    fast_inference,
    model_guard,
    resolve_batch_size,
    safe_forward,
    target_score,
    upcast,
)
from ..validation import check_heatmaps, check_images
from .base import (
    MetricResult,
    MetricSpec,
    ScoreBatch,
    heatmap_form,
    register_metric,
    register_metric_group,
)
from .perturbation_curves import checked_batch, pixel_ranks
from .road_imputation import (  # noqa: F401 - the imputer's public names, re-exported
    NEIGHBOURS, _check_noise, _fill, _impute_into, _solutions, noisy_linear_impute, solve_imputation)

PAPER = ("Rong, Leemann, Borisov, Kasneci, Kasneci. A Consistent and Efficient Evaluation Strategy for "
         "Attribution Methods. ICML 2022")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("morf", "lerf")
ROAD_SCORES = ("probability", "logit", "accuracy")
TARGETS = ("label", "predicted")
def check_fractions(fractions: object) -> str | None:
    """The problem with ``fractions`` (a non-empty sequence of numbers in (0, 1)), or None."""
    if not isinstance(fractions, (list, tuple)) or not fractions:
        return "must be a non-empty list of fractions of pixels removed, each in (0, 1)"
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1]
    return f"must each lie in (0, 1) (strictly: removing no or all pixels is not a ROAD step); bad: {bad}" \
        if bad else None


def _removal_sets(ranks: np.ndarray, counts: Sequence[int], orders: Sequence[str]) -> list[np.ndarray]:
    """Removed pixel indices per (order, count), order-major: MoRF the ``k`` lowest ranks
    (most relevant), LeRF the ``k`` highest."""
    n = len(ranks)
    return [np.flatnonzero(ranks < k) if o == "morf" else np.flatnonzero(ranks >= n - k)
            for o in orders for k in counts]


def _perturbed_images(images: torch.Tensor, heatmaps: torch.Tensor, fractions: Sequence[float],
                      orders: Sequence[str], noise: float, seed: int):
    """Yield, per image, its ROAD images Tensor[O*F,3,H,W] (order-major) in the images' dtype and device.

    The noise of image i in order o comes from numpy's generator seeded with
    ``[seed, i, 0 (MoRF) or 1 (LeRF)]``, fraction after fraction, so an order's
    images do not depend on whether the other order is computed too.
    """
    _, c, h, w = images.shape
    counts = [int(h * w * f) for f in fractions]
    ranks = pixel_ranks(heatmaps, seed).cpu().numpy()
    for i, img in enumerate(images.detach().double().cpu().numpy()):
        sets = {o: _removal_sets(ranks[i], counts, [o]) for o in orders}
        solved = iter(_solutions(img, [r for o in orders for r in sets[o]]))
        stack = []
        for o in orders:
            rng = np.random.default_rng([seed, i, ORDERS.index(o)])
            stack += [_fill(img, rem, next(solved), noise, rng) for rem in sets[o]]
        yield torch.from_numpy(np.stack(stack)).to(images.device, images.dtype)


def stream_scores(stacks: Iterator[torch.Tensor], job_targets: torch.Tensor, batch_size: int,
                  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Scores Tensor[N] of the N inputs that ``stacks`` yields in stacks Tensor[n_i,3,H,W], in
    forward passes of exactly ``batch_size`` (the last one smaller) across stack boundaries:
    ``forward(x, job_targets[slice])`` per batch. Holds at most one batch plus one stack."""
    out: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    held = done = 0

    def flush(final: bool) -> None:
        nonlocal pending, held, done
        x = torch.cat(pending) if len(pending) > 1 else pending[0]
        while len(x) >= batch_size or (final and len(x)):
            batch, x = x[:batch_size], x[batch_size:]
            out.append(forward(batch, job_targets[done:done + len(batch)]))
            done += len(batch)
            report_progress(done, len(job_targets))
        pending, held = ([x] if len(x) else []), len(x)

    for stack in stacks:
        pending.append(stack)
        held += len(stack)
        if held >= batch_size:
            flush(False)
    if held:
        flush(True)
    return torch.cat(out)


def _check(heatmaps: torch.Tensor, fractions: object, order: str, noise: float, score: str,
           target: str) -> list[str]:
    """The orders to compute; raises :class:`InvalidInputError` on a bad option or a constant map."""
    problem = check_fractions(fractions)
    if problem:
        raise InvalidInputError(f"ROAD fractions {problem}, got {fractions!r}")
    if order not in (*ORDERS, "both"):
        raise InvalidInputError(f"ROAD order must be 'morf', 'lerf' or 'both', got {order!r}")
    if score not in ROAD_SCORES:
        raise InvalidInputError(f"ROAD score must be one of {ROAD_SCORES}, got {score!r}")
    if target not in TARGETS:
        raise InvalidInputError(f"ROAD target must be one of {TARGETS}, got {target!r}")
    _check_noise(noise)
    flat = heatmaps.flatten(1)
    const = (flat.amax(1) == flat.amin(1)).nonzero().flatten().tolist()
    if const:
        raise InvalidInputError(
            f"heatmaps of samples {const} are constant (e.g. all zero): ROAD removes pixels in heatmap order and "
            "a constant map has none; fix the method, or pass torch.rand maps to score random removal")
    return list(ORDERS) if order == "both" else [order]


def road_perturbations(images: torch.Tensor, heatmaps: torch.Tensor, *, fractions: Sequence[float] = FRACTIONS,
                       order: str = "morf", noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """The images ROAD scores: ``{order: Tensor[B,F,3,H,W]}`` for ``order`` ``morf``, ``lerf`` or
    ``both``; images Tensor[B,3,H,W] (normalised), heatmaps Tensor[B,H,W]. Exactly what :func:`road`
    feeds the model for the same arguments."""
    images = check_images(images)
    heatmaps = check_heatmaps(heatmaps, images).to(images.device)
    orders = _check(heatmaps, fractions, order, noise, "probability", "label")
    per = torch.stack(list(_perturbed_images(images, heatmaps, fractions, orders, noise, seed)))
    per = per.view(len(images), len(orders), len(fractions), *images.shape[1:])
    return {o: per[:, j] for j, o in enumerate(orders)}


def road(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    fractions: Sequence[float] = FRACTIONS, order: str = "morf", noise: float = 0.01, seed: int = 0,
    score: str = "probability", target: str = "label", batch_size: int | str = 64,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ROAD curves and summaries: ``{order: (summary Tensor[B], curves Tensor[B,F])}``.

    images Tensor[B,3,H,W] normalised for the model, targets LongTensor[B],
    heatmaps Tensor[B,H,W]; ``order`` ``"morf"``, ``"lerf"`` or ``"both"`` (both
    computed in one pass over the images); ``curves[:, j]`` is the tracked
    ``score`` after removing ``int(H*W*fractions[j])`` pixels; ``summary`` is the
    mean of the curve over the fractions. Protocol, scores and targets: see the
    module docstring. Deterministic for ``seed`` (tie-break and noise).
    """
    images, targets, heatmaps = checked_batch(model, images, targets, heatmaps)
    orders = _check(heatmaps, fractions, order, noise, score, target)
    batch_size = resolve_batch_size(batch_size, model, images)
    b, n_o, n_f = len(images), len(orders), len(fractions)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt:

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = upcast(safe_forward(model, fmt(x)))
            if score == "accuracy":
                return (logits.argmax(1) == t).to(logits.dtype)
            return target_score(logits, t, score)

        if target == "predicted":
            targets = torch.cat([safe_forward(model, fmt(images[i:i + batch_size])).argmax(1)
                                 for i in range(0, b, batch_size)])
        job_t = targets.repeat_interleave(n_o * n_f)
        scores = stream_scores(_perturbed_images(images, heatmaps, fractions, orders, noise, seed), job_t,
                               batch_size, forward)
    curves = scores.view(b, n_o, n_f)
    return {o: (curves[:, j].mean(1), curves[:, j]) for j, o in enumerate(orders)}


# ---- registry ---------------------------------------------------------------------------------

CONSTRAINTS = {"fractions": check_fractions, "noise": ">=0", "score": ROAD_SCORES, "target": TARGETS}


def curve_column(curves: torch.Tensor) -> list[str]:
    """Per-image curves Tensor[B,F] as JSON strings (the results' ``curve`` column)."""
    return [json.dumps([round(float(c), 6) for c in row]) for row in curves]


def road_group_scorer(batch: ScoreBatch, requested: dict[str, dict[str, Any]]) -> dict[str, MetricResult]:
    """Score the requested ROAD members (``road_morf``, ``road_lerf``); members with the same
    parameters share one :func:`road` call (``order="both"``)."""
    heat = heatmap_form(batch.heatmaps, "as_is")
    out: dict[str, MetricResult] = {}
    todo = list(requested.items())
    while todo:
        name, params = todo.pop(0)
        names = [name] + [n for n, p in todo if p == params]
        todo = [(n, p) for n, p in todo if n not in names]
        orders = [n.removeprefix("road_") for n in names]
        res = road(batch.model, batch.images, batch.targets, heat, order="both" if len(orders) == 2 else orders[0],
                   **params)
        for n, o in zip(names, orders):
            summary, curves = res[o]
            out[n] = MetricResult({n: summary}, extra={"curve": curve_column(curves)}, params=dict(params))
    return out


def _member_scorer(spec: MetricSpec, batch: ScoreBatch, params: dict[str, Any]) -> MetricResult:
    return road_group_scorer(batch, {spec.name: params})[spec.name]


register_metric_group("road", road_group_scorer)


@register_metric("road_morf", paper=PAPER, higher_is_better=False, inputs="model", criterion="faithfulness",
                 columns=("curve",), group="road", constraints=CONSTRAINTS, scorer=_member_scorer)
def road_morf(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    fractions: tuple[float, ...] | list[float] = FRACTIONS, noise: float = 0.01, seed: int = 0,
    score: str = "probability", target: str = "label", batch_size: int | str = 64,
) -> torch.Tensor:
    """ROAD MoRF (lower is better): mean score over fractions after imputing the most relevant pixels.

    Tensor[B]; shapes, protocol and parameters as :func:`road` with ``order="morf"``.
    """
    return road(model, images, targets, heatmaps, fractions=fractions, order="morf", noise=noise, seed=seed,
                score=score, target=target, batch_size=batch_size)["morf"][0]


@register_metric("road_lerf", paper=PAPER, higher_is_better=True, inputs="model", criterion="faithfulness",
                 columns=("curve",), group="road", constraints=CONSTRAINTS, scorer=_member_scorer)
def road_lerf(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    fractions: tuple[float, ...] | list[float] = FRACTIONS, noise: float = 0.01, seed: int = 0,
    score: str = "probability", target: str = "label", batch_size: int | str = 64,
) -> torch.Tensor:
    """ROAD LeRF (higher is better): mean score over fractions after imputing the least relevant pixels.

    Tensor[B]; shapes, protocol and parameters as :func:`road` with ``order="lerf"``.
    """
    return road(model, images, targets, heatmaps, fractions=fractions, order="lerf", noise=noise, seed=seed,
                score=score, target=target, batch_size=batch_size)["lerf"][0]
