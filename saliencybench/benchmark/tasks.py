"""The two kinds of task of a run, and the plan that lists them.

- An *explain* task (model, method, shard of data-set indices) computes the
  method's heatmaps on the shard, writes them to the run's heatmap store
  (:mod:`.store`) and writes its rows (the model's predictions, skipped samples,
  the method's notes and wall time).
- A *score* task (model, method, metric or metric group, shard) scores the
  shard's heatmaps with one metric, or with the metrics of one group that share
  work (deletion and insertion), and writes their rows. It runs after its
  explain task, reading the heatmaps from memory (same process) or the store.
- A *pair* task scores the ``"pair"`` metrics (model contrast) of a (model A, model B)
  pair of the config's ``pairs`` on a shard; it reads both explain tasks' heatmaps from
  the store, so pair tasks run in a second phase, after every explain task.

Each task belongs to a *part* of the run (``""``: the main block; see
``RunConfig.parts``), which gives it its data set, models and metrics.

Tasks are pure values; their keys name their row files (``rows/<key>.parquet``)
and heatmap files, so a resumed run skips finished tasks of both kinds. Every
metric and method comes from the registries: this module names none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..metrics.base import get_metric
from .config import RunConfig


@dataclass(frozen=True)
class Task:
    """One unit of work. ``metrics``: for score tasks, the metrics scored together;
    ``params``: their parameters as configured (JSON), so new parameters make new tasks."""

    kind: str
    model: str
    method: str
    indices: tuple[int, ...]
    metrics: tuple[str, ...] = ()
    params: str = ""
    part: str = ""

    @property
    def key(self) -> str:
        blob = f"{self.kind}|{self.model}|{self.method}|{','.join(map(str, self.indices))}"
        if self.kind in ("score", "pair"):
            blob += f"|{','.join(self.metrics)}|{self.params}"
        if self.part:
            blob += f"|part={self.part}"
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def explain(self) -> Task:
        """The explain task whose heatmaps this task scores (itself for an explain task)."""
        if self.kind == "explain":
            return self
        return Task("explain", self.model, self.method, self.explain_indices, part=self.part)

    @property
    def partner(self) -> str:
        """The pair's second model (pair tasks)."""
        return json.loads(self.params).get("_partner", "")

    @property
    def explain_indices(self) -> tuple[int, ...]:
        return self.indices if self.kind == "explain" else tuple(json.loads(self.params).get("_shard", self.indices))

    def label(self) -> str:
        model = f"{self.model}+{self.partner}" if self.kind == "pair" else self.model
        return (f"[{self.part}] " if self.part else "") + f"{model} {self.method}" + \
            (f" {'+'.join(self.metrics)}" if self.metrics else "")


@dataclass
class Unit:
    """An explain task and the score tasks that read its heatmaps: run together in one process."""

    explain: Task
    scores: list[Task] = field(default_factory=list)

    def tasks(self) -> list[Task]:
        return [self.explain, *self.scores]


def metric_groups(metrics: list[str]) -> list[tuple[str, ...]]:
    """The configured metrics in score-task groups: metrics of one registered group together, in order."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        spec = get_metric(m)
        groups.setdefault(spec.group or f"@{m}", []).append(m)
    return [tuple(v) for v in groups.values()]


def shards(config: RunConfig, n_samples: int) -> list[tuple[int, ...]]:
    """Data-set index shards of ``batch_size`` samples over the first ``n_samples`` (capped by ``n_images``)."""
    n = min(n_samples, config.n_images) if config.dataset != "synthetic" else n_samples
    return [tuple(range(i, min(i + config.batch_size, n))) for i in range(0, n, config.batch_size)]


def pair_metric(name: str) -> bool:
    return "pair" in get_metric(name).inputs


def score_tasks(config: RunConfig, model: str, method: str, shard: tuple[int, ...],
                metrics: list[str] | None = None, extra_params: dict[str, dict[str, Any]] | None = None,
                part: str = "", partner: str = "") -> list[Task]:
    """Score tasks of one explain task's shard, honouring each metric's ``methods`` and ``n_images`` options;
    with ``partner``, the pair tasks of the ``"pair"`` metrics for (``model``, ``partner``)."""
    out = []
    chosen = [m for m in (metrics if metrics is not None else config.metrics) if pair_metric(m) == bool(partner)]
    for group in metric_groups(chosen):
        members = []
        for m in group:
            params = {**config.metric_params.get(m, {}), **(extra_params or {}).get(m, {})}
            _, sched = get_metric(m).split_params(params)
            if sched.get("methods") is not None and method not in sched["methods"]:
                continue
            limit = sched.get("n_images")
            sub = tuple(i for i in shard if limit is None or i < limit)
            if not sub:
                continue
            members.append((m, params, sub))
        if not members:
            continue
        # the members of a group share a shard: the largest one any of them asks for
        sub = max((s for _, _, s in members), key=len)
        params: dict[str, Any] = {m: p for m, p, _ in members}
        if sub != shard:
            params["_shard"] = list(shard)
        if partner:
            params["_partner"] = partner
        blob = json.dumps(params, sort_keys=True, default=str)
        out.append(Task("pair" if partner else "score", model, method, sub, tuple(m for m, _, _ in members), blob,
                        part))
    return out


def plan_units(config: RunConfig, n_samples: int, part: str = "") -> list[Unit]:
    """The units of one part of a run in a fixed order: model, shard, method (methods on one shard share
    passes); its pair tasks come last (``pair_units``)."""
    return [Unit(Task("explain", model, method, shard, part=part),
                 score_tasks(config, model, method, shard, part=part))
            for model in config.models for shard in shards(config, n_samples) for method in config.methods]


def pair_units(config: RunConfig, n_samples: int, part: str = "") -> list[Unit]:
    """Units of the pair tasks of one part: for each (A, B) of ``config.pairs``, shard and method, the
    ``"pair"`` metrics on A's explain task (B's heatmaps of the same shard are read from the store)."""
    out = []
    for a, b in config.pairs:
        for shard in shards(config, n_samples):
            for method in config.methods:
                tasks = score_tasks(config, a, method, shard, part=part, partner=b)
                if tasks:
                    out.append(Unit(Task("explain", a, method, shard, part=part), tasks))
    return out


def iter_tasks(units: list[Unit]) -> Iterator[Task]:
    for u in units:
        yield from u.tasks()


def task_params(task: Task) -> dict[str, dict[str, Any]]:
    """The configured parameters of a score task's metrics (name -> params)."""
    return {k: v for k, v in json.loads(task.params or "{}").items() if not k.startswith("_")}
