"""Complexity of explanations: how concentrated a map's absolute mass is.

- :func:`sparseness`: the Gini index (Chalasani, Chen, Chowdhury, Wu, Jha. Concise
  Explanations of Neural Networks using Adversarial Training. ICML 2020), higher is better;
- :func:`complexity`: the Shannon entropy of the normalised map (Bhatt, Weller, Moura.
  Evaluating and Aggregating Feature-based Model Explanations. IJCAI 2020), lower is better.

Both need only the heatmaps (``inputs="heatmaps"``, at the input resolution). Both take absolute
values (``heatmap="abs"``, as Quantus' ``abs=True``). One sort or one sum per map, batched;
no loop over pixels.

An all-zero map has no distribution of mass: it is scored as a constant map (the least
concentrated one): sparseness 0 and complexity log(n), the worst values, so a method cannot
gain by returning nothing; a :class:`~saliencybench.errors.ConstantHeatmapWarning` names the
samples. (Quantus refuses a batch whose maps are all zero with an AssertionError; an all-zero map
in a batch with others gets sparseness 0, through its +1e-7, and complexity NaN, from 0/0.) NaN or infinite
maps are an :class:`~saliencybench.errors.InvalidInputError`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..errors import ConstantHeatmapWarning, InvalidInputError
from ..methods.base import add_note
from .base import MetricResult, MetricSpec, ScoreBatch, heatmap_form, register_metric


def _flat_abs(heatmaps: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(|heatmaps| flattened to float64 Tensor[B,n], bool Tensor[B] of all-zero maps); checks the input."""
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.ndim != 3 or heatmaps.shape[0] == 0:
        raise InvalidInputError(f"{name}: heatmaps must be a Tensor[B,H,W] with B >= 1, got "
                                f"{getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    if not heatmaps.is_floating_point():
        heatmaps = heatmaps.double()
    if not torch.isfinite(heatmaps).all():
        bad = (~torch.isfinite(heatmaps)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"{name}: heatmaps of samples {bad} contain NaN or infinite values; fix the method "
                                "producing them (or replace them with torch.nan_to_num)")
    a = heatmaps.detach().double().abs().flatten(1)
    zero = a.amax(1) == 0
    if zero.any():
        idx = zero.nonzero().flatten().tolist()
        text = (f"{name}: the maps of samples {idx} are all zero; they are scored as constant maps "
                "(no concentration: the metric's worst value)")
        warnings.warn(text, ConstantHeatmapWarning, stacklevel=3)
        add_note(text)
    return a, zero


def _heatmap_scorer(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any]) -> MetricResult:
    """Score a heatmap-only metric: ``spec.fn(heatmaps in the spec's form, **p)``; model and images unused."""
    out = spec.fn(heatmap_form(batch.heatmaps, spec.heatmap), **p)
    return MetricResult({spec.name: out.detach().cpu().numpy()})


@register_metric(
    "sparseness",
    paper="Chalasani, Chen, Chowdhury, Wu, Jha. Concise Explanations of Neural Networks using Adversarial Training. "
    "ICML 2020 (Gini index; as Quantus' Sparseness)",
    higher_is_better=True, inputs="heatmaps", criterion="complexity", heatmap="abs", constraints={"eps": ">=0"},
    scorer=_heatmap_scorer,
)
def sparseness(heatmaps: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Gini index of each absolute map: Tensor[B] in [0, (n-1)/n], higher is sparser (better).

    heatmaps Tensor[B,H,W] (any sign; absolute values are taken), n = H*W. Protocol (Quantus'
    ``Sparseness``, defaults ``abs=True, normalise=True``): a = |h| / max|h| + ``eps`` (Quantus
    adds 1e-7; ``eps=0`` is the exact Gini index), sorted ascending a_(1) <= ... <= a_(n), then
    G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i)). A one-hot map scores (n-1)/n (with eps=0),
    a constant map 0. Quantus divides by the max over its whole batch (the axes default);
    we divide each map by its own max, which equals Quantus on one map at a time.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InvalidInputError(f"sparseness: eps must be a finite number >= 0, got {eps!r}")
    a, zero = _flat_abs(heatmaps, "sparseness")
    n = a.shape[1]
    a = a / torch.where(zero, torch.ones_like(zero, dtype=a.dtype), a.amax(1))[:, None] + eps
    a = a.sort(dim=1).values
    w = 2 * torch.arange(1, n + 1, dtype=a.dtype, device=a.device) - n - 1
    total = a.sum(1)
    gini = (a * w).sum(1) / (n * torch.where(total == 0, torch.ones_like(total), total))
    return gini.float()


@register_metric(
    "complexity",
    paper="Bhatt, Weller, Moura. Evaluating and Aggregating Feature-based Model Explanations. IJCAI 2020 "
    "(entropy of the normalised absolute map; as Quantus' Complexity)",
    higher_is_better=False, inputs="heatmaps", criterion="complexity", heatmap="abs", value_range=(0.0, math.inf),
    unit="nats", scorer=_heatmap_scorer,
)
def complexity(heatmaps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log, nats) of each normalised absolute map: Tensor[B] in [0, log n].

    heatmaps Tensor[B,H,W] (absolute values are taken), n = H*W. Protocol (Quantus'
    ``Complexity``): p = |h| / sum |h| over the map's pixels, C = -sum_i p_i log p_i with
    0 log 0 = 0 (Quantus computes log(p + 1e-12), which differs by at most n * 1e-12; its
    max-normalisation first does not change p). A uniform map scores log n, a one-hot map 0.
    """
    a, zero = _flat_abs(heatmaps, "complexity")
    a = torch.where(zero[:, None], torch.ones_like(a), a)
    p = a / a.sum(1, keepdim=True)
    return (-torch.special.xlogy(p, p).sum(1)).float()
