"""Issue 4, targets 8 and 9: the runner end to end.

Run: ``pytest benchmarks/test_bench_scaling.py --benchmark-only -s``
(target 8 only with ``SB_BENCH_DEFAULT_RUN=1``).

- 9: a small run (``synthetic-resnet``, Grad-CAM and the centre baseline,
  deletion, insertion, pointing game, box IoU) on 1x, 4x and 16x the images,
  each size in a fresh subprocess timing ``saliencybench.run`` (run twice, the
  faster counts: the first pays one-time warm-ups) and reading its
  peak RSS: ``VmHWM`` of ``/proc/self/status`` (``resource.getrusage(...).ru_maxrss``
  is stored too, but on Linux a child's ru_maxrss starts at its parent's RSS at
  fork time, a whole pytest process here, so it cannot show the run's own
  peak). Time must be linear: 4x the images (4x -> 16x) take at most 1.10 x 4 the
  time (fixed costs only make the ratio smaller; any superlinear cost makes it
  larger); peak memory flat: peak RSS at 16x within 1.10x of that at 1x.
- 8 (opt-in, minutes): the embedded default ``saliencybench run`` on a fresh cache
  (``SALIENCYBENCH_CACHE`` in a temporary directory, so the default run's six models
  are trained), wall time of the console script; target <= 300 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from limits import UNTRAINED, bench_model, record, row

BASE_IMAGES = 2  # 1x; the runs use 2, 8 and 32 images (the runner's shards hold 16)
SCALES = (1, 4, 16)

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
import saliencybench as sb
from saliencybench.benchmark.models import load_model

n, out = int(sys.argv[1]), sys.argv[2]
load_model("synthetic-resnet", progress=False)  # trained and cached by the parent already


def config(rep):
    return sb.RunConfig(models=["synthetic-resnet"], methods=["gradcam", "center"],
                        metrics=["deletion", "insertion", "pointing_game", "box_iou"], n_images=n, inspect=[],
                        output=f"{out}/rep{rep}")


def hwm_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


before = hwm_mb()
times = []
for rep in range(2):  # the second run is warm; the faster one counts
    t0 = time.perf_counter()
    run = sb.run(config(rep), progress=False)
    times.append(time.perf_counter() - t0)
seconds = min(times)
print("SB_SCALING " + json.dumps({"n": n, "run_s": seconds, "runs_s": times, "rss_before_mb": before,
                                  "peak_rss_mb": hwm_mb(),
                                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "rows": len(run.results)}))
"""


def _one_size(n: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(out), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SB_SCALING "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.skipif(UNTRAINED, reason="the runner loads the trained default model by name")
def test_run_scaling_1x_4x_16x(benchmark, tmp_path):
    bench_model("synthetic-resnet")  # trains and caches it on a fresh machine, outside the timings
    res: dict[int, dict] = {}

    def sweep():
        for s in SCALES:
            res[s] = _one_size(BASE_IMAGES * s, tmp_path / f"x{s}")

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    n = {s: BASE_IMAGES * s for s in SCALES}
    for s in SCALES:
        assert res[s]["rows"] > 0 and res[s]["n"] == n[s]
    print("\n" + json.dumps(res))
    assert res[1]["rows"] < res[4]["rows"] < res[16]["rows"], [res[s]["rows"] for s in SCALES]
    per_image = {s: res[s]["run_s"] / n[s] for s in SCALES}
    growth_a = res[4]["run_s"] / res[1]["run_s"] / 4  # 1.0: linear; < 1: fixed costs amortised
    growth_b = res[16]["run_s"] / res[4]["run_s"] / 4
    sizes = ", ".join(f"{n[s]} img: {res[s]['run_s']:.2f} s ({per_image[s]:.3f} s/img), peak RSS "
                      f"{res[s]['peak_rss_mb']:.0f} MB (+{res[s]['peak_rss_mb'] - res[s]['rss_before_mb']:.0f} MB "
                      f"in run)" for s in SCALES)
    rows = [
        row(f"run time, synthetic-resnet, gradcam+center x 4 metrics, {n[4]} -> {n[16]} images (4x)", 9,
            res[16]["run_s"], f"4 x the time of {n[4]} images", 4 * res[4]["run_s"], "scaling_time",
            note=f"time(4x images) / (4 time): {n[4]}->{n[16]} {growth_b:.2f}, {n[1]}->{n[4]} {growth_a:.2f}; "
                 + sizes, ours_label=f"{n[16]} img"),
        row(f"peak RSS, same run, {n[16]} vs {n[1]} images", 9, res[16]["peak_rss_mb"], f"peak RSS at {n[1]} images",
            res[1]["peak_rss_mb"], "scaling_memory", unit="MB", ours_label=f"{n[16]} img",
            note="VmHWM of the child; its ru_maxrss (" + f"{res[16]['ru_maxrss_mb']:.0f} MB) starts at the "
                 "parent's RSS at fork time"),
    ]
    record(benchmark, rows, scaling={str(s): res[s] for s in SCALES},
           per_image_s={str(s): per_image[s] for s in SCALES})


def _console_script() -> str:
    exe = Path(sys.executable).with_name("saliencybench")
    return str(exe) if exe.exists() else "saliencybench"


@pytest.mark.skipif(os.environ.get("SB_BENCH_DEFAULT_RUN") != "1",
                    reason="opt-in, minutes: SB_BENCH_DEFAULT_RUN=1 (or write_benchmarks_md.py --run-default)")
def test_default_run_fresh_cache(benchmark, tmp_path):
    env = {**os.environ, "SALIENCYBENCH_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "run.log"
    out = tmp_path / "results"
    result = {}

    def go():
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([_console_script(), "run", "--output", str(out)], env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=4 * 3600, check=False)
        result.update(rc=proc.returncode, wall_s=time.perf_counter() - t0)

    benchmark.pedantic(go, rounds=1, iterations=1)
    assert result["rc"] == 0, log.read_text()[-3000:]
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "leaderboard.csv").exists(), sorted(p.name for p in runs[0].iterdir())
    models = json.loads((runs[0] / "models.json").read_text()) if (runs[0] / "models.json").exists() else {}
    train = {k: v.get("train_seconds") for k, v in models.items() if v.get("train_seconds") is not None}
    note = ("training, side by side in up to 2 processes: " + ", ".join(f"{k} {v:.0f} s" for k, v in train.items())
            + f" (sum {sum(train.values()):.0f} s)") if train else ""
    rows = [row(f"embedded default `saliencybench run`, fresh cache (trains its {len(train) or 'default'} models)", 8,
                result["wall_s"], "-", None, "default_run_s", note=note, ours_label="wall")]
    record(benchmark, rows, train_seconds=train, log_tail=log.read_text()[-2000:])
