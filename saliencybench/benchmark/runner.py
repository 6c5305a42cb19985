"""The runner: pure tasks, an executor, and results streamed to Parquet.

The unit of work is a :class:`Task` (model, method, data-set shard): it goes in,
result rows come out, and nothing else is shared, so a distributed executor can
run the same tasks in other processes (each worker builds its own models and
data sets from the config through :class:`TaskContext`). Each finished task is
written atomically as one Parquet file under ``<run>/rows/``; ``resume`` skips
the tasks whose file exists, so a run killed at any moment loses at most the
task in flight and computes nothing twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InvalidInputError, NotApplicableError, SaliencyBenchError
from ..methods.base import collect_notes, explain, get_method, upsample
from ..methods.shared import SharedPasses, pass_requests
from ..metrics.base import get_metric
from ..metrics.localisation import box_iou
from ..metrics.perturbation_curves import deletion_insertion
from ..metrics.pointing import energy_pointing_game, pointing_game
from ..metrics.sanity import sanity_randomization
from ..modelutil import target_score
from .config import RunConfig, config_from_dict
from .datasets import GroundTruthDataset, Sample, UnreadableImageError, get_dataset
from .models import ModelBundle, load_model
from .preprocess import preprocess


GALLERY_IMAGES = 4


def package_versions() -> dict[str, str]:
    """Versions of the packages that produce a result row."""
    out = {"python": platform.python_version()}
    for pkg in ("saliencybench", "torch", "timm", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


@dataclass(frozen=True)
class Task:
    """One unit of work: a method on a model over a shard of data-set indices.

    ``kind`` is ``"explain"`` (heatmaps and the per-image metrics) or
    ``"sanity"`` (the model-randomisation check on the shard).
    """

    kind: str
    model: str
    method: str
    indices: tuple[int, ...]

    @property
    def key(self) -> str:
        blob = f"{self.kind}|{self.model}|{self.method}|{','.join(map(str, self.indices))}"
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class TaskContext:
    """Builds (once per process) what tasks need from the config: models and data set."""

    config: RunConfig
    run_id: str
    _models: dict[str, ModelBundle] = field(default_factory=dict)
    _dataset: GroundTruthDataset | None = None
    _shared: tuple[Any, SharedPasses] | None = None

    def model(self, name: str) -> ModelBundle:
        if name not in self._models:
            self._models[name] = load_model(name, checkpoint=self.config.checkpoints.get(name))
        return self._models[name]

    @property
    def dataset(self) -> GroundTruthDataset:
        if self._dataset is None:
            params = dict(self.config.dataset_params)
            if self.config.dataset == "synthetic":
                params.setdefault("n_images", self.config.n_images)
                params.setdefault("seed", self.config.seed)
            self._dataset = get_dataset(self.config.dataset, **params)
        return self._dataset

    def shared_passes(self, model: str, indices: tuple[int, ...], images: torch.Tensor,
                      targets: torch.Tensor) -> SharedPasses:
        """The forward/backward passes the run's methods share on these images (kept for one batch)."""
        key = (model, indices)
        if self._shared is None or self._shared[0] != key:
            methods = {m: self.config.method_params.get(m, {}) for m in self.config.methods}
            self._shared = (key, SharedPasses(self.model(model).model, images, targets, pass_requests(methods)))
        return self._shared[1]


def plan_tasks(config: RunConfig, n_samples: int) -> list[Task]:
    """All tasks of a run, in a fixed order: model, shard, method (methods on one shard share passes)."""
    n = min(n_samples, config.n_images) if config.dataset != "synthetic" else n_samples
    shards = [tuple(range(i, min(i + config.batch_size, n))) for i in range(0, n, config.batch_size)]
    tasks = [Task("explain", m, meth, sh) for m in config.models for sh in shards for meth in config.methods]
    if "sanity_randomization" in config.metrics:
        sanity = tuple(range(min(config.sanity_images, n)))
        tasks += [Task("sanity", m, meth, sanity) for m in config.models for meth in config.sanity_methods]
    return tasks


def _load_batch(ds: GroundTruthDataset, indices: Iterable[int], size: int, mode: str = "squash",
                crop_pct: float = 0.875) -> tuple[list[tuple[int, torch.Tensor, Sample]], list[dict[str, Any]]]:
    """(index, model input, scored sample) preprocessed with ``mode``; unreadable or unusable samples recorded."""
    prepared, skipped = [], []
    for i in indices:
        try:
            prepared.append((i, *preprocess(ds[i], size, mode, crop_pct)))
        except (UnreadableImageError, InvalidInputError) as e:
            skipped.append({"index": i, "error": str(e)})
    return prepared, skipped


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def run_task(task: Task, ctx: TaskContext) -> pd.DataFrame:
    """Execute one task and return its result rows (long format)."""
    cfg = ctx.config
    bundle = ctx.model(task.model)
    size = cfg.image_size or bundle.input_size
    crop_pct = float(getattr(bundle.model, "pretrained_cfg", {}).get("crop_pct") or 0.875)
    prepared, skipped = _load_batch(ctx.dataset, task.indices, size, cfg.preprocess, crop_pct)
    base = {"run_id": ctx.run_id, "dataset": cfg.dataset, "model": task.model, "method": task.method,
            "seed": cfg.seed, "versions": _json(package_versions())}
    mparams = get_method(task.method).resolve_params(cfg.method_params.get(task.method, {}))
    rows: list[dict[str, Any]] = [
        {**base, "image_id": f"#{s['index']}", "class": "", "metric": "skipped_image", "value": float("nan"),
         "method_params": _json(mparams), "metric_params": "{}", "note": s["error"]} for s in skipped
    ]
    if not prepared:
        return pd.DataFrame(rows)
    if task.kind == "sanity":  # on inputs of one size (squashed when the protocol keeps aspect ratios)
        samples = [s for _, _, s in prepared]
        x = bundle.normalise(torch.stack([upsample(img, (size, size)) for _, img, _ in prepared]))
        t = torch.tensor([s.label for s in samples])
        ids, classes = [s.image_id for s in samples], [_class_name(bundle, s.label) for s in samples]
        df = sanity_randomization(bundle.model, x, t, task.method, per_image=True, seed=cfg.seed, method_params=mparams)
        for _, r in df.iterrows():
            for sim in ("spearman_abs", "spearman", "ssim"):
                rows.append({**base, "image_id": ids[int(r.image)], "class": classes[int(r.image)],
                             "metric": f"sanity_{sim}", "value": float(r[sim]), "method_params": _json(mparams),
                             "metric_params": _json({"order": "cascading", "stage": int(r.stage)}),
                             "note": "", "stage": int(r.stage), "layer": r.layer})
        return pd.DataFrame(rows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos, (_, img, _) in enumerate(prepared):
        groups.setdefault(tuple(img.shape), []).append(pos)
    for members in groups.values():
        rows += _explain_rows(task, ctx, bundle, [prepared[i] for i in members], base, mparams, size)
    return pd.DataFrame(rows)


def _class_name(bundle: ModelBundle, label: int) -> str:
    return bundle.classes[label] if label < len(bundle.classes) else str(label)


def _explain_rows(task: Task, ctx: TaskContext, bundle: ModelBundle,
                  prepared: list[tuple[int, torch.Tensor, Sample]], base: dict[str, Any], mparams: dict[str, Any],
                  gallery_size: int) -> list[dict[str, Any]]:
    """Rows of one explain task on (index, input, scored sample) triples whose inputs share one shape."""
    cfg = ctx.config
    rows: list[dict[str, Any]] = []
    indices = tuple(i for i, _, _ in prepared)
    samples = [s for _, _, s in prepared]
    x = bundle.normalise(torch.stack([img for _, img, _ in prepared]))
    t = torch.tensor([s.label for s in samples])
    ids, classes = [s.image_id for s in samples], [_class_name(bundle, s.label) for s in samples]

    def emit(metric: str, values: Iterable[float], params: dict[str, Any], note: str = "", **extra: Any) -> None:
        for i, v in enumerate(values):
            rows.append({**base, "image_id": ids[i], "class": classes[i], "metric": metric, "value": float(v),
                         "method_params": _json(mparams), "metric_params": _json(params), "note": note,
                         **{k: (val[i] if isinstance(val, list) else val) for k, val in extra.items()}})

    with torch.inference_mode():
        logits = bundle.model.eval()(x)
    top5 = logits.topk(min(5, logits.shape[1]), 1).indices
    top1_ok = (top5[:, 0] == t).tolist()
    top5_ok = (top5 == t[:, None]).any(1).tolist()
    emit("top1_correct", [float(v) for v in top1_ok], {})
    spec = get_method(task.method)
    applicable = spec.check(bundle.model)
    note = "" if applicable.applicable else f"not applicable: {applicable.reason}"
    try:
        with warnings.catch_warnings(), collect_notes() as method_notes:
            warnings.simplefilter("ignore")
            heat = explain(bundle.model, x, t, task.method, shared=ctx.shared_passes(task.model, indices, x, t),
                           **mparams)
        note = "; ".join(n for n in (note, *method_notes) if n)
    except NotApplicableError as e:
        for metric in cfg.metrics:
            if metric != "sanity_randomization":
                emit(metric, [float("nan")] * len(samples), {}, note=f"n/a: {e}")
        return rows
    metrics = [m for m in cfg.metrics if m != "sanity_randomization"]
    for i in [i for i, idx in enumerate(indices) if idx < GALLERY_IMAGES]:
        g = upsample(heat[i][None], (gallery_size, gallery_size))[0]
        rows.append({**base, "image_id": ids[i], "class": classes[i], "metric": "heatmap", "value": float("nan"),
                     "method_params": _json(mparams), "metric_params": "{}", "note": note,
                     "heatmap": g.numpy().astype("float16").tobytes(), "heatmap_shape": list(g.shape)})
    if {"deletion", "insertion"} & set(metrics):
        dp, ip = cfg.metric_params.get("deletion", {}), cfg.metric_params.get("insertion", {})
        res = deletion_insertion(
            bundle.model, x, t, heat, n_steps=dp.get("n_steps"), step=dp.get("step"), seed=cfg.seed,
            deletion_substrate=dp.get("substrate", "zeros"), insertion_substrate=ip.get("substrate", "blur"),
            score=dp.get("score", "probability"), clean_scores=target_score(logits, t, dp.get("score", "probability")),
        )
        for m in ("deletion", "insertion"):
            if m in metrics:
                auc, curves, _ = res[m]
                emit(m, auc.tolist(), {**get_metric(m).params, **cfg.metric_params.get(m, {}),
                                        "return_curves": None}, note,
                     curve=[json.dumps([round(float(c), 6) for c in row]) for row in curves])
    # localisation metrics at the scored samples' resolution (the original one for shorter_side)
    scored = [upsample(heat[i][None], tuple(s.mask.shape))[0] for i, s in enumerate(samples)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "pointing_game" in metrics:
            p = {**get_metric("pointing_game").params, **cfg.metric_params.get("pointing_game", {})}
            emit("pointing_game", [float(pointing_game(h[None], s.mask[None], **p)[0])
                                   for h, s in zip(scored, samples)], p, note)
        if "energy_pointing_game" in metrics:
            emit("energy_pointing_game", [float(energy_pointing_game(h[None], s.mask[None])[0])
                                          for h, s in zip(scored, samples)], {}, note)
        if "box_iou" in metrics:
            p = {"threshold": 0.15, **cfg.metric_params.get("box_iou", {})}
            found = [box_iou(h[None], [s.boxes], return_boxes=True, **p) for h, s in zip(scored, samples)]
            emit("box_iou", [float(f[0][0]) for f in found], p, note, no_box=[bool(f[2][0]) for f in found],
                 top1_correct=[bool(v) for v in top1_ok], top5_correct=[bool(v) for v in top5_ok])
    return rows


class InProcessExecutor:
    """Runs tasks one after another in this process (the default executor)."""

    def map(self, tasks: list[Task], ctx: TaskContext) -> Iterator[tuple[Task, pd.DataFrame]]:
        for task in tasks:
            yield task, run_task(task, ctx)


_WORKER: TaskContext | None = None


def _start_worker(config: dict[str, Any], run_id: str, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = TaskContext(config_from_dict(config), run_id)


def _run_in_worker(task: Task) -> tuple[Task, pd.DataFrame]:
    assert _WORKER is not None, "worker not started"
    return task, run_task(task, _WORKER)


class ProcessExecutor:
    """Runs tasks in ``workers`` spawned processes, each with ``threads`` torch threads.

    Only the config and the tasks cross the process boundary: each worker builds
    its own models and data set from the config (a cluster executor would do the
    same on other machines). Rows come back as tasks finish, in any order, and
    the parent writes them, so resume works as with the in-process executor.
    Shared forward/backward passes are kept per process, so they are reused when
    consecutive tasks of one batch reach the same worker. Default models are trained (or loaded) in the parent first, so workers only
    read the cache.
    """

    def __init__(self, workers: int = 2, threads: int = 1) -> None:
        if workers < 1 or threads < 1:
            raise SaliencyBenchError(f"workers and threads must be >= 1, got {workers} and {threads}")
        self.workers, self.threads = workers, threads

    def map(self, tasks: list[Task], ctx: TaskContext) -> Iterator[tuple[Task, pd.DataFrame]]:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        for name in {t.model for t in tasks}:
            ctx.model(name)
        pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                   initargs=(ctx.config.to_dict(), ctx.run_id, self.threads))
        try:
            for future in as_completed([pool.submit(_run_in_worker, t) for t in tasks]):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Run:
    """A run directory: its config, streamed results, leaderboard and report."""

    path: Path
    config: RunConfig

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def results(self) -> pd.DataFrame:
        """All result rows written so far (long format)."""
        files = sorted((self.path / "rows").glob("*.parquet"))
        if not files:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def leaderboard(self) -> pd.DataFrame:
        from .leaderboard import leaderboard

        return leaderboard(self.results)


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def open_run(path: str | Path) -> Run:
    """Open an existing run directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SaliencyBenchError(f"{str(path)!r} is not a saliencybench run directory (no config.json)")
    data = json.loads(cfg_file.read_text())
    return Run(path, config_from_dict(data["config"]))


def run(config: RunConfig | None = None, *, run_id: str | None = None, resume: str | Path | None = None,
        executor: InProcessExecutor | ProcessExecutor | None = None, progress: bool = True,
        stop_after: int | None = None) -> Run:
    """Run (or resume) a benchmark; results stream to ``<output>/<run_id>/rows/*.parquet``.

    ``resume``: a run directory (or id under ``config.output``) to continue; its
    config must match. ``stop_after``: stop after that many new tasks (for tests
    of interruption).
    """
    config = config or RunConfig()
    if resume is not None:
        path = Path(resume)
        if not path.exists():
            path = Path(config.output) / str(resume)
        old = open_run(path)
        if old.config.key() != config.key():
            raise SaliencyBenchError(
                f"run {str(path)!r} was made with a different config ({old.config.key()} != {config.key()}); "
                "resume it with its own config (omit other flags) or start a new run"
            )
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(config.output) / (run_id or f"{stamp}-{config.key()[:6]}")
        if (path / "config.json").exists():
            raise SaliencyBenchError(f"run directory {str(path)!r} already exists; use --resume {path.name}")
        (path / "rows").mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(
            {"config": config.to_dict(), "config_key": config.key(), "versions": package_versions(),
             "started": dt.datetime.now().isoformat(timespec="seconds")}, indent=2))
    ctx = TaskContext(config, path.name)
    tasks = plan_tasks(config, len(ctx.dataset))
    done = {f.stem for f in (path / "rows").glob("*.parquet")}
    todo = [t for t in tasks if t.key not in done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="tasks", disable=not progress)
    for count, (task, rows) in enumerate((executor or InProcessExecutor()).map(todo, ctx), 1):
        _write_atomic(rows, path / "rows" / f"{task.key}.parquet")
        bar.update(1)
        bar.set_postfix_str(f"{task.model} {task.method}")
        if stop_after is not None and count >= stop_after:
            break
    bar.close()
    models_info = {name: {k: v for k, v in b.info.items() if k != "recipe"} for name, b in ctx._models.items()}
    (path / "models.json").write_text(json.dumps(models_info, indent=2, default=str))
    return Run(path, config)
