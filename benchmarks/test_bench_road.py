"""Issue 14: ROAD against Quantus ``ROAD`` on the same images, heatmaps and fractions.

Run: ``pytest benchmarks/test_bench_road.py --benchmark-only -s``.

Both sides run MoRF at 10, 20, ..., 90 % with noise 0.01 and track accuracy
(Quantus' only score), on random-init resnet18 at 224 px, the targets being the
clean predictions. Quantus 0.6 ranks a [B,1,H,W] map broadcast to the 3 channels,
so its indices run over 3*H*W values while its imputer indexes H*W pixels (an
IndexError on any RGB input); the benchmark, like the tests, bypasses that one
broadcast, so Quantus removes the same pixels as we do. Equality is asserted
first (noise 0: the same accuracy curve). Two kinds of maps: a smooth blob (as
CAMs give: the removed pixels form one region, the costliest systems) and
scattered uniform noise (as raw gradients give).

Rows: end to end (imputation and forwards; Quantus scores each percentage in
its own pass over the images, we batch all of them), and the imputation alone
(ours :func:`road_perturbations` vs Quantus' ``noisy_linear_imputation`` per
image and fraction on the same pixel sets). Target: >= 5x faster on CPU.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import quantus
import torch
from limits import DEVICE, SideBySide, bench_inputs, bench_model, record, rounds_for, row, stage_profile, \
    synced, timed
from quantus.functions.perturb_func import noisy_linear_imputation

rd = importlib.import_module("saliencybench.metrics.road")  # the package attribute `road` is the function

PERCENTAGES = [10, 20, 30, 40, 50, 60, 70, 80, 90]
FRACTIONS = [p / 100 for p in PERCENTAGES]
NAME, SIZE = "resnet18", 224


class _NoChannelBroadcast:
    """numpy without ``broadcast_to`` (see the module docstring): Quantus ranks pixels."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def broadcast_to(a, shape):
        return a


def _maps(kind: str, b: int, seed: int = 0) -> torch.Tensor:
    """Tie-free heatmaps Tensor[b,SIZE,SIZE]: one Gaussian blob per image, or uniform noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(b, SIZE, SIZE, generator=g)
    if kind == "scattered":
        return noise
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centres = torch.randint(SIZE // 4, 3 * SIZE // 4, (b, 2), generator=g)
    d2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * (SIZE / 6) ** 2)) + 1e-3 * noise


def _setup(b: int, kind: str, monkeypatch):
    model = bench_model(NAME)
    x, _, _ = bench_inputs(NAME, b)
    heat = _maps(kind, b).to(x.device)
    with torch.inference_mode():
        t = model(x).argmax(1)
    monkeypatch.setattr(importlib.import_module("quantus.metrics.faithfulness.road"), "np", _NoChannelBroadcast())
    return model, x, t, heat


@pytest.mark.parametrize("kind", ["blob", "scattered"])
def test_road_vs_quantus(benchmark, monkeypatch, kind):
    b = 2
    model, x, t, heat = _setup(b, kind, monkeypatch)
    args = dict(model=model, x_batch=x.cpu().numpy(), y_batch=t.cpu().numpy(), a_batch=heat[:, None].cpu().numpy(),
                channel_first=True, device=DEVICE)
    ref = quantus.ROAD(percentages=PERCENTAGES, noise=0.0, disable_warnings=True)(**args)
    ours0 = rd.road(model, x, t, heat, fractions=FRACTIONS, noise=0.0, score="accuracy")["morf"][1].mean(0)
    assert np.allclose(ours0.cpu().numpy(), [ref[p] for p in PERCENTAGES]), "ROAD accuracy differs from Quantus'"
    metric = quantus.ROAD(percentages=PERCENTAGES, noise=0.01, disable_warnings=True)
    side = SideBySide().add("quantus", lambda: metric(**args))
    ours = synced(lambda: rd.road(model, x, t, heat, fractions=FRACTIONS, noise=0.01, score="accuracy"))
    warm, _ = timed(ours)
    benchmark.pedantic(ours, setup=side.round, rounds=max(2, rounds_for(warm, cheap=10.0)), iterations=1)
    rows = [row(f"ROAD MoRF vs Quantus ROAD, {NAME} {SIZE}px, {b} img x 9 fractions, {kind} maps", 14,
                benchmark.stats.stats.min, "Quantus ROAD (same pixels, noise 0.01, accuracy)", side.best("quantus"),
                "road_vs_quantus", note=f"forwards: ours {b * 9} in one batch, Quantus 9 passes of {b}")]
    record(benchmark, rows, profile=lambda: stage_profile(ours, model, title=f"ROAD {kind}"))


@pytest.mark.parametrize("kind", ["blob", "scattered"])
def test_road_imputation_vs_quantus(benchmark, monkeypatch, kind):
    b = 1
    _, x, _, heat = _setup(b, kind, monkeypatch)
    order = torch.argsort(heat.flatten(1).cpu(), dim=1, descending=True).numpy()
    xs = x.double().cpu().numpy()
    sets = [[np.sort(order[i, :int(SIZE * SIZE * f)]) for f in FRACTIONS] for i in range(b)]

    def peer():
        return [[noisy_linear_imputation(xs[i], s, noise=0.01) for s in sets[i]] for i in range(b)]

    theirs = np.array([[noisy_linear_imputation(xs[i], s, noise=0.0) for s in sets[i]] for i in range(b)])
    mine = rd.road_perturbations(x.double(), heat, fractions=FRACTIONS, noise=0.0)["morf"]
    assert np.allclose(mine.cpu().numpy(), theirs, atol=1e-10), "imputed images differ from Quantus'"
    side = SideBySide().add("quantus", peer)
    ours = synced(lambda: rd.road_perturbations(x, heat, fractions=FRACTIONS, noise=0.01))
    warm, _ = timed(ours)
    benchmark.pedantic(ours, setup=side.round, rounds=max(2, rounds_for(warm, cheap=10.0)), iterations=1)
    rows = [row(f"ROAD imputation vs Quantus noisy_linear_imputation, {SIZE}px, {b} img x 9 fractions, {kind} maps",
                14, benchmark.stats.stats.min, "Quantus noisy_linear_imputation (same pixel sets)",
                side.best("quantus"), "road_vs_quantus", note="float64 solves on the CPU, both sides")]
    record(benchmark, rows)
