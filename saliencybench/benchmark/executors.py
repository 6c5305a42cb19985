"""Executors: who runs the units of a run (an explain task and its score tasks).

Every executor calls :func:`~.execute.run_unit`, which writes the rows and heatmaps
of each finished task into the run directory itself, and yields what finished, so
the driver only tracks progress. ``InProcessExecutor`` runs units one after another;
``ProcessExecutor`` runs them in spawned worker processes that build their own
models and data set from the config (the plug-ins are imported in every worker).
A worker that dies (killed, out of memory) loses only the units it had in flight:
the pool is restarted and those units run again, up to ``max_restarts`` times.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import SaliencyBenchError
from .config import config_from_dict
from .execute import TaskContext, TaskDone, run_unit
from .tasks import Unit


class Executor(Protocol):
    """Runs units; yields the tasks each unit finished (already written to the run directory)."""

    def map(self, units: list[Unit], ctx: TaskContext, done: set[str]) -> Iterator[list[TaskDone]]: ...

    # Optional: ``finish()``, called at the end of a run (:func:`~.runner.run`, ``score_run``), stops the
    # workers kept between its map calls (a RayExecutor held by a ``with`` block keeps them; ``close()``
    # stops them in any case).


def finish_executor(executor: Any) -> None:
    """Tell ``executor`` its run is over (its optional ``finish()``: the workers it kept stop)."""
    finish = getattr(executor, "finish", None)
    if finish is not None:
        finish()


class LostWorkerError(SaliencyBenchError):
    """A worker process died and the pool could not be restarted often enough."""


class InProcessExecutor:
    """Runs units one after another in this process (the default executor)."""

    def map(self, units: list[Unit], ctx: TaskContext, done: set[str]) -> Iterator[list[TaskDone]]:
        for unit in units:
            yield run_unit(unit, ctx, done)


_WORKER: TaskContext | None = None


def _start_worker(config: dict[str, Any], run_id: str, run_dir: str, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    cfg = config_from_dict(config)
    from . import load_all
    from .plugins import load_plugins

    load_all()
    load_plugins(cfg.plugins)
    _WORKER = TaskContext(cfg, run_id, Path(run_dir))


def _run_in_worker(unit: Unit, done: set[str]) -> list[TaskDone]:
    assert _WORKER is not None, "worker not started"
    return run_unit(unit, _WORKER, done)


class ProcessExecutor:
    """Runs units in ``workers`` spawned processes, each with ``threads`` torch threads.

    Only the config and the units cross the process boundary. Shared passes are kept
    per process. Default models are trained (or loaded) in the parent first, so
    workers only read the cache. The processes are kept between the ``map`` calls of
    one run (its units, then its pair units: a worker's start, importing torch and timm,
    costs seconds) and stopped by :meth:`finish`, which :func:`~.runner.run` calls at its
    end; a ``map`` for another run, or one stopped early, starts them afresh (the pool's
    initializer fixes a worker's run; :class:`~.ray_executor.RayExecutor` can keep its
    workers across runs).
    """

    def __init__(self, workers: int = 2, threads: int = 1, max_restarts: int = 3) -> None:
        for name, v in (("workers", workers), ("threads", threads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SaliencyBenchError(f"{name} must be an integer >= 1, got {v!r}")
        self.workers, self.threads, self.max_restarts = workers, threads, max_restarts
        self.restarts = 0
        self.pools_started = 0
        self._pool: Any = None
        self._pool_args: tuple[Any, ...] | None = None

    def _get_pool(self, ctx: TaskContext) -> Any:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        args = (ctx.config.to_dict(), ctx.run_id, str(ctx.run_dir), self.threads)
        if self._pool is not None and self._pool_args != args:
            self.close()
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_start_worker, initargs=args)
            self._pool_args = args
            self.pools_started += 1
        return self._pool

    def finish(self) -> None:
        """The run is over (called by :func:`~.runner.run`): stop the worker processes."""
        self.close()

    def close(self) -> None:
        """Stop the worker processes (waiting for the units they are running); a later ``map`` starts new ones."""
        pool, self._pool, self._pool_args = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, units: list[Unit], ctx: TaskContext, done: set[str]) -> Iterator[list[TaskDone]]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        for name in {u.explain.model for u in units}:
            ctx.model(name)
        pending = list(range(len(units)))
        finished: set[int] = set()
        complete = False
        try:
            while pending:
                pool = self._get_pool(ctx)
                futures = {pool.submit(_run_in_worker, units[i], done): i for i in pending}
                try:
                    for future in as_completed(futures):
                        done_tasks = future.result()  # raises BrokenProcessPool for the units a dead worker had
                        finished.add(futures[future])
                        yield done_tasks
                    pending = []
                except BrokenProcessPool:
                    self.close()
                    lost = [i for i in pending if i not in finished]
                    self.restarts += 1
                    if self.restarts > self.max_restarts:
                        raise LostWorkerError(
                            f"a worker process died {self.restarts} times (killed or out of memory); {len(lost)} "
                            f"units were not finished. Rows already computed are kept: continue with "
                            f"`saliencybench run --resume {ctx.location}`") from None
                    warnings.warn(f"a worker process died (killed or out of memory); restarting the pool and "
                                  f"rerunning the {len(lost)} unfinished units (restart {self.restarts} of "
                                  f"{self.max_restarts})", RuntimeWarning, stacklevel=2)
                    pending = lost
                    done = done | _finished_keys(ctx)
            complete = True
        finally:
            if not complete:  # an error, or the caller stopped early: no unit keeps running after map
                self.close()


MAX_AUTO_WORKERS = 4
MIN_AUTO_EXPLANATIONS = 256


def explanations(config: Any) -> int:
    """(image, model, method) explanations a run's config asks for, over its parts (``n_images``
    None: all the data set's images, counted as 10**6)."""
    from .config import part_config

    total = 0
    for part in ["", *config.parts]:
        c = part_config(config, part)
        total += (c.n_images or 10**6) * len(c.models) * len(c.methods)
    return total


def auto_executor(device: str = "cpu", cores: int | None = None, work: int | None = None) -> ProcessExecutor | None:
    """The default executor of ``saliencybench run``: None (this process) on a GPU, with one core, or
    for a run of fewer than 256 ``work`` explanations (:func:`explanations`; starting processes
    costs seconds); else ``min(cores, 4)`` worker processes with ``cores // workers`` torch
    threads each. Small models use a second core poorly (on 2 cores two one-thread workers finish
    the default run's tasks 1.4x sooner than one two-thread process), so the cores are split."""
    from .devices import available_cores, resolve_device

    if resolve_device(device).type != "cpu" or (work is not None and work < MIN_AUTO_EXPLANATIONS):
        return None
    cores = cores or available_cores()
    workers = min(cores, MAX_AUTO_WORKERS)
    return ProcessExecutor(workers, threads=max(1, cores // workers)) if workers > 1 else None


def _finished_keys(ctx: TaskContext) -> set[str]:
    assert ctx.run_dir is not None
    return {p.stem for p in (ctx.run_dir / "rows").glob("*.parquet")}
