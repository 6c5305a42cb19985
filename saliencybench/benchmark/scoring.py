"""``saliencybench score``: add rows for new metrics (or new metric parameters) to a finished run.

Score tasks read the run's stored heatmaps (:mod:`.store`) and call no method, except
metrics whose ``inputs`` include ``"method"`` (the sanity check, robustness metrics),
which call it again by definition. Scoring is resumable like a run: each score task
writes its own row file, and finished ones are skipped. What was scored, with which
parameters, is appended to ``config.json`` under ``"scored"``.

:func:`score_heatmaps` scores heatmaps made elsewhere (any tool; a ``.npz`` or safetensors file
of image ids and maps) on a data set and model, as a new run with an "imported" method.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NotApplicableError, SaliencyBenchError
from ..metrics.base import get_metric
from .config import RunConfig, merge_params
from .execute import TaskContext
from .executors import Executor, finish_executor
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
    if run.remote is not None:
        run.remote.check_instance(run.path)
    meta = json.loads(meta_file.read_text())
    same = [r for r in meta.get("scored", []) if {k: v for k, v in r.items() if k != "at"}
            == {k: v for k, v in record.items() if k != "at"}]
    if not same:  # a resumed `score` does not record itself twice
        meta.setdefault("scored", []).append(record)
        write_json_atomic(meta_file, meta)
        if run.remote is not None:
            run.remote.put(meta_file, "config.json")
    try:
        execute(units, ctx, run.path, executor, progress, stop_after, desc="score")
    finally:
        finish_executor(executor)
    return run


def read_heatmaps_file(path: str | Path) -> tuple[list[str], torch.Tensor]:
    """(image ids, heatmaps Tensor[N,H,W]) from a ``.npz`` (arrays ``image_ids`` and ``heatmaps``) or a
    ``.safetensors`` file (tensor ``heatmaps``, ids in the metadata key ``image_ids`` as a JSON list)."""
    p = Path(path)
    if not p.is_file():
        raise SaliencyBenchError(f"heatmaps file {str(p)!r} does not exist")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                missing = [k for k in ("image_ids", "heatmaps") if k not in f.files]
                if missing:
                    raise SaliencyBenchError(f"heatmaps file {str(p)!r} lacks the array(s) {missing}; it needs "
                                             "'image_ids' [N] and 'heatmaps' [N,H,W]")
                ids, maps = [str(i) for i in f["image_ids"].tolist()], torch.from_numpy(np.asarray(f["heatmaps"]))
        elif p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if "heatmaps" not in f.keys() or "image_ids" not in meta:
                    raise SaliencyBenchError(f"heatmaps file {str(p)!r} needs a tensor 'heatmaps' [N,H,W] and the "
                                             "metadata key 'image_ids' (a JSON list)")
                ids, maps = [str(i) for i in json.loads(meta["image_ids"])], f.get_tensor("heatmaps")
        else:
            raise SaliencyBenchError(f"heatmaps file {str(p)!r}: use .npz or .safetensors")
    except SaliencyBenchError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise SaliencyBenchError(f"cannot read heatmaps file {str(p)!r} ({type(e).__name__}: {e})") from None
    if maps.ndim != 3 or len(ids) != maps.shape[0]:
        raise SaliencyBenchError(f"heatmaps file {str(p)!r}: heatmaps must be [N,H,W] with one image id each, got "
                                 f"{tuple(maps.shape)} for {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise SaliencyBenchError(f"heatmaps file {str(p)!r} lists an image id more than once")
    bad = (~torch.isfinite(maps.float())).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise SaliencyBenchError(f"heatmaps file {str(p)!r} has NaN or infinite values for image ids "
                                 f"{[ids[i] for i in bad[:10]]}")
    return ids, maps.float()


def score_heatmaps(heatmaps: str | Path | tuple[list[str], torch.Tensor], *, dataset: str, model: str,
                   method_name: str, metrics: list[str] | None = None, methods: list[str] | None = None,
                   config: RunConfig | None = None, run_id: str | None = None, progress: bool = True) -> Run:
    """Score heatmaps computed with any tool on ``dataset`` for ``model``, as the method ``method_name``.

    ``heatmaps``: a file (:func:`read_heatmaps_file`) or ``(image_ids, Tensor[N,H,W])``; the maps must
    cover the run's images (matched by image id; maps of another size are resized bilinearly to the
    model's input, with a note). ``metrics``: default the config's metrics that need no method call
    (those with ``"method"`` in their inputs call the method again and cannot score imported maps).
    ``methods``: built-in methods computed in the same run for comparison.
    ``config``: the other settings (n_images, dataset_params, checkpoints, output, ...). Returns the run.
    """
    from ..methods.base import METHODS, MethodSpec
    from .runner import _new_run_dir, execute
    from .tasks import plan_units
    from .validate import validate

    ids, maps = heatmaps if isinstance(heatmaps, tuple) else read_heatmaps_file(heatmaps)
    if method_name in METHODS and METHODS.get(method_name).family != "imported":
        raise SaliencyBenchError(f"{method_name!r} is a registered method; name the imported heatmaps otherwise "
                                 "(--method-name)")
    if method_name not in METHODS:
        def imported(model: Any, images: Any, targets: Any) -> Any:
            raise NotApplicableError(f"{method_name!r} holds imported heatmaps; they are read from their file")

        METHODS.add(method_name, MethodSpec(method_name, imported, "heatmaps imported from a file", "imported",
                                            needs_grad=False, summary="imported heatmaps"))
    base = config or RunConfig()
    chosen = metrics or [m for m in base.metrics if "method" not in get_metric(m).inputs]
    calls = [m for m in chosen if "method" in get_metric(m).inputs or "pair" in get_metric(m).inputs]
    if calls:
        raise SaliencyBenchError(f"metric(s) {calls} call the method again (or need a second model); imported "
                                 "heatmaps can be scored with the others")
    cfg = validate(dataclasses.replace(base, models=[model], methods=[method_name, *(methods or [])], metrics=chosen,
                                       dataset=dataset, parts={}, inspect=[]))
    ctx = TaskContext(cfg, "")
    n = len(ctx.dataset)
    path = _new_run_dir(cfg, run_id)
    ctx.run_id, ctx.run_dir = path.name, path
    ctx.imported[method_name] = dict(zip(ids, maps))
    ctx.inner_progress = progress
    execute(plan_units(cfg, n), ctx, path, None, progress, None, desc="score")
    return Run(path, cfg)
