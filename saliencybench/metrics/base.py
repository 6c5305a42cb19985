"""The metric contract and registry.

A metric declares its paper, what it consumes (``inputs``: ``"model"`` metrics
take model, images, targets and heatmaps; ``"masks"`` and ``"boxes"`` metrics take
heatmaps and ground truth; ``"sanity"`` takes the method itself), its score
direction and range, so leaderboards rank without special cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry, keyword_defaults

METRIC_INPUTS = ("model", "masks", "boxes", "sanity")


@dataclass
class MetricSpec:
    """A registered metric: callable plus metadata."""

    name: str
    fn: Callable[..., Any]
    paper: str
    higher_is_better: bool
    inputs: str
    value_range: tuple[float, float] = (0.0, 1.0)
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


METRICS: Registry[MetricSpec] = Registry("metric")


def register_metric(
    name: str, *, paper: str, higher_is_better: bool, inputs: str, value_range: tuple[float, float] = (0.0, 1.0)
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as metric ``name``."""
    if inputs not in METRIC_INPUTS:
        raise ValueError(f"inputs must be one of {METRIC_INPUTS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        METRICS.add(name, MetricSpec(name, fn, paper, higher_is_better, inputs, value_range, keyword_defaults(fn), summary))
        return fn

    return deco


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    return METRICS.names()


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered as ``name`` (unknown names list the valid ones)."""
    return METRICS.get(name)
