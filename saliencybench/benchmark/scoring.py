"""``saliencybench score``: add rows for new metrics (or new metric parameters) to a finished run.

Score tasks read the run's stored heatmaps (:mod:`.store`) and call no method, except
metrics whose ``inputs`` include ``"method"`` (the sanity check, robustness metrics),
which call it again by definition. Scoring is resumable like a run: each score task
writes its own row file, and finished ones are skipped. What was scored, with which
parameters, is appended to ``config.json`` under ``"scored"``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ..errors import SaliencyBenchError
from ..metrics.base import get_metric
from .config import merge_params
from .execute import TaskContext
from .executors import Executor
from .plugins import load_plugins
from .runner import Run, execute, write_json_atomic
from .tasks import Task, Unit, score_tasks, shards


def score_run(run: Run, metrics: list[str], *, methods: list[str] | None = None, models: list[str] | None = None,
              metric_params: dict[str, dict[str, Any]] | None = None, executor: Executor | None = None,
              progress: bool = True, stop_after: int | None = None) -> Run:
    """Score ``metrics`` on the stored heatmaps of ``run`` (optionally only ``methods`` / ``models``)."""
    cfg = run.config
    load_plugins(cfg.plugins)
    if not metrics:
        raise SaliencyBenchError("name at least one metric to score (--metrics A,B)")
    for m in metrics:
        get_metric(m)
    params = merge_params({m: cfg.metric_params.get(m, {}) for m in metrics}, metric_params or {})
    for m, p in params.items():
        get_metric(m).check_params({k: v for k, v in p.items() if v is not None})
    for name, chosen, valid in (("method", methods, cfg.methods), ("model", models, cfg.models)):
        bad = sorted(set(chosen or []) - set(valid))
        if bad:
            raise SaliencyBenchError(f"{name}(s) {bad} are not in run {run.run_id} (it has {valid})")
    ctx = TaskContext(cfg, run.run_id, run.path, explain_allowed=False)
    units = []
    for model in models or cfg.models:
        for shard in shards(cfg, len(ctx.dataset)):
            for method in methods or cfg.methods:
                tasks = score_tasks(cfg, model, method, shard, metrics, params)
                if tasks:
                    units.append(Unit(Task("explain", model, method, shard), tasks))
    record = {"metrics": metrics, "metric_params": params, "methods": methods, "models": models,
              "at": dt.datetime.now().isoformat(timespec="seconds")}
    meta_file = run.path / "config.json"
    meta = json.loads(meta_file.read_text())
    same = [r for r in meta.get("scored", []) if {k: v for k, v in r.items() if k != "at"}
            == {k: v for k, v in record.items() if k != "at"}]
    if not same:  # a resumed `score` does not record itself twice
        meta.setdefault("scored", []).append(record)
        write_json_atomic(meta_file, meta)
    execute(units, ctx, run.path, executor, progress, stop_after, desc="score")
    return run
