"""Run a benchmark's units on a Ray cluster (Moritz et al. Ray: A Distributed Framework for
Emerging AI Applications. OSDI 2018).

``RayExecutor`` implements the :class:`~.executors.Executor` protocol with one Ray actor per
worker. Each actor imports the run's plug-ins, builds one
:class:`~.execute.TaskContext` (models, data set, device, shared passes) and then runs
units (an explain task and its score tasks, :class:`~.tasks.Unit`) with
:func:`~.execute.run_unit`, which writes each finished task's rows and heatmaps into the
run directory itself (atomically). The run directory is either one path that every node
sees (a shared file system: NFS, Lustre, a mounted bucket) or an fsspec URL (``s3://``,
``gs://``, ``az://``, ``file://``): then every node keeps its own copy and each task
uploads its files to the URL as it finishes (:mod:`.remote`).

Scheduling. Each actor holds ``num_cpus_per_task`` CPUs and ``num_gpus_per_task`` GPUs
(default: one GPU when the config's device is CUDA, or ``auto`` on a cluster with GPUs) and
has at most two units in flight (one running, one queued), so the driver hands out units
as actors finish them; ``ray.wait`` yields each unit's finished tasks as soon as any node
reports them, so the runner's progress bar works as with the other executors.

Faults. A worker process that dies (killed, out of memory, its node lost) loses only the
unit it was running: Ray restarts the actor (``max_restarts = max_retries``) and reruns its
unfinished calls (``max_task_retries = max_retries``); the rerun skips every task of the unit
whose row file already exists (checked in the worker), so no task is computed twice and the
final rows equal an uninterrupted run's. When the retries are used up the run stops with
:class:`~.executors.LostWorkerError`; ``saliencybench run --resume`` continues it, as after a
killed driver.

Cluster. ``address=None`` connects to the session this process already has
(``ray.init`` called by the user: left running afterwards) or starts a local cluster with
this machine's cores and shuts it down at the end; an ``address`` (``auto``,
``host:6379`` or ``ray://host:10001``) connects to a running cluster and disconnects at
the end. The end is :meth:`RayExecutor.finish`, which :func:`~.runner.run` calls when the
run is over: the actors serve all of a run's ``map`` calls (its units, then its pair
units), so each worker imports torch and timm and builds its context once per run. Inside
``with RayExecutor(...) as ex:`` ``finish`` keeps them for the next run and the block's
end stops them (:meth:`RayExecutor.close`). Ray is imported only here, on first use: without
it a clear :class:`RayNotInstalledError` names the extra ``saliencybench[ray]``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import SaliencyBenchError
from .execute import TaskContext, TaskDone, run_unit
from .executors import LostWorkerError
from .remote import mirror_dir, remote_of, run_instance
from .tasks import Unit

IN_FLIGHT_PER_WORKER = 2


class RayNotInstalledError(SaliencyBenchError):
    """Ray was asked for but is not installed."""


class RayClusterError(SaliencyBenchError):
    """The Ray cluster cannot run the units (no resources, no shared run directory, no connection)."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayNotInstalledError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError(
            "the Ray executor needs Ray, which is not installed: pip install 'saliencybench[ray]' (or "
            "pip install 'ray[default]'); without it use --executor process --workers N") from None
    return ray


# (config as a dict, run id, run directory, the run's instance: see remote.run_instance): what a worker serves
Setup = tuple[dict[str, Any], str, str, str | None]


def _kill(ray: Any, actors: list[Any]) -> None:
    """Stop ``actors`` for good (those already gone with their node or cluster are skipped)."""
    for a in actors:
        with contextlib.suppress(Exception):
            ray.kill(a, no_restart=True)


class UnitWorker:
    """The body of one Ray actor: a :class:`TaskContext` built for a run, then its units one by one.

    Every call names the run it belongs to (``setup``); the context is rebuilt when that
    changes, so a held executor's actors serve run after run without importing again, and an
    actor that Ray restarted (with its first constructor arguments) serves the current run.
    Errors while building (a plug-in that fails to import, an invalid device) are kept and
    reported by :meth:`info` instead of killing the actor, so the driver can name them.
    """

    def __init__(self, setup: Setup, threads: int, gpus: float) -> None:
        import torch

        torch.set_num_threads(threads)
        self.gpus = gpus
        self.setup: Setup | None = None
        self.prepare(setup)

    def prepare(self, setup: Setup) -> dict[str, Any]:
        """Build the context for ``setup`` unless it is the one built; then :meth:`info`."""
        if setup == self.setup:
            return self.info()
        from .config import config_from_dict
        from .plugins import load_plugins

        config, run_id, run_dir = setup[:3]
        self.setup, self.run_dir, self.error, self.remote = setup, Path(run_dir), "", None
        try:
            cfg = config_from_dict(config)
            self.remote = remote_of(cfg.output, run_id)
            if self.remote is not None:  # a run URL: this node's own copy, filled and uploaded by the tasks
                self.run_dir = mirror_dir(self.remote.url)
                # emptied if it was a copy of another run of that name; the URL must hold the driver's run
                if not self.remote.adopt(self.run_dir, expect=setup[3] if len(setup) > 3 else None):
                    raise SaliencyBenchError(f"{self.remote.url} holds no run (no config.json)")
            if self.gpus and cfg.device.startswith("cuda"):
                cfg = config_from_dict({"device": "cuda"}, cfg)  # Ray shows the actor its own GPU(s) only
            elif not self.gpus and cfg.device == "auto":
                cfg = config_from_dict({"device": "cpu"}, cfg)  # no GPU was scheduled for this worker
            from . import load_all

            load_all()
            load_plugins(cfg.plugins)
            self.ctx = TaskContext(cfg, run_id, self.run_dir)
        except Exception as e:  # noqa: BLE001 - reported by info()
            self.error = f"{type(e).__name__}: {e}"
        return self.info()

    def info(self) -> dict[str, Any]:
        """Where this worker runs and whether it can: pid, host, run directory visible, start error."""
        import socket

        import saliencybench

        visible = self.remote.exists("config.json") if self.remote is not None else (
            self.run_dir / "config.json").is_file()
        return {"pid": os.getpid(), "host": socket.gethostname(), "error": self.error,
                "run_dir_visible": visible, "version": saliencybench.__version__}

    def run(self, unit: Unit, done: list[str], setup: Setup) -> list[TaskDone]:
        """Run the unit's tasks not in ``done`` and not already written (a retried call skips those);
        the tasks found written are reported too (with 0 rows), so the driver counts and fetches them."""
        self.prepare(setup)
        if self.error:
            raise SaliencyBenchError(f"the Ray worker could not start: {self.error}")
        keys = [t.key for t in unit.tasks() if t.key not in done]
        if self.remote is not None:  # finished on the URL (uploading what a failed upload left here first)
            found = self.remote.finished(self.run_dir, unit.explain.key, keys)
        else:
            found = {k for k in keys if (self.run_dir / "rows" / f"{k}.parquet").is_file()}
        written = [TaskDone(t.key, t.label(), 0, 0.0) for t in unit.tasks() if t.key in found]
        return written + run_unit(unit, self.ctx, set(done) | found)


class RayExecutor:
    """Run units on a Ray cluster, one actor per worker (see the module docstring).

    ``address``: a running cluster (``auto``, ``host:6379``, ``ray://host:10001``); None: the
    session this process has, else a local cluster with this machine's cores.
    ``num_cpus_per_task``: CPUs (and torch threads) per worker; ``num_gpus_per_task``: GPUs per
    worker (fractions share a GPU; None: 1 when the config's device is CUDA, or ``auto`` on a
    cluster with GPUs, else 0); ``max_retries``: restarts of a lost worker and reruns of its
    unit; ``workers``: number of actors (None: as many as the cluster's resources hold);
    ``runtime_env``: passed to ``ray.init`` when this executor connects (e.g. ``{"py_modules":
    [...]}`` for nodes without saliencybench installed).
    """

    def __init__(self, address: str | None = None, num_cpus_per_task: float = 1, num_gpus_per_task: float | None = None,
                 max_retries: int = 3, workers: int | None = None, runtime_env: dict[str, Any] | None = None) -> None:
        import_ray()
        for name, v, low in (("num_cpus_per_task", num_cpus_per_task, 0), ("max_retries", max_retries, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
                raise SaliencyBenchError(f"{name} must be a number >= {low}, got {v!r}")
        if num_gpus_per_task is not None and (isinstance(num_gpus_per_task, bool) or
                                              not isinstance(num_gpus_per_task, (int, float)) or num_gpus_per_task < 0):
            raise SaliencyBenchError(f"num_gpus_per_task must be a number >= 0 or None, got {num_gpus_per_task!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise SaliencyBenchError(f"workers must be an integer >= 1 or None, got {workers!r}")
        if not isinstance(max_retries, int):
            raise SaliencyBenchError(f"max_retries must be an integer, got {max_retries!r}")
        self.address, self.num_cpus_per_task, self.num_gpus_per_task = address, num_cpus_per_task, num_gpus_per_task
        self.max_retries, self.workers, self.runtime_env = max_retries, workers, runtime_env
        self.worker_info: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}  # of the last start: connect_s (ray.init), start_s (actors ready)
        self.actors_started = 0  # in all: a run's map calls share them, a held executor's runs too
        self.reuses = 0  # runs served by actors started for an earlier run (a held executor)
        self._actors: list[Any] = []
        self._setup: Setup | None = None
        self._actor_gpus = 0.0
        self._owned = False  # this executor started (or connected) Ray and shuts it down in close()
        self._held = False  # inside ``with``: the actors outlive each run until the block ends

    # ---- cluster ----------------------------------------------------------------------------

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local cluster); True when this executor must shut Ray down after."""
        if ray.is_initialized():
            return False
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": True}
        if self.runtime_env:
            kw["runtime_env"] = self.runtime_env
        if self.address is None:
            cores = os.cpu_count() or 1
            want = (self.workers or 1) * self.num_cpus_per_task
            kw["num_cpus"] = max(cores, int(-(-want // 1)))
        else:
            kw["address"] = self.address
        try:
            ray.init(**kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray cluster"
            raise RayClusterError(f"cannot start or reach {where}: {type(e).__name__}: {str(e)[:300]}; check "
                                  "--ray-address (e.g. host:6379 after `ray start --head` there)") from None
        return True

    def _gpus(self, ray: Any, device: str) -> float:
        if self.num_gpus_per_task is not None:
            return float(self.num_gpus_per_task)
        if device.startswith("cuda"):
            return 1.0
        if device == "auto":
            return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return 0.0

    def _n_workers(self, ray: Any, gpus: float, n_units: int) -> int:
        res = ray.cluster_resources()
        cpus, have_gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if gpus > have_gpus:
            raise RayClusterError(f"each Ray worker asks for {gpus:g} GPU(s) but the cluster has {have_gpus:g}; "
                                  "use --device cpu (or num_gpus_per_task=0), or add GPU nodes")
        if self.num_cpus_per_task > cpus:
            raise RayClusterError(f"each Ray worker asks for {self.num_cpus_per_task:g} CPUs but the cluster has "
                                  f"{cpus:g}")
        fit = int(cpus // self.num_cpus_per_task) if self.num_cpus_per_task else n_units
        if gpus:
            fit = min(fit, int(have_gpus // gpus))
        n = self.workers or fit
        if n > fit:
            warnings.warn(f"{n} Ray workers were asked for but the cluster's resources hold {fit}; running {fit}",
                          RuntimeWarning, stacklevel=3)
            n = fit
        return max(1, min(n, n_units))

    def _start(self, ray: Any, ctx: TaskContext, n: int, gpus: float) -> list[Any]:
        actor_cls = ray.remote(UnitWorker).options(
            num_cpus=self.num_cpus_per_task, num_gpus=gpus, max_restarts=self.max_retries,
            max_task_retries=self.max_retries)
        threads = max(1, int(self.num_cpus_per_task))
        actors = [actor_cls.remote(self._setup, threads, gpus) for _ in range(n)]
        self.actors_started += n
        try:
            self._check_workers(ray, [a.info.remote() for a in actors], ctx)
        except BaseException:
            _kill(ray, actors)
            raise
        return actors

    def _check_workers(self, ray: Any, infos: list[Any], ctx: TaskContext) -> None:
        """Raise :class:`RayClusterError` naming a worker that cannot serve the run (``infos``: refs of their info)."""
        self.worker_info = ray.get(infos)
        import saliencybench

        for info in self.worker_info:
            if info["error"]:
                raise RayClusterError(f"a Ray worker on {info['host']} could not start: {info['error']}")
            if not info["run_dir_visible"]:
                raise RayClusterError(
                    f"the run directory {ctx.location} is not visible on Ray node {info['host']}: put --output on "
                    "storage every node mounts at the same path, or give it as a URL every node can reach "
                    "(s3://, gs://, ...)")
            if info["version"] != saliencybench.__version__:
                warnings.warn(f"Ray node {info['host']} runs saliencybench {info['version']}, this driver "
                              f"{saliencybench.__version__}: install the same version everywhere", RuntimeWarning,
                              stacklevel=4)

    # ---- the Executor protocol --------------------------------------------------------------

    def map(self, units: list[Unit], ctx: TaskContext, done: set[str]) -> Iterator[list[TaskDone]]:
        """Run ``units`` on Ray actors; yield each unit's finished tasks as it completes.

        The actors (and a cluster this executor started) are kept for the next ``map`` of the
        same run (its pair units) and stopped by :meth:`finish`, which :func:`~.runner.run` calls
        at its end (unless a ``with`` block holds them); an error, or a caller that stops early,
        stops them at once."""
        if not units:
            return
        assert ctx.run_dir is not None
        ray = import_ray()
        complete = False
        try:
            for name in {u.explain.model for u in units}:
                ctx.model(name)  # default models are trained or cached here once; recorded in models.json
            actors = self._actors_for(ray, ctx, len(units))
            yield from self._dispatch(ray, actors, units, done, ctx)
            complete = True
        finally:
            if not complete:
                self.close()

    def _actors_for(self, ray: Any, ctx: TaskContext, n_units: int) -> list[Any]:
        """The running actors (their context rebuilt when they served another run), else new ones."""
        setup: Setup = (ctx.config.to_dict(), ctx.run_id, str(ctx.run_dir), run_instance(ctx.run_dir / "config.json"))
        if self._actors and ray.is_initialized() and self._gpus(ray, ctx.config.device) == self._actor_gpus:
            if setup != self._setup:
                t0 = time.perf_counter()
                self._setup = setup
                self._check_workers(ray, [a.prepare.remote(setup) for a in self._actors], ctx)
                more = self._n_workers(ray, self._actor_gpus, n_units) - len(self._actors)
                if more > 0:  # this run has work for more actors than the last one had
                    served = self.worker_info
                    self._actors += self._start(ray, ctx, more, self._actor_gpus)
                    self.worker_info = served + self.worker_info
                self.timings = {"connect_s": 0.0, "start_s": time.perf_counter() - t0}
                self.reuses += 1
            return self._actors
        self.close()
        t0 = time.perf_counter()
        self._owned = self._connect(ray)
        self.timings = {"connect_s": time.perf_counter() - t0}
        gpus = self._gpus(ray, ctx.config.device)
        t0 = time.perf_counter()
        self._setup, self._actor_gpus = setup, gpus
        self._actors = self._start(ray, ctx, self._n_workers(ray, gpus, n_units), gpus)
        self.timings["start_s"] = time.perf_counter() - t0
        return self._actors

    def finish(self) -> None:
        """The run is over (called by :func:`~.runner.run`): :meth:`close` unless a ``with`` block holds this executor."""
        if not self._held:
            self.close()

    def close(self) -> None:
        """Stop the actors, and shut Ray down when this executor started or connected it."""
        actors, self._actors, self._setup = self._actors, [], None
        if not actors and not self._owned:
            return
        ray = import_ray()
        _kill(ray, actors)
        if self._owned:
            self._owned = False
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        """Hold the actors (and a cluster this executor starts) for every run inside the block."""
        self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._held = False
        self.close()

    def _dispatch(self, ray: Any, actors: list[Any], units: list[Unit], done: set[str],
                  ctx: TaskContext) -> Iterator[list[TaskDone]]:
        from ray.exceptions import RayError, RayTaskError

        queue = deque(range(len(units)))
        in_flight: dict[Any, tuple[int, int]] = {}

        def submit(a: int) -> None:
            i = queue.popleft()
            keys = [t.key for t in units[i].tasks() if t.key in done]
            in_flight[actors[a].run.remote(units[i], keys, self._setup)] = (a, i)

        for _ in range(IN_FLIGHT_PER_WORKER):
            for a in range(len(actors)):
                if queue:
                    submit(a)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            a, i = in_flight.pop(ref)
            try:
                reports = ray.get(ref)
            except RayTaskError as e:  # an error raised by the unit itself: re-raised as itself
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, BaseException) else e) from e
            except RayError as e:  # the worker died more often than max_retries allows
                raise LostWorkerError(
                    f"a Ray worker died while running {units[i].explain.label()} and its {self.max_retries} retries "
                    f"are used up ({type(e).__name__}); rows already computed are kept: continue with "
                    f"`saliencybench run --resume {ctx.location}`") from None
            if queue:
                submit(a)
            yield reports
