"""Max-sensitivity against the plain gradient passes it needs (issue 14).

Run: ``pytest benchmarks/test_bench_robustness.py --benchmark-only -s``.

:func:`saliencybench.metrics.robustness.max_sensitivity` with the saliency method and
``n_samples`` perturbations explains the B x n perturbed images in one ``explain`` call (the
clean maps are the run's heatmaps, passed in as the metric's scorer does). Its only extra
work is drawing the noise and the norms. The reference is that one call alone:
``explain(model, the B x n images, "saliency")``, the same number of plain gradient passes
on the same images. Target: ours / reference <= 1.2, timed side by side, round by round
(each side's fastest round).
"""

from __future__ import annotations

import pytest
from limits import DEVICE, SideBySide, bench_inputs, bench_model, record, rounds_for, row, stage_profile, \
    synced, timed

import saliencybench as sb
from saliencybench.metrics.robustness import max_sensitivity, perturbations

N_SAMPLES = 10


@pytest.mark.parametrize("name,b", [("resnet18", 2), ("synthetic-resnet", 8)], ids=["resnet18", "synthetic-resnet"])
def test_max_sensitivity_vs_plain_gradient_passes(benchmark, name, b):
    model = bench_model(name)
    x, t, _ = bench_inputs(name, b)
    heat = sb.explain(model, x, t, "saliency")
    stacked = perturbations(x, N_SAMPLES, scale=0.02, seed=0)
    t_rep = t.repeat_interleave(N_SAMPLES)

    def ours():
        return max_sensitivity(model, x, t, "saliency", heat, n_samples=N_SAMPLES)

    def plain():
        return sb.explain(model, stacked, t_rep, "saliency")

    warm, values = timed(ours)
    assert values.shape == (b,) and (values > 0).all()
    side = SideBySide().add("plain", plain)
    benchmark.pedantic(synced(ours), setup=side.round, rounds=max(4, rounds_for(warm)), iterations=1)
    measure = f"max_sensitivity(saliency, n={N_SAMPLES}), {name} {x.shape[-1]}px, batch {b}"
    rows = [row(measure, 14, benchmark.stats.stats.min, f"explain(saliency) on the {b * N_SAMPLES} perturbed images",
                side.best("plain"), "robustness_vs_plain", note=f"device {DEVICE}")]
    record(benchmark, rows, profile=lambda: stage_profile(ours, model, title=measure), model=name)
