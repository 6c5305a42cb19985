"""Issue 17: the Ray executor against the in-process executor on one fixed run.

Run: ``pytest benchmarks/test_bench_ray.py --benchmark-only -s`` (needs ``saliencybench[ray]``).

The run: a random-init resnet10t (6 classes, from a checkpoint), 48 synthetic images of 64 px
in shards of 4, occlusion (8 px windows, stride 8: 65 forwards per image) and RISE (200 masks),
scored by deletion (16 steps): 24 units of one explain and one score task, each a second or
more on one CPU thread. Sides, timed as the wall time of ``saliencybench.run`` in this
process: the in-process executor with 1 torch thread; ``RayExecutor(workers=1)`` and
``RayExecutor(workers=2)`` (1 CPU and 1 torch thread per worker) on a local Ray cluster of 2
CPUs started once before (its start is reported, not counted). The Ray times include
starting the workers (each imports torch and timm and builds its model), which is reported
too. Targets: Ray at 1 worker within 10% of in-process; 2 workers on 2 cores >= 1.7x faster
than in-process. Each Ray side then runs the same config again (a new run directory) on the
same workers, held by a ``with`` block: they rebuild their context for the new run but start
no process (what a second run, or a sweep of runs, costs); the same targets apply to those.
The in-process executor needs no start, so the first runs carry the workers' start (about
2.5 s each: importing torch and timm) against nothing. The machine is shared: the load average before and after is recorded, and
how much more work two concurrent CPU-bound processes got done than one (the most that 2
workers can gain at that time), measured just before and just after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from limits import TARGETS, record, row
from safetensors.torch import save_file

from saliencybench.benchmark.config import config_from_dict
from saliencybench.benchmark.runner import run

ray = pytest.importorskip("ray", reason="the Ray benchmark needs the extra saliencybench[ray]")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _config(tmp, checkpoint):
    return config_from_dict(dict(
        models=["resnet10t"], checkpoints={"resnet10t": str(checkpoint)}, methods=["occlusion", "rise"],
        metrics=["deletion"], dataset_params={"size": 64}, image_size=64, n_images=48, batch_size=4, device="cpu",
        method_params={"occlusion": {"window": 8, "stride": 8, "incremental": False}, "rise": {"n_masks": 200}},
        metric_params={"deletion": {"n_steps": 16}}, inspect=[], output=str(tmp)))


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


SPIN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(20_000_000): x += i\nprint(time.perf_counter() - t)"


def parallel_capacity() -> float:
    """How much more CPU-bound work two processes get done than one, now, on this (shared) machine:
    1 process's wall time over the mean wall time of 2 concurrent ones, times 2 (2.0 on 2 idle cores)."""
    def spin(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return sum(float(p.communicate()[0]) for p in procs) / n

    one = spin(1)
    return 2 * one / spin(2)


def test_ray_vs_in_process(benchmark, tmp_path):
    from saliencybench.benchmark.ray_executor import RayExecutor

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(ckpt))
    cfg = _config(tmp_path, ckpt)
    load_before = _load()
    capacity_before = parallel_capacity()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    cluster_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    res: dict[str, float] = {}
    starts: dict[str, float] = {}
    rows_n: dict[str, int] = {}

    def sides():
        torch.set_num_threads(1)
        try:
            for name, executor in (("in-process", None),):
                t = time.perf_counter()
                rows_n[name] = len(run(cfg, run_id=name, progress=False, executor=executor).results)
                res[name] = time.perf_counter() - t
            for n in (1, 2):
                with RayExecutor(workers=n) as held:
                    for name in (f"ray-{n}", f"ray-{n}-held"):
                        t = time.perf_counter()
                        rows_n[name] = len(run(cfg, run_id=name, progress=False, executor=held).results)
                        res[name] = time.perf_counter() - t
                        starts[name] = held.timings["start_s"]
                assert held.actors_started == n and held.reuses == 1
        finally:
            torch.set_num_threads(threads)

    try:
        benchmark.pedantic(sides, rounds=1, iterations=1)
    finally:
        ray.shutdown()
    assert len(set(rows_n.values())) == 1 and rows_n["in-process"] > 0
    capacity = (capacity_before + parallel_capacity()) / 2
    load = (f"load average (1/5/15 min) {load_before} before, {_load()} after, {os.cpu_count()} cores; 2 concurrent "
            f"CPU-bound processes did {capacity:.2f}x the work of one (the most 2 workers could gain then)")
    base = res["in-process"]
    measure = "fixed run: resnet10t 64 px, 48 images, occlusion + RISE, deletion (24 units)"
    note = (f"{load}; Ray cluster start {cluster_s:.1f} s (not counted); worker start counted: "
            f"1 worker {starts['ray-1']:.1f} s, 2 workers {starts['ray-2']:.1f} s; without it: 1 worker "
            f"{res['ray-1'] - starts['ray-1']:.1f} s ({(res['ray-1'] - starts['ray-1']) / base:.2f}x), 2 workers "
            f"{res['ray-2'] - starts['ray-2']:.1f} s (speed-up {base / (res['ray-2'] - starts['ray-2']):.2f}x)")
    def held_row(n: int, key: str) -> dict:
        return row(f"{measure}: Ray, {n} worker{'s on 2 cores' if n == 2 else ''}, held from the run before (with "
                   "block)", 17, res[f"ray-{n}-held"], "in-process executor, 1 thread", base,
                   key if key in TARGETS else None, ours_label=f"Ray {n} worker{'s' if n == 2 else ''}, held",
                   note=f"the same workers as the row above, their context rebuilt for this run in "
                        f"{starts[f'ray-{n}-held']:.2f} s (counted), no process started; {load}")

    rows = [
        row(f"{measure}: Ray, 1 worker", 17, res["ray-1"], "in-process executor, 1 thread", base,
            "ray_overhead" if "ray_overhead" in TARGETS else None,
            note=f"target <= 1.10x; {note}", ours_label="Ray 1 worker"),
        held_row(1, "ray_overhead"),
        row(f"{measure}: Ray, 2 workers on 2 cores", 17, res["ray-2"], "in-process executor, 1 thread", base,
            "ray_speedup" if "ray_speedup" in TARGETS else None,
            note=f"target >= 1.7x faster (ratio shown ours/ref); {load}; the least a cold start allows here: the "
                 f"in-process time plus two worker starts ({starts['ray-1']:.1f} s each, the 1-worker figure), over "
                 f"the parallel capacity: {(base + 2 * starts['ray-1']) / capacity:.1f} s "
                 f"({base * capacity / (base + 2 * starts['ray-1']):.2f}x)", ours_label="Ray 2 workers"),
        held_row(2, "ray_speedup"),
    ]
    record(benchmark, rows, seconds=res, worker_start_s=starts, cluster_start_s=cluster_s, load=load,
           parallel_capacity=capacity)
