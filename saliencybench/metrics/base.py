"""The metric contract and registry.

A metric is a pure function (the public API, e.g. ``sb.metrics.deletion(model,
images, targets, heatmaps)``) registered with :func:`register_metric` and the
metadata the runner, the leaderboard and the report need, so that none of them
names a metric:

- ``inputs``: what it consumes, a tuple of kinds: ``"heatmaps"`` (the maps alone, at the
  input resolution: complexity metrics), ``"model"`` (model, normalised
  images, targets and heatmaps at the model's input resolution), ``"masks"`` /
  ``"boxes"`` (heatmaps at the ground truth's resolution and the ground truth),
  ``"method"`` (it calls the explanation method again: sanity and robustness
  metrics), ``"labels"`` (the samples' classes), ``"pair"`` (the same images under a second
  model, attached as ``ScoreBatch.contrast``: the runner scores it on the config's ``pairs``);
- ``heatmap``: the form of the map it takes: ``"as_is"`` (whatever sign the method
  gives), ``"abs"`` (absolute values) or ``"positive"`` (negative values set to 0);
- ``higher_is_better``, ``value_range``, ``criterion`` (one of :data:`CRITERIA`),
  ``ranked`` (whether it has a rank term; diagnostics such as a fixed-threshold box
  IoU or the sanity check are reported, not ranked);
- ``level``: ``"image"`` (one value per image; the data-set score is ``reduce`` of
  the values, the mean by default) or ``"dataset"`` (per-image statistics from
  ``stats``, pooled by ``reduce``, e.g. MaxBoxAcc's per-threshold hits);
- ``columns``: names of further per-image columns it returns (``"curve"``);
- ``outputs``: names of further result rows it writes besides its own (the sanity
  check's per-stage similarities); they are reported, never ranked;
- ``group``: metrics sharing work are scored together by the group's scorer
  (:func:`register_metric_group`; deletion and insertion share clean scores and batches);
- ``scaled``: ``(H, W) -> {param: value}`` for defaults that depend on the image
  size (declared ``None`` in the signature); the resolved value is what is recorded;
- ``constraints``: ranges/choices checked with the config before any work starts;
- ``verdict``: for randomisation checks, the output whose per-image similarity at the last
  stage decides pass / fail (shown beside the ranks, never a rank term);
- ``unit``: what a value measures; ``"IoU"`` values of a box also give the CAM protocol's
  top-1/top-5 localisation error table;
- ``schedule``: runner options every metric takes (``n_images``: score only the
  first n images of the run; ``methods``: only these methods), with per-metric defaults.

The runner gives a metric a :class:`ScoreBatch` (one shard of one model and method)
and receives a :class:`MetricResult`; :meth:`MetricSpec.score` adapts the batch to the
function by its ``inputs`` unless the metric registers its own ``scorer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..registry import Constraint, Registry, check_params, keyword_defaults

METRIC_INPUTS = ("heatmaps", "model", "masks", "boxes", "method", "labels", "pair")
CRITERIA = ("faithfulness", "localisation", "randomisation", "robustness", "complexity", "model_use")
HEATMAP_FORMS = ("as_is", "abs", "positive")
LEVELS = ("image", "dataset")
SCHEDULE_KEYS = ("n_images", "methods")


def heatmap_form(heatmaps: torch.Tensor, form: str) -> torch.Tensor:
    """Heatmaps Tensor[B,H,W] in ``form``: ``as_is``, ``abs`` (|h|) or ``positive`` (max(h, 0))."""
    if form == "as_is":
        return heatmaps
    if form == "abs":
        return heatmaps.abs()
    if form == "positive":
        return heatmaps.clamp(min=0)
    raise InvalidInputError(f"unknown heatmap form {form!r}; use one of {HEATMAP_FORMS}")


@dataclass
class ScoreBatch:
    """What a metric is scored on: one shard of one (model, method).

    ``images`` Tensor[B,3,H,W] normalised for the model, ``targets`` LongTensor[B]
    (the explained classes), ``heatmaps`` Tensor[B,H,W] at the input resolution
    (as stored by the run), ``masks`` B bool Tensors[h_i,w_i] and ``boxes`` B float
    Tensors[n_i,4] at the resolution the ground truth is scored at (the input's for
    ``squash``, the original image's for ``shorter_side``), ``labels`` LongTensor[B]
    the samples' ground-truth classes, ``logits`` Tensor[B,C] the clean logits,
    ``method`` and ``method_params`` the method that made the heatmaps; ``contrast``: for
    ``"pair"`` metrics, the batch of the same images under the pair's second model.
    """

    model: nn.Module | None
    images: torch.Tensor
    targets: torch.Tensor
    heatmaps: torch.Tensor
    masks: list[torch.Tensor] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    labels: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    method: str = ""
    method_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    n_classes: int | None = None
    contrast: ScoreBatch | None = None

    def scored_heatmaps(self, form: str = "as_is") -> list[torch.Tensor]:
        """Each heatmap in ``form``, bilinearly resized to its ground truth's resolution: B Tensors[h_i,w_i]."""
        heat = heatmap_form(self.heatmaps, form)
        out = []
        for i, m in enumerate(self.masks):
            h = heat[i][None, None].float()
            if tuple(m.shape) != tuple(h.shape[-2:]):
                h = F.interpolate(h, size=tuple(m.shape), mode="bilinear", align_corners=False)
            out.append(h[0, 0].cpu())
        return out

    def shape_groups(self) -> list[list[int]]:
        """Indices of samples whose ground truth has the same resolution (batched together)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, m in enumerate(self.masks):
            groups.setdefault(tuple(m.shape), []).append(i)
        return list(groups.values())


@dataclass
class MetricResult:
    """A metric's result on a :class:`ScoreBatch` of B images.

    ``values``: output name -> Tensor or array[B] (the metric's own name is the main
    output; more names, such as the per-stage similarities of the sanity check, are
    further outputs); ``extra``: per-image columns (lists of B values, e.g. curves);
    ``stats``: for data-set-level metrics, the per-image statistics array[B,...]
    that ``reduce`` pools; ``params``: the parameters as resolved and used;
    ``rows``: optional row-wise results (each a dict with ``index`` (image position),
    ``metric``, ``value`` and any columns) for metrics with several values per image.
    """

    values: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)
    stats: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Pooled:
    """A metric's per-image results pooled over the images of one (model, method):
    ``values`` array[N], ``stats`` array[N,...] (data-set-level metrics) or None,
    ``labels`` int array[N] (the samples' classes), ``n_classes`` (of the data set)."""

    values: np.ndarray
    stats: np.ndarray | None = None
    labels: np.ndarray | None = None
    n_classes: int | None = None

    def take(self, idx: np.ndarray) -> Pooled:
        """The same pool restricted to (or resampled at) image positions ``idx``."""
        return Pooled(self.values[idx], None if self.stats is None else self.stats[idx],
                      None if self.labels is None else self.labels[idx], self.n_classes)


def mean_reduce(pool: Pooled, params: Mapping[str, Any]) -> float:
    """The default data-set score of an image-level metric: the mean over images (NaN ignored)."""
    v = pool.values[np.isfinite(pool.values)]
    return float(v.mean()) if len(v) else float("nan")


Scorer = Callable[["MetricSpec", ScoreBatch, dict[str, Any]], MetricResult]


@dataclass
class MetricSpec:
    """A registered metric: its function plus the metadata that drives the runner and leaderboard."""

    name: str
    fn: Callable[..., Any]
    paper: str
    higher_is_better: bool
    inputs: tuple[str, ...]
    criterion: str = "faithfulness"
    value_range: tuple[float, float] = (0.0, 1.0)
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    heatmap: str = "as_is"
    level: str = "image"
    outputs: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    group: str | None = None
    ranked: bool = True
    scaled: Callable[[int, int], dict[str, Any]] | None = None
    constraints: dict[str, Constraint] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=lambda: {"n_images": None, "methods": None})
    scorer: Scorer | None = None
    stats: Callable[..., np.ndarray] | None = None
    reduce: Callable[[Pooled, Mapping[str, Any]], float | dict[str, float]] = mean_reduce
    unit: str = ""
    verdict: str | None = None

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Names, types, ranges and scheduling options of ``params``; raises :class:`InvalidInputError`."""
        check_params("metric", self.name, params, self.fn, self.params, self.constraints,
                     extra={k: self.schedule.get(k) for k in SCHEDULE_KEYS})
        n = params.get("n_images")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidInputError(f"metric {self.name!r} option 'n_images' must be a positive integer, got {n!r}")
        methods = params.get("methods")
        if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
            raise InvalidInputError(f"metric {self.name!r} option 'methods' must be a list of method names")

    def split_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the function's parameters, the scheduling options with this metric's defaults)."""
        own = {k: v for k, v in params.items() if k not in SCHEDULE_KEYS}
        sched = {**self.schedule, **{k: v for k, v in params.items() if k in SCHEDULE_KEYS}}
        return own, sched

    def resolve_params(self, params: Mapping[str, Any], size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The function's defaults, the image-size defaults for ``size`` (H, W), then ``params``, key by key."""
        own, _ = self.split_params(params)
        resolved = dict(self.params)
        if self.scaled is not None and size is not None:
            resolved.update({k: v for k, v in self.scaled(*size).items() if k not in own})
        resolved.update(own)
        return resolved

    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def score(self, batch: ScoreBatch, params: Mapping[str, Any]) -> MetricResult:
        """Score one batch; ``params`` are the user's (resolved here for the batch's image size)."""
        size = tuple(batch.heatmaps.shape[-2:])
        p = self.resolve_params(params, size)  # type: ignore[arg-type]
        if self.scorer is not None:
            result = self.scorer(self, batch, p)
        else:
            result = _default_scorer(self, batch, p, params)
        result.params = {**p, **result.params, "heatmap_form": self.heatmap}
        return result


def _as_array(v: Any) -> np.ndarray:
    """A result as a numpy array: integer and boolean results keep their dtype (compact stats), others float."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.numpy() if not v.is_floating_point() else v.float().numpy()
    arr = np.asarray(v)
    return arr if arr.dtype.kind in "biu" else arr.astype(float)


def _default_scorer(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any],
                    user: Mapping[str, Any] | None = None) -> MetricResult:
    """Call ``spec.fn`` (or ``spec.stats`` for data-set-level metrics) as its ``inputs`` say."""
    fn = spec.stats if spec.level == "dataset" and spec.stats is not None else spec.fn
    inputs = set(spec.inputs)
    if "method" in inputs:
        p = {k: v for k, v in p.items() if k != "method_params"}
        out = fn(batch.model, batch.images, batch.targets, batch.method, method_params=batch.method_params, **p)
        return _wrap(spec, out)
    if inputs == {"heatmaps"}:
        return _wrap(spec, fn(heatmap_form(batch.heatmaps, spec.heatmap), **p))
    if "model" in inputs:
        out = fn(batch.model, batch.images, batch.targets, heatmap_form(batch.heatmaps, spec.heatmap), **p)
        return _wrap(spec, out)
    if inputs & {"masks", "boxes"}:
        gt = "masks" if "masks" in inputs else "boxes"
        heat = batch.scored_heatmaps(spec.heatmap)
        b = len(heat)
        values = np.full(b, np.nan)
        stats: list[Any] = [None] * b
        used: list[dict[str, Any]] = [p] * b
        for members in batch.shape_groups():
            h = torch.stack([heat[i] for i in members])
            truth = torch.stack([batch.masks[i] for i in members]) if gt == "masks" else [batch.boxes[i] for i in members]
            # image-size defaults at the resolution the ground truth is scored at
            pg = spec.resolve_params(user, tuple(h.shape[-2:])) if user is not None else p
            out = fn(h, truth, **{k: v for k, v in pg.items() if k not in SCHEDULE_KEYS})
            arr = out if isinstance(out, np.ndarray) else _as_array(out)
            for j, i in enumerate(members):
                used[i] = pg
                if spec.level == "dataset":
                    stats[i] = arr[j]
                else:
                    values[i] = arr[j]
        result = MetricResult({spec.name: values}, stats=np.stack(stats) if spec.level == "dataset" else None)
        result.params = used[0]
        if any(u != used[0] for u in used):
            result.extra["metric_params"] = [json.dumps(u, sort_keys=True, default=str) for u in used]
        return result
    raise InvalidInputError(f"metric {spec.name!r} declares inputs {spec.inputs}; it needs a scorer")


def _wrap(spec: MetricSpec, out: Any) -> MetricResult:
    if isinstance(out, MetricResult):
        return out
    if spec.level == "dataset":
        arr = out if isinstance(out, np.ndarray) else _as_array(out)
        return MetricResult({spec.name: np.full(arr.shape[0], np.nan)}, stats=arr)
    return MetricResult({spec.name: _as_array(out)})


METRICS: Registry[MetricSpec] = Registry("metric")
GroupScorer = Callable[[ScoreBatch, dict[str, dict[str, Any]]], dict[str, MetricResult]]
GROUPS: dict[str, GroupScorer] = {}


def register_metric(
    name: str, *, paper: str, higher_is_better: bool, inputs: str | Sequence[str], criterion: str = "faithfulness",
    value_range: tuple[float, float] = (0.0, 1.0), heatmap: str = "as_is", level: str = "image",
    outputs: Sequence[str] = (), columns: Sequence[str] = (), group: str | None = None, ranked: bool = True,
    scaled: Callable[[int, int], dict[str, Any]] | None = None, constraints: Mapping[str, Constraint] | None = None,
    schedule: Mapping[str, Any] | None = None, scorer: Scorer | None = None,
    stats: Callable[..., np.ndarray] | None = None,
    reduce: Callable[[Pooled, Mapping[str, Any]], float | dict[str, float]] | None = None, unit: str = "",
    verdict: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as metric ``name`` with the contract described in this module."""
    kinds = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    bad = [k for k in kinds if k not in METRIC_INPUTS]
    if bad or not kinds:
        raise ValueError(f"metric {name!r}: inputs must be kinds from {METRIC_INPUTS}, got {kinds}")
    if criterion not in CRITERIA:
        raise ValueError(f"metric {name!r}: criterion must be one of {CRITERIA}, got {criterion!r}")
    if heatmap not in HEATMAP_FORMS:
        raise ValueError(f"metric {name!r}: heatmap must be one of {HEATMAP_FORMS}, got {heatmap!r}")
    if level not in LEVELS:
        raise ValueError(f"metric {name!r}: level must be one of {LEVELS}, got {level!r}")
    if level == "dataset" and reduce is None:
        raise ValueError(f"metric {name!r}: a data-set-level metric needs a reduce function")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        sched = {"n_images": None, "methods": None, **(schedule or {})}
        METRICS.add(name, MetricSpec(
            name, fn, paper, higher_is_better, kinds, criterion, value_range, keyword_defaults(fn), summary, heatmap,
            level, tuple(outputs), tuple(columns), group, ranked, scaled, dict(constraints or {}), sched, scorer, stats,
            reduce or mean_reduce, unit, verdict))
        return fn

    return deco


def register_metric_group(name: str, scorer: GroupScorer) -> GroupScorer:
    """Register the shared scorer of metric group ``name``: ``scorer(batch, {metric: resolved params})
    -> {metric: MetricResult}`` for the requested members only."""
    if name in GROUPS:
        raise ValueError(f"metric group {name!r} is registered twice")
    GROUPS[name] = scorer
    return scorer


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    return METRICS.names()


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered as ``name`` (unknown names list the valid ones)."""
    return METRICS.get(name)


def output_spec(output: str) -> MetricSpec | None:
    """The spec of the metric that produces result rows named ``output`` (a metric's own name,
    or one of its further outputs, such as ``sanity_spearman_abs``), or None."""
    if output in METRICS:
        return METRICS.get(output)
    for spec in METRICS.entries.values():
        if output in spec.outputs:
            return spec
    return None
