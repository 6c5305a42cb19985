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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NotApplicableError, SaliencyBenchError
from ..methods.base import explain, get_method
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

    def shared_passes(self, task: Task, images: torch.Tensor, targets: torch.Tensor) -> SharedPasses:
        """The forward/backward passes the run's methods share on this task's shard (kept for one shard)."""
        key = (task.model, task.indices)
        if self._shared is None or self._shared[0] != key:
            methods = {m: self.config.method_params.get(m, {}) for m in self.config.methods}
            self._shared = (key, SharedPasses(self.model(task.model).model, images, targets, pass_requests(methods)))
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


def _load_batch(ds: GroundTruthDataset, indices: Iterable[int], size: int) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Samples resized (squashed) to ``size`` with boxes and masks scaled; unreadable ones recorded."""
    samples, skipped = [], []
    for i in indices:
        try:
            s = ds[i]
        except UnreadableImageError as e:
            skipped.append({"index": i, "error": str(e)})
            continue
        h, w = s.image.shape[-2:]
        if (h, w) != (size, size):
            img = F.interpolate(s.image[None], size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)[0]
            mask = F.interpolate(s.mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].bool()
            scale = torch.tensor([size / w, size / h, size / w, size / h])
            s = Sample(s.image_id, img.clamp(0, 1), s.label, s.boxes * scale, mask, s.difficult, s.meta)
        samples.append(s)
    return samples, skipped


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def run_task(task: Task, ctx: TaskContext) -> pd.DataFrame:
    """Execute one task and return its result rows (long format)."""
    cfg = ctx.config
    bundle = ctx.model(task.model)
    samples, skipped = _load_batch(ctx.dataset, task.indices, cfg.image_size or bundle.input_size)
    base = {"run_id": ctx.run_id, "dataset": cfg.dataset, "model": task.model, "method": task.method,
            "seed": cfg.seed, "versions": _json(package_versions())}
    mparams = get_method(task.method).resolve_params(cfg.method_params.get(task.method, {}))
    rows: list[dict[str, Any]] = [
        {**base, "image_id": f"#{s['index']}", "class": "", "metric": "skipped_image", "value": float("nan"),
         "method_params": _json(mparams), "metric_params": "{}", "note": s["error"]} for s in skipped
    ]
    if not samples:
        return pd.DataFrame(rows)
    x = bundle.normalise(torch.stack([s.image for s in samples]))
    t = torch.tensor([s.label for s in samples])
    ids = [s.image_id for s in samples]
    classes = [bundle.classes[s.label] if s.label < len(bundle.classes) else str(s.label) for s in samples]

    def emit(metric: str, values: Iterable[float], params: dict[str, Any], note: str = "", **extra: Any) -> None:
        for i, v in enumerate(values):
            rows.append({**base, "image_id": ids[i], "class": classes[i], "metric": metric, "value": float(v),
                         "method_params": _json(mparams), "metric_params": _json(params), "note": note,
                         **{k: (val[i] if isinstance(val, list) else val) for k, val in extra.items()}})

    if task.kind == "sanity":
        df = sanity_randomization(bundle.model, x, t, task.method, per_image=True, seed=cfg.seed, method_params=mparams)
        for _, r in df.iterrows():
            for sim in ("spearman_abs", "spearman", "ssim"):
                rows.append({**base, "image_id": ids[int(r.image)], "class": classes[int(r.image)],
                             "metric": f"sanity_{sim}", "value": float(r[sim]), "method_params": _json(mparams),
                             "metric_params": _json({"order": "cascading", "stage": int(r.stage)}),
                             "note": "", "stage": int(r.stage), "layer": r.layer})
        return pd.DataFrame(rows)

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heat = explain(bundle.model, x, t, task.method, shared=ctx.shared_passes(task, x, t), **mparams)
    except NotApplicableError as e:
        for metric in cfg.metrics:
            if metric != "sanity_randomization":
                emit(metric, [float("nan")] * len(samples), {}, note=f"n/a: {e}")
        return pd.DataFrame(rows)
    metrics = [m for m in cfg.metrics if m != "sanity_randomization"]
    gallery = [i for i, idx in enumerate(task.indices[: len(samples)]) if idx < GALLERY_IMAGES]
    for i in gallery:
        rows.append({**base, "image_id": ids[i], "class": classes[i], "metric": "heatmap", "value": float("nan"),
                     "method_params": _json(mparams), "metric_params": "{}", "note": note,
                     "heatmap": heat[i].numpy().astype("float16").tobytes(), "heatmap_shape": list(heat[i].shape)})
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
    masks = torch.stack([s.mask for s in samples])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "pointing_game" in metrics:
            p = {**get_metric("pointing_game").params, **cfg.metric_params.get("pointing_game", {})}
            emit("pointing_game", pointing_game(heat, masks, **p).tolist(), p, note)
        if "energy_pointing_game" in metrics:
            emit("energy_pointing_game", energy_pointing_game(heat, masks).tolist(), {}, note)
        if "box_iou" in metrics:
            p = {"threshold": 0.15, **cfg.metric_params.get("box_iou", {})}
            ious, _, no_box = box_iou(heat, [s.boxes for s in samples], return_boxes=True, **p)
            emit("box_iou", ious.tolist(), p, note, no_box=[bool(v) for v in no_box],
                 top1_correct=[bool(v) for v in top1_ok], top5_correct=[bool(v) for v in top5_ok])
    return pd.DataFrame(rows)


class InProcessExecutor:
    """Runs tasks one after another in this process (the default executor)."""

    def map(self, fn: Callable[[Task], pd.DataFrame], tasks: list[Task]) -> Iterator[tuple[Task, pd.DataFrame]]:
        for task in tasks:
            yield task, fn(task)


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
        executor: InProcessExecutor | None = None, progress: bool = True,
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
    for count, (task, rows) in enumerate((executor or InProcessExecutor()).map(lambda t: run_task(t, ctx), todo), 1):
        _write_atomic(rows, path / "rows" / f"{task.key}.parquet")
        bar.update(1)
        bar.set_postfix_str(f"{task.model} {task.method}")
        if stop_after is not None and count >= stop_after:
            break
    bar.close()
    models_info = {name: {k: v for k, v in b.info.items() if k != "recipe"} for name, b in ctx._models.items()}
    (path / "models.json").write_text(json.dumps(models_info, indent=2, default=str))
    return Run(path, config)
