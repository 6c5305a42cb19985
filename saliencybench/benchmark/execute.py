"""Running tasks: the per-process context, explain and score tasks, and a unit of both.

:func:`run_unit` runs an explain task and its score tasks together: the heatmaps
stay in memory between them, are written to the run's heatmap store, and each
task's rows are written atomically to ``rows/<key>.parquet`` by whichever process
ran it, so every executor (in process, worker processes, Ray) behaves the same and
a killed worker loses only the task in flight. Which metrics a score task computes,
what they consume and how their results become rows come from the metric
registry: no metric or method is named here.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import NotApplicableError, SaliencyBenchError
from ..methods.base import collect_notes, explain, get_method
from ..metrics.base import GROUPS, MetricResult, ScoreBatch, get_metric
from .datasets import Sample
from .provenance import package_versions
from .store import HeatmapStore, quantise, write_atomic
from .context import Group, TaskContext, inner_bar
from .tasks import Task, Unit, task_params


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _base(task: Task, ctx: TaskContext, mparams: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": ctx.run_id, "dataset": ctx.config.dataset, "model": task.model, "method": task.method,
            "seed": ctx.config.seed, "versions": _json(package_versions()), "task": task.key,
            "method_params": _json(mparams), "device": str(ctx.device), "part": task.part}


def _sample_fields(ctx: TaskContext, model: str, s: Sample) -> dict[str, Any]:
    return {"image_id": s.image_id, "class": ctx.class_name(model, s.label), "label": int(s.label)}


def method_params(ctx: TaskContext, method: str, size: tuple[int, int]) -> dict[str, Any]:
    return get_method(method).resolve_params(ctx.config.method_params_for(method), size)


@dataclass
class Heat:
    """An explain task's heatmaps: dataset index -> Tensor[H,W] (quantised as stored) and image id;
    ``na``: the reason when the method does not apply to the model (then no maps)."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)
    na: str = ""


def run_explain(task: Task, ctx: TaskContext) -> tuple[list[dict[str, Any]], Heat]:
    """Rows of an explain task (predictions, skipped samples, notes, seconds) and its heatmaps."""
    groups, skipped = ctx.prepare(task.model, task.indices)
    bundle = ctx.model(task.model)
    size = ctx.input_size(task.model)
    rows: list[dict[str, Any]] = []
    base = _base(task, ctx, method_params(ctx, task.method, (size, size)))
    for s in skipped:
        rows.append({**base, "image_id": f"#{s['index']}", "class": "", "label": -1, "metric": "skipped_image",
                     "value": float("nan"), "metric_params": "{}", "note": s["error"]})
    heat = Heat()
    spec = get_method(task.method)
    applicable = spec.check(bundle.model)
    reason = "" if applicable.applicable else f"not applicable: {applicable.reason}"
    check = bundle.info.get("verification")
    if isinstance(check, dict) and not check.get("valid", True):
        reason = "; ".join(r for r in (f"model not valid for {check.get('dataset')}: {check.get('reason')}", reason)
                           if r)
    for g in groups:
        mp = method_params(ctx, task.method, tuple(g.x.shape[-2:]))
        logits = ctx.logits(task.model, g)
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        t0 = time.perf_counter()
        note = reason
        if task.method in ctx.imported:
            maps, note = imported_maps(ctx.imported[task.method], g, task.method)
            maps = quantise(maps, ctx.config.heatmap_dtype)
            heat.maps.update(zip(g.indices, maps))
            heat.ids.update((i, s.image_id) for i, s in zip(g.indices, g.samples))
        elif not heat.na:
            try:
                with warnings.catch_warnings(), collect_notes() as notes, inner_bar(ctx, task.label()):
                    warnings.simplefilter("ignore")
                    maps = explain(bundle.model, g.x, g.labels, task.method, shared=ctx.shared_passes(task.model, g),
                                   **mp)
                note = "; ".join(n for n in (reason, *notes) if n)
                maps = quantise(maps.cpu(), ctx.config.heatmap_dtype)
                heat.maps.update(zip(g.indices, maps))
                heat.ids.update((i, s.image_id) for i, s in zip(g.indices, g.samples))
            except NotApplicableError as e:
                heat = Heat(na=f"n/a: {e}")
        note = heat.na or note
        seconds = time.perf_counter() - t0
        for j, s in enumerate(g.samples):
            pred = int(top5[j, 0])
            rows.append({**base, "method_params": _json(mp), **_sample_fields(ctx, task.model, s),
                         "metric": "top1_correct", "value": float(pred == s.label), "metric_params": "{}",
                         "note": note, "top5_correct": bool((top5[j] == s.label).any()), "predicted": pred,
                         "predicted_class": ctx.class_name(task.model, pred), "seconds": seconds / len(g.samples)})
    return rows, heat


def imported_maps(maps: dict[str, torch.Tensor], g: Group, method: str) -> tuple[torch.Tensor, str]:
    """The imported heatmaps of a group's samples (Tensor[b,H,W] at the input size) and the row note."""
    missing = [s.image_id for s in g.samples if s.image_id not in maps]
    if missing:
        raise SaliencyBenchError(f"the heatmaps file for {method!r} has no maps for image ids {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}; it must hold every image scored")
    size = tuple(g.x.shape[-2:])
    out, resized = [], set()
    for s in g.samples:
        m = maps[s.image_id].float()
        if tuple(m.shape) != size:
            resized.add(tuple(m.shape))
            m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        out.append(m)
    note = f"imported heatmaps ({method})" + (f"; resized bilinearly from {sorted(resized)} to {size}" if resized
                                              else "")
    return torch.stack(out), note


def _result_rows(result: MetricResult, spec_name: str, g: Group, base: dict[str, Any], params: dict[str, Any],
                 note: str, seconds: float, fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    common = {**base, "metric_params": _json(params), "note": note, "seconds": seconds / max(1, len(g.samples))}
    stats = result.stats
    for name, values in result.values.items():
        vals = np.asarray(values.detach().cpu().float() if isinstance(values, torch.Tensor) else values, dtype=float)
        for j in range(len(g.samples)):
            row = {**common, **fields[j], "metric": name, "value": float(vals[j])}
            if name == spec_name:
                row.update({k: v[j] for k, v in result.extra.items()})
                if stats is not None:
                    row.update(_stats_fields(stats[j]))
            rows.append(row)
    for r in result.rows:
        j = int(r["index"])
        rows.append({**common, **fields[j], **{k: v for k, v in r.items() if k != "index"}})
    return rows


def _stats_fields(s: np.ndarray) -> dict[str, Any]:
    s = np.ascontiguousarray(s)
    return {"stats": s.tobytes(), "stats_shape": list(s.shape), "stats_dtype": str(s.dtype)}


def decode_stats(row: pd.Series) -> np.ndarray:
    """The per-image statistics array of a data-set-level metric's row."""
    return np.frombuffer(row["stats"], dtype=row["stats_dtype"]).reshape(row["stats_shape"])


def _score_group(task: Task, ctx: TaskContext, g: Group, heat: Heat,
                 params: dict[str, dict[str, Any]]) -> dict[str, MetricResult]:
    """The result of each metric of the task on one group (group metrics through their shared scorer)."""
    batch = _batch(task.model, task, ctx, g, heat)
    if task.kind == "pair":
        batch.contrast = _partner_batch(task, ctx, g)
    specs = {m: get_metric(m) for m in task.metrics}
    group = specs[task.metrics[0]].group
    with warnings.catch_warnings(), inner_bar(ctx, task.label()):
        warnings.simplefilter("ignore")
        if group is not None and group in GROUPS:
            resolved = {m: specs[m].resolve_params(params[m], tuple(g.x.shape[-2:])) for m in task.metrics}
            out = GROUPS[group](batch, resolved)
            for m, r in out.items():
                r.params = {**resolved[m], **r.params, "heatmap_form": specs[m].heatmap}
            return {m: out[m] for m in task.metrics}
        return {m: specs[m].score(batch, params[m]) for m in task.metrics}


def _batch(model: str, task: Task, ctx: TaskContext, g: Group, heat: Heat) -> ScoreBatch:
    bundle = ctx.model(model)
    size = tuple(g.x.shape[-2:])
    return ScoreBatch(bundle.model, g.x, g.labels, torch.stack([heat.maps[i] for i in g.indices]).to(ctx.device),
                      [s.mask for s in g.samples], [s.boxes for s in g.samples], g.labels, ctx.logits(model, g),
                      task.method, method_params(ctx, task.method, size), ctx.config.seed,
                      len(ctx.dataset_for(model).classes))


def _partner_batch(task: Task, ctx: TaskContext, g: Group) -> ScoreBatch:
    """The pair's second model's batch of the same images (its own targets and maps, from the store)."""
    partner = task.partner
    explain = Task("explain", partner, task.method, task.explain_indices, part=task.part)
    heat = stored_heat(explain, ctx)
    if heat is None:
        raise SaliencyBenchError(f"no stored heatmaps of {partner} {task.method} for the pair task; pair metrics need "
                                 "store_heatmaps: true and the partner's explain tasks finished")
    groups, _ = ctx.prepare(partner, tuple(g.indices))
    if len(groups) != 1 or groups[0].indices != g.indices:
        raise SaliencyBenchError(f"{partner} does not see the same images as {task.model}: a pair needs both models "
                                 "on the same data set and input size")
    if heat.na:
        raise NotApplicableError(f"{task.method} does not apply to {partner}: {heat.na}")
    return _batch(partner, task, ctx, groups[0], heat)


def _group_rows(task: Task, ctx: TaskContext, g: Group, heat: Heat, params: dict[str, dict[str, Any]],
                base: dict[str, Any]) -> list[dict[str, Any]]:
    fields = [_sample_fields(ctx, task.model, s) for s in g.samples]
    if heat.na:
        return [{**base, **f, "metric": m, "value": float("nan"), "metric_params": _json(params[m]),
                 "metric_config": _json(params[m]), "note": heat.na} for m in task.metrics for f in fields]
    t0 = time.perf_counter()
    results = _score_group(task, ctx, g, heat, params)
    seconds = (time.perf_counter() - t0) / len(task.metrics)
    rows = []
    for m, res in results.items():
        new = _result_rows(res, m, g, base, res.params, "", seconds, fields)
        for r in new:
            r["metric_config"] = _json(params[m])
        rows += new
    return rows


def run_score(task: Task, ctx: TaskContext, heat: Heat) -> list[dict[str, Any]]:
    """Rows of a score task from the heatmaps of its explain task (NaN rows with the reason where the
    method does not apply). A metric that refuses some samples (e.g. an empty mask) is rerun per sample,
    and only the refused samples get NaN rows naming the problem: one sample never aborts a run."""
    groups, _ = ctx.prepare(task.model, task.indices)
    params = task_params(task)
    rows: list[dict[str, Any]] = []
    for g in groups:
        base = _base(task, ctx, method_params(ctx, task.method, tuple(g.x.shape[-2:])))
        if task.kind == "pair":
            base["partner"] = task.partner
        try:
            rows += _group_rows(task, ctx, g, heat, params, base)
        except NotApplicableError as e:
            rows += [{**base, **_sample_fields(ctx, task.model, s), "metric": m, "value": float("nan"),
                      "metric_params": _json(params[m]), "metric_config": _json(params[m]), "note": f"n/a: {e}"}
                     for m in task.metrics for s in g.samples]
        except SaliencyBenchError:
            for j, i in enumerate(g.indices):
                one = Group([i], g.x[j : j + 1], g.labels[j : j + 1], [g.samples[j]])
                try:
                    rows += _group_rows(task, ctx, one, heat, params, base)
                except SaliencyBenchError as e:
                    rows += [{**base, **_sample_fields(ctx, task.model, g.samples[j]), "metric": m,
                              "value": float("nan"), "metric_params": _json(params[m]),
                              "metric_config": _json(params[m]), "note": f"skipped: {e}"}
                             for m in task.metrics]
    return rows


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.BytesIO()
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame({"metric": pd.Series([], dtype=str)})
    frame.to_parquet(buf, index=False)
    write_atomic(path, buf.getvalue())


@dataclass
class TaskDone:
    """What a finished task reports back to the driver (rows and heatmaps are already on disk)."""

    key: str
    label: str
    rows: int
    seconds: float


def stored_heat(task: Task, ctx: TaskContext) -> Heat | None:
    """The explain task's heatmaps read from the store (downloaded first from a run URL's shared copy
    when this machine lacks them), or None if they are not stored."""
    store = HeatmapStore(ctx.run_dir)
    if not (store.has(task.key) or (ctx.remote is not None and ctx.remote.fetch_heatmap(store, task.key))):
        return None
    ids, maps, meta = store.read(task.key)
    if meta.get("not_applicable"):
        return Heat(na=meta["not_applicable"])
    index = json.loads(meta["indices"])
    return Heat(dict(zip(index, maps)), dict(zip(index, ids)))


def write_heat(task: Task, ctx: TaskContext, heat: Heat) -> None:
    """Store an explain task's heatmaps (or its n/a reason) in the run's heatmap store."""
    order = sorted(heat.maps)
    size = ctx.input_size(task.model)
    meta = {"model": task.model, "method": task.method, "indices": order,
            "method_params": method_params(ctx, task.method, (size, size))}
    if heat.na:
        meta["not_applicable"] = heat.na
    path = HeatmapStore(ctx.run_dir).write(task.key, [heat.ids[i] for i in order], [heat.maps[i] for i in order],
                                           ctx.config.heatmap_dtype, meta)
    _share(ctx, path)


def _share(ctx: TaskContext, path: Path) -> None:
    """Upload a file of the run directory to the run URL's shared copy (when the run has one)."""
    if ctx.remote is not None:
        assert ctx.run_dir is not None
        ctx.remote.put(path, path.relative_to(ctx.run_dir).as_posix())


def run_unit(unit: Unit, ctx: TaskContext, done: set[str]) -> list[TaskDone]:
    """Run the tasks of ``unit`` not in ``done``; write their rows (and heatmaps) under ``ctx.run_dir``.
    An explain task already done is not rerun when its heatmaps are in the store."""
    assert ctx.run_dir is not None
    ctx = ctx.for_part(unit.explain.part)
    rows_dir = ctx.run_dir / "rows"
    todo_scores = [t for t in unit.scores if t.key not in done]
    if unit.explain.key in done and not todo_scores:
        return []
    reports = []
    heat = stored_heat(unit.explain, ctx) if unit.explain.key in done else None
    if heat is None and not ctx.explain_allowed:
        raise SaliencyBenchError(
            f"no stored heatmaps for {unit.explain.label()} (task {unit.explain.key}): the run was made with "
            "store_heatmaps: false or its heatmaps/ folder was removed; resume the run to recompute them")
    if heat is None:
        t0 = time.perf_counter()
        rows, heat = run_explain(unit.explain, ctx)
        if ctx.config.store_heatmaps:
            write_heat(unit.explain, ctx, heat)
        if unit.explain.key not in done:
            _write_rows(rows, rows_dir / f"{unit.explain.key}.parquet")
            _share(ctx, rows_dir / f"{unit.explain.key}.parquet")
            reports.append(TaskDone(unit.explain.key, unit.explain.label(), len(rows), time.perf_counter() - t0))
    for t in todo_scores:
        t0 = time.perf_counter()
        rows = run_score(t, ctx, heat)
        _write_rows(rows, rows_dir / f"{t.key}.parquet")
        _share(ctx, rows_dir / f"{t.key}.parquet")
        reports.append(TaskDone(t.key, t.label(), len(rows), time.perf_counter() - t0))
    return reports
