"""Import time and heatmap-store cost (rows of BENCHMARKS.md, target 12).

- ``import saliencybench`` against ``import torch, timm``: the median of 5 fresh interpreters of each,
  in one run (target: at most 1.5x the time of ``import torch, timm``).
- The heatmap store: bytes per heatmap (float16, 64 and 224 px), the store of the default run
  (3 models x 14 methods x 32 images at 64 px, plus the cue and contrast parts; goal <= 25 MB) and the
  projection for ImageNet val (50,000 images x 14 methods at 224 px), from files written by the store.

Run: ``pytest benchmarks/test_bench_api.py --benchmark-only -s``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch
from limits import record, row

from saliencybench.benchmark.store import HeatmapStore


def _fresh(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def test_import_time_vs_torch_and_timm(benchmark):
    pairs = [(_fresh("import torch, timm"), _fresh("import torch, timm, saliencybench")) for _ in range(5)]
    t_base = statistics.median(p[0] for p in pairs)
    t_ours = statistics.median(p[1] for p in pairs)
    benchmark.pedantic(lambda: None, rounds=1)
    record(benchmark, [row("import torch, timm, saliencybench (fresh interpreter, median of 5)", 12, t_ours,
                           "import torch, timm", t_base, "import_vs_torch_timm",
                           note="the benchmark stack, pandas plotting and the data sets load on first use")])


def test_heatmap_store_cost(benchmark, tmp_path):
    store = HeatmapStore(tmp_path)
    g = torch.Generator().manual_seed(0)
    sizes = {}
    for px in (64, 224):
        maps = torch.rand(16, px, px, generator=g)
        path = store.write(f"k{px}", [str(i) for i in range(16)], maps, "float16", {"model": "m", "method": "x"})
        sizes[px] = path.stat().st_size / 16
    benchmark.pedantic(lambda: store.read("k224"), rounds=5)
    n_default = 3 * 14 * 32 + 3 * 14 * 16  # main block + the cue and contrast parts
    default_mb = n_default * sizes[64] / 1e6
    imagenet_gb = 50_000 * 14 * sizes[224] / 1e9
    record(benchmark, [
        row(f"heatmap store of the default run ({n_default} maps of 64 px, float16)", 12, default_mb, "", None,
            "store_default_run", unit="MB",
            note=f"{sizes[64]:.0f} bytes per 64 px map, {sizes[224]:.0f} per 224 px map; ImageNet val x 14 methods "
                 f"at 224 px: {imagenet_gb:.0f} GB (projected)"),
    ], bytes_per_map_64=sizes[64], bytes_per_map_224=sizes[224], imagenet_val_gb=imagenet_gb)
    assert default_mb < 25
