"""The runner: plan the tasks of a run, execute them, keep the run directory consistent.

A run directory holds ``config.json`` (the resolved config, its hash and the
versions), ``models.json`` (accuracy and provenance of every model used, merged
across sessions), ``rows/<task>.parquet`` (one file per finished task, written
atomically) and ``heatmaps/<explain task>.safetensors`` (:mod:`.store`). Metadata
files are written by write, fsync and rename, so a kill at any moment leaves the
old file or the new one. ``resume`` skips finished tasks of both kinds; a row file
that cannot be read is moved to ``rows/.corrupt/`` and its task recomputed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..errors import SaliencyBenchError
from .config import RunConfig, config_from_dict, part_config
from .execute import TaskContext
from .executors import Executor, InProcessExecutor, ProcessExecutor, finish_executor
from .pretrain import train_missing
from .provenance import package_versions
from .remote import (RemoteStorageError, is_url, mirror_dir, remote_for, remote_of, run_instance, run_url,
                     split_run_url)
from .store import HeatmapStore, write_atomic
from .tasks import Unit, iter_tasks, pair_units, plan_units
from .validate import check_run_id, config_diff, validate

INSTANCE_CHECK_S = 60.0  # how often a run on a URL checks that the URL still holds it

__all__ = ["Run", "run", "open_run", "InProcessExecutor", "ProcessExecutor", "TaskContext", "read_rows",
           "resolve_run_path", "write_models_json"]


class RunDirectoryError(SaliencyBenchError):
    """A run directory that cannot be created, read or resumed."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path`` (write, fsync, rename)."""
    write_atomic(path, json.dumps(obj, indent=2, default=str).encode())


def read_rows(path: Path, quarantine: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """All row files of a run: (rows, names of unreadable files). With ``quarantine`` an unreadable
    file is moved to ``rows/.corrupt/`` (so its task is recomputed on resume)."""
    frames, bad = [], []
    for f in sorted((path / "rows").glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(f))
        except Exception as e:  # noqa: BLE001 - truncated, empty or foreign file
            bad.append(f"{f.name} ({type(e).__name__})")
            if quarantine:
                target = path / "rows" / ".corrupt"
                target.mkdir(exist_ok=True)
                shutil.move(str(f), target / f.name)
    frames = [f for f in frames if not f.empty]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), bad


@dataclass
class Run:
    """A run directory: its config, streamed results, heatmaps, leaderboard and report."""

    path: Path
    config: RunConfig

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def remote(self) -> Any:  # -> remote.Remote | None
        """The run's shared copy when its ``output`` is a URL (:mod:`.remote`), else None."""
        return remote_of(self.config.output, self.run_id)

    @property
    def results(self) -> pd.DataFrame:
        """All result rows written so far (long format); unreadable row files are skipped with a warning."""
        rows, bad = read_rows(self.path)
        if bad:
            where = self.remote.url if self.remote is not None else self.path
            warnings.warn(f"{len(bad)} row file(s) of {self.path} cannot be read and are left out: "
                          f"{', '.join(bad[:5])}; `saliencybench run --resume {where}` recomputes them",
                          RuntimeWarning, stacklevel=2)
        return rows

    def heatmaps(self, model: str, method: str) -> tuple[list[str], Any]:
        """(image ids, heatmaps) of ``model`` and ``method`` from the run's store: a Tensor[N,H,W]
        when all maps share one shape, else a list of Tensors[H_i,W_i]."""
        import torch

        store = HeatmapStore(self.path)
        if self.remote is not None:
            self.remote.check_instance(self.path)
            self.remote.fetch_heatmaps(store, model, method)
        ids, maps = store.select(model, method)
        if not ids:
            raise SaliencyBenchError(f"no stored heatmaps for model {model!r} and method {method!r} in {self.path} "
                                     "(was the run made with store_heatmaps: false, or are the names misspelt?)")
        same = len({tuple(m.shape) for m in maps}) == 1
        return ids, torch.stack(maps) if same else maps

    def leaderboard(self) -> pd.DataFrame:
        """Method x (model, metric) table of scores with 95% CIs and mean ranks (see :meth:`board` for
        the ranking with significance, criteria, groups and sanity verdicts)."""
        from .leaderboard import leaderboard

        return leaderboard(self.results, metric_params=self.config.metric_params)

    def board(self) -> Any:
        """The full :class:`~.tables.Board`: per-metric scores, CIs, ranks and groups, criterion and overall
        ranks, across-model ranks, sanity verdicts, settings, costs."""
        from .report import _rows_and_board

        return _rows_and_board(self)[1]

    def score(self, metrics: list[str], *, methods: list[str] | None = None, models: list[str] | None = None,
              metric_params: dict[str, dict[str, Any]] | None = None, progress: bool = True,
              stop_after: int | None = None) -> Run:
        """Add rows for ``metrics`` (or new parameters) from the stored heatmaps; see :func:`score_run`."""
        from .scoring import score_run

        return score_run(self, metrics, methods=methods, models=models, metric_params=metric_params,
                         progress=progress, stop_after=stop_after)

    def report(self) -> Path:
        """Write the leaderboard files and ``report.html``; returns the report's path."""
        from .report import write_report

        return write_report(self)


def open_run(path: str | Path) -> Run:
    """Open an existing run directory (its path), or a run URL (its config, models and rows are
    downloaded into this machine's copy first, :mod:`.remote`)."""
    url = str(path).rstrip("/") if is_url(path) else None
    if url is not None:
        path = pull_run(url)
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise RunDirectoryError(f"{str(path)!r} is not a directory; give the path of a run (results/<run-id>)")
    if not cfg_file.is_file():
        raise RunDirectoryError(f"{str(path)!r} is not a saliencybench run directory (no config.json)")
    try:
        data = json.loads(cfg_file.read_text())
        config = config_from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirectoryError(f"{cfg_file} is corrupt ({type(e).__name__}: {e}); the run's rows are kept in "
                                f"{path / 'rows'}, but it cannot be resumed: start a new run") from None
    try:
        from .plugins import load_plugins

        load_plugins(config.plugins)
    except SaliencyBenchError as e:
        warnings.warn(f"run {path}: {e}; its plug-in metrics and methods are not available", RuntimeWarning,
                      stacklevel=2)
    if url is not None:  # the run lives where it was opened from (it may have been moved or copied there)
        config = dataclasses.replace(config, output=split_run_url(url)[0])
    return Run(path, config)


def pull_run(url: str) -> Path:
    """This machine's copy of the run at ``url``, with its config, models and rows downloaded."""
    remote = remote_for(url.rstrip("/"))
    local = mirror_dir(remote.url)
    remote.pull(local)  # an error naming the URL when it holds no run
    return local


def resume_url(resume: str | Path, output: str | Path) -> str | None:
    """The URL of the run ``resume`` names (itself, or a run id inside a URL ``output``), or None."""
    if is_url(resume):
        return str(resume).rstrip("/")
    if is_url(output) and "/" not in str(resume):
        return run_url(str(output), check_run_id(str(resume)))
    return None


def resolve_run_path(resume: str | Path, output: str | Path) -> Path:
    """``resume`` as given when it is an existing directory (or a run URL: this machine's copy of
    it), else the run id inside ``output`` (a directory or a URL)."""
    url = resume_url(resume, output)
    if url is not None:
        return pull_run(url)
    p = Path(resume)
    if p.is_dir():
        return p
    check_run_id(str(resume))
    candidate = Path(output) / str(resume)
    if not candidate.is_dir():
        raise RunDirectoryError(f"no run {str(resume)!r}: neither {str(p)!r} nor {str(candidate)!r} is a run "
                                "directory")
    return candidate


def _new_run_dir(config: RunConfig, run_id: str | None) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = check_run_id(run_id) if run_id is not None else f"{stamp}-{config.key()[:6]}"
    if is_url(config.output):
        url = run_url(config.output, run_id)
        if remote_for(url).exists("config.json"):
            raise RunDirectoryError(f"run {url!r} already exists; use --resume {url}")
        path = mirror_dir(url)
        shutil.rmtree(path, ignore_errors=True)  # a copy left by an earlier run of that name, gone from the URL
        return _write_run_dir(path, config, url)
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--output {str(out)!r} exists and is not a directory; choose another path")
    path = out / run_id
    if (path / "config.json").exists():
        raise RunDirectoryError(f"run directory {str(path)!r} already exists; use --resume {path}")
    return _write_run_dir(path, config, str(path))


def _write_run_dir(path: Path, config: RunConfig, where: str) -> Path:
    try:
        (path / "rows").mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / "config.json", {
            "config": config.to_dict(), "config_key": config.key(), "instance": uuid.uuid4().hex,
            "versions": package_versions(),
            "started": dt.datetime.now().isoformat(timespec="seconds")})
    except OSError as e:
        raise RunDirectoryError(f"cannot create the run directory {where!r} ({e.strerror or e}); choose a "
                                "writable --output") from None
    remote = remote_of(config.output, path.name)
    if remote is not None:
        remote.put(path / "config.json", "config.json")
        remote.expect(path, run_instance(path / "config.json"))
    return path


def write_models_json(path: Path, ctx: TaskContext) -> None:
    """Merge the models loaded in this session into ``models.json`` (never replacing or emptying it)."""
    file = path / "models.json"
    try:
        known = json.loads(file.read_text()) if file.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    for name, b in ctx._models.items():
        params = sum(p.numel() for p in b.model.parameters())
        known[name] = {**known.get(name, {}), **{k: v for k, v in b.info.items() if k != "recipe"},
                       "architecture": type(b.model).__name__, "input_size": b.input_size, "parameters": params,
                       "classes": len(b.classes), "arch": (b.info.get("recipe") or {}).get("arch", name)}
    write_json_atomic(file, known)


def finished_tasks(path: Path) -> set[str]:
    """Keys of the tasks whose row files exist and can be read; unreadable ones are quarantined with a warning."""
    done = set()
    for f in sorted((path / "rows").glob("*.parquet")):
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(f)
            done.add(f.stem)
        except Exception as e:  # noqa: BLE001
            target = path / "rows" / ".corrupt"
            target.mkdir(exist_ok=True)
            shutil.move(str(f), target / f.name)
            warnings.warn(f"row file {f.name} cannot be read ({type(e).__name__}); moved to rows/.corrupt/ and its "
                          "task will be recomputed", RuntimeWarning, stacklevel=2)
    return done


def execute(units: list[Unit], ctx: TaskContext, path: Path, executor: Executor | None, progress: bool,
            stop_after: int | None, desc: str = "tasks") -> int:
    """Run the unfinished tasks of ``units``; returns how many finished in this call."""
    remote = ctx.remote
    if remote is not None:  # rows other machines finished (the URL's run must still be this one), then files an
        remote.pull(path, same=True)  # upload left only here
        remote.push_missing(path)
    done = finished_tasks(path)
    total = sum(1 for _ in iter_tasks(units))
    todo_units = [u for u in units if any(t.key not in done for t in u.tasks())]
    bar = tqdm(total=total, initial=sum(1 for t in iter_tasks(units) if t.key in done), desc=desc,
               disable=not progress, dynamic_ncols=True)
    count, ended, checked = 0, False, time.monotonic()
    try:
        for reports in (executor or InProcessExecutor()).map(todo_units, ctx, done):
            if remote is not None and time.monotonic() - checked > INSTANCE_CHECK_S:
                remote.check_instance(path)  # the URL's run was not replaced meanwhile (one small read)
                checked = time.monotonic()
            for r in reports:
                if remote is not None and not (path / "rows" / f"{r.key}.parquet").is_file():
                    remote.get(f"rows/{r.key}.parquet", path / "rows" / f"{r.key}.parquet")  # from another node
                bar.update(1)
                bar.set_postfix_str(r.label, refresh=False)
                count += 1
            if stop_after is not None and count >= stop_after:
                break
        ended = True
    finally:
        bar.close()
        write_models_json(path, ctx)
        if remote is not None:
            try:
                remote.check_instance(path)
                remote.put(path / "models.json", "models.json")
            except RemoteStorageError as e:
                if ended:
                    raise
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)  # the run's own error is the one to see
    return count


def plan(config: RunConfig, ctx: TaskContext) -> tuple[list[Unit], list[Unit]]:
    """(units of every part of the run, pair units that run after them)."""
    units, pairs = [], []
    for part in ["", *config.parts]:
        sub = ctx.for_part(part)
        n = len(sub.dataset)
        units += plan_units(sub.config, n, part)
        pairs += pair_units(sub.config, n, part)
    return units, pairs


def run(config: RunConfig | None = None, *, run_id: str | None = None, resume: str | Path | None = None,
        executor: Executor | None = None, progress: bool = True, stop_after: int | None = None,
        report: bool = False) -> Run:
    """Run (or resume) a benchmark; results stream to ``<output>/<run_id>/rows/*.parquet``.

    The whole config is validated first (:func:`~.validate.validate`). ``resume``: a run
    directory's path, or a run id inside ``config.output``; its config must be the same
    (the differing keys are named otherwise). ``stop_after``: stop after at least that many
    new tasks (tests of interruption). ``report``: also write the leaderboard files and
    ``report.html`` (as ``run.report()``).
    """
    config = validate(config or RunConfig())
    if resume is not None:
        path = resolve_run_path(resume, config.output)
        old = open_run(path)
        if old.config.key() != config.key():
            keys = config_diff(old.config, config)
            raise RunDirectoryError(
                f"run {str(path)!r} was made with a different config (differing keys: {', '.join(keys) or 'plugins'}); "
                "resume it with its own config (omit the flags that change it) or start a new run")
        url = resume_url(resume, config.output)
        config = dataclasses.replace(old.config, device=config.device,
                                     **({"output": split_run_url(url)[0]} if url is not None else {}))
        ctx = TaskContext(config, path.name, path)
    else:
        ctx = TaskContext(config, "")
        for part in ["", *config.parts]:  # a data set that cannot be built fails before a run directory exists
            TaskContext(part_config(config, part), "").dataset
        path = _new_run_dir(config, run_id)
        ctx.run_id, ctx.run_dir = path.name, path
    ctx.inner_progress = progress and (executor is None or isinstance(executor, InProcessExecutor))
    parts = [part_config(config, part) for part in ["", *config.parts]]
    train_missing([m for c in parts for m in c.models if m not in c.checkpoints], progress=progress)
    units, pairs = plan(config, ctx)
    try:
        count = execute(units, ctx, path, executor, progress, stop_after)
        if pairs and (stop_after is None or count < stop_after):  # pair tasks read both models' stored heatmaps
            execute(pairs, ctx, path, executor, progress, None if stop_after is None else stop_after - count,
                    desc="pairs")
    finally:
        finish_executor(executor)  # its workers served both calls above
    result = Run(path, config)
    if report:
        result.report()
    return result

