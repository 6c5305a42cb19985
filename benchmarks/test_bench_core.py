"""Deletion + insertion against the same number of plain batched forward passes.

Run: ``pytest benchmarks/ --benchmark-only``. The ratio (ours / plain forwards) is
printed and stored in the benchmark's ``extra_info``; both sides run in this one
process on the same model, images and batch size.
"""

from __future__ import annotations

import time

import timm
import torch

import saliencybench as sb

SIZE, BATCH, IMAGES = 64, 64, 8


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(IMAGES, 3, SIZE, SIZE)
    t = torch.arange(IMAGES) % 10
    heat = torch.rand(IMAGES, SIZE, SIZE)
    return model, x, t, heat


def _plain_forwards(model, x, n_images):
    with torch.inference_mode():
        for i in range(0, n_images, BATCH):
            model(x[: min(BATCH, n_images - i)])


def test_deletion_insertion_vs_plain_forward(benchmark):
    model, x, t, heat = _setup()
    n_points = SIZE + 1  # step = width: H*W / W steps, plus the clean end
    forwards = IMAGES * (2 * n_points - 1)  # the clean image is shared by both curves
    big = x.repeat(BATCH // IMAGES, 1, 1, 1)
    t0 = time.perf_counter()
    _plain_forwards(model, big, forwards)
    plain = time.perf_counter() - t0
    benchmark.pedantic(sb.metrics.deletion_insertion, args=(model, x, t, heat), kwargs={"batch_size": BATCH},
                       rounds=3, iterations=1)
    ratio = benchmark.stats.stats.mean / plain
    benchmark.extra_info.update({"plain_forward_s": plain, "forwards": forwards, "ratio_vs_plain": ratio})
    print(f"\ndeletion+insertion: {benchmark.stats.stats.mean:.2f}s, {forwards} plain forwards {plain:.2f}s, "
          f"ratio {ratio:.2f}")
