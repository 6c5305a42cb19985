"""Random-logit test (Sixt, Granz, Landgraf. When Explanations Lie: Why Many Modified BP
Attributions Fail. ICML 2020), as Quantus' ``RandomLogit``.

A class-sensitive explanation of class t should differ from the explanation of another
class: the metric is the similarity between the map for the target class and the map for a
random other class (lower is better). One extra :func:`~saliencybench.methods.base.explain`
call, on the whole batch with the off-classes as targets; the target-class maps are the
run's heatmaps when given.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import explain, get_method
from ..modelutil import model_guard, num_classes
from ..validation import check_images, check_targets
from .base import MetricResult, MetricSpec, ScoreBatch, register_metric

LAYOUTS = ("flat", "2d")
SSIM_WINDOW = 7


def off_classes(targets: torch.Tensor, n_classes: int, seed: int = 0) -> torch.Tensor:
    """A random class other than each target: LongTensor[B], uniform over the n_classes - 1 others.

    Quantus' draw: ``np.random.seed(seed)`` then ``randint(0, n_classes - 1, B)`` indexes the
    other classes in increasing order; we draw from ``np.random.RandomState(seed)`` (the same
    generator, without touching numpy's global state), so the same seed gives Quantus'
    off-classes for a batch of the same images.
    """
    if n_classes < 2:
        raise InvalidInputError(f"random_logit needs a model with at least 2 classes, got {n_classes}")
    idx = torch.as_tensor(np.random.RandomState(seed).randint(0, n_classes - 1, targets.shape[0]),
                          device=targets.device)
    return idx + (idx >= targets).long()


def max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map of Tensor[B,...] divided by its max |value| (Quantus' ``normalise_by_max`` per map);
    all-zero maps are left as they are."""
    flat = maps.flatten(1)
    m = flat.abs().amax(1, keepdim=True)
    return (flat / torch.where(m == 0, torch.ones_like(m), m)).view_as(maps)


def box_ssim(a: torch.Tensor, b: torch.Tensor, layout: str = "flat") -> torch.Tensor:
    """Mean SSIM of each pair of maps Tensor[B,H,W] as scikit-image's ``structural_similarity``
    defaults: a 7-tap uniform window, sample covariance (N/(N-1)), K1=0.01, K2=0.03, averaged
    over the window's valid region; ``data_range`` per pair = max - min over both maps (Quantus'
    ``ssim``). ``layout="flat"``: over the row-major flattened maps (a 1-D signal of H*W values:
    what Quantus' ``RandomLogit`` passes to scikit-image); ``"2d"``: 7x7 windows over the map.
    Returns float64 Tensor[B]; a pair of equal constant maps (data range 0) scores 1.
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    a, b = a.double(), b.double()
    if layout == "flat":
        a, b = a.flatten(1)[:, None], b.flatten(1)[:, None]
        pool, n_win = (lambda x: F.avg_pool1d(x, SSIM_WINDOW, 1)), SSIM_WINDOW
        size = a.shape[-1]
    else:
        a, b = a[:, None], b[:, None]
        pool, n_win = (lambda x: F.avg_pool2d(x, SSIM_WINDOW, 1)), SSIM_WINDOW**2
        size = min(a.shape[-2:])
    if size < SSIM_WINDOW:
        raise InvalidInputError(f"SSIM needs maps of at least {SSIM_WINDOW} pixels per side, got {tuple(a.shape[2:])}")
    both = torch.cat([a.flatten(1), b.flatten(1)], 1)
    rng = both.amax(1) - both.amin(1)
    c1 = ((0.01 * rng) ** 2).view(-1, *[1] * (a.ndim - 1))
    c2 = ((0.03 * rng) ** 2).view(-1, *[1] * (a.ndim - 1))
    cov = n_win / (n_win - 1)
    ma, mb = pool(a), pool(b)
    va, vb = cov * (pool(a * a) - ma**2), cov * (pool(b * b) - mb**2)
    vab = cov * (pool(a * b) - ma * mb)
    s = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return torch.where(rng == 0, torch.ones_like(rng), s.flatten(1).mean(1))


def _n_classes(model: nn.Module, images: torch.Tensor) -> int:
    """The model's number of classes (``model.num_classes``, else the width of its output)."""
    n = num_classes(model)
    if n is None:
        with model_guard(model), torch.inference_mode():
            n = int(model(images[:1]).shape[1])
    return n


def _score(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any]) -> MetricResult:
    """The registry's scorer: the run's heatmaps are the target-class maps (one extra explain call)."""
    out = random_logit(batch.model, batch.images, batch.targets, batch.method, batch.heatmaps, batch.method_params,
                       **p)
    return MetricResult({spec.name: out.cpu().numpy()})


@register_metric(
    "random_logit",
    paper="Sixt, Granz, Landgraf. When Explanations Lie: Why Many Modified BP Attributions Fail. ICML 2020 "
    "(as Quantus' RandomLogit)",
    higher_is_better=False, inputs="method", criterion="randomisation", value_range=(-1.0, 1.0),
    constraints={"layout": LAYOUTS},
    scorer=_score,
)
def random_logit(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, heatmaps: torch.Tensor | None = None,
    method_params: dict[str, Any] | None = None, off_targets: torch.Tensor | None = None, *, seed: int = 0,
    layout: str = "flat", normalise: bool = True,
) -> torch.Tensor:
    """SSIM between the map for the target class and the map for a random other class: Tensor[B], lower is better.

    Protocol (Quantus' ``RandomLogit``, defaults ``similarity_func=ssim, abs=False,
    normalise=True``): off-class t' drawn uniformly among the other classes (:func:`off_classes`,
    ``seed``; Quantus' default seed is 42), maps Phi_t(x) and Phi_t'(x) signed, each divided by
    its max |value| (``normalise``; Quantus divides by the max over its call batch: equal with
    Quantus ``batch_size=1``), similarity :func:`box_ssim` (``layout="flat"``: Quantus' SSIM over
    the flattened maps; ``"2d"``: over 7x7 windows of the map).
    images Tensor[B,3,H,W] normalised, targets LongTensor[B]; ``heatmaps`` Tensor[B,H,W] the
    target-class maps (computed when None); ``off_targets`` LongTensor[B] forces the off-classes
    (each must differ from its target). The model is left unchanged.
    """
    get_method(method)
    images = check_images(images)
    b, _, h, w = images.shape
    n_cls = _n_classes(model, images)
    targets = check_targets(targets, b, n_cls).to(images.device)
    params = dict(method_params or {})
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if off_targets is None:
        off_targets = off_classes(targets, n_cls, seed)
    else:
        off_targets = check_targets(off_targets, b, n_cls).to(images.device)
        same = (off_targets == targets).nonzero().flatten().tolist()
        if same:
            raise InvalidInputError(f"off_targets equal the targets for samples {same}; an off-class must differ")
    if heatmaps is None:
        heatmaps = explain(model, images, targets, method, **params)
    if not isinstance(heatmaps, torch.Tensor) or tuple(heatmaps.shape) != (b, h, w):
        raise InvalidInputError(f"heatmaps must be a Tensor[B,H,W] = {(b, h, w)}, got "
                                f"{getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    if not torch.isfinite(heatmaps).all():
        bad = (~torch.isfinite(heatmaps)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"heatmaps of samples {bad} contain NaN or infinite values; fix the method")
    other = explain(model, images, off_targets, method, **params)
    a, o = heatmaps.to(images.device).double(), other.double()
    if normalise:
        a, o = max_normalise(a), max_normalise(o)
    return box_ssim(a, o, layout).float()
