"""Issue 4, target 7: methods that share one forward and backward pass.

Run: ``pytest benchmarks/test_bench_sharing.py --benchmark-only -s``.

``saliencybench.explain_many(model, images, targets, methods)`` computes saliency,
Grad-CAM, Grad-CAM++, CAM and Guided Grad-CAM from shared passes; it must give
the same maps as separate :func:`saliencybench.explain` calls (asserted, 1e-5 of
the maximum) in less time than their sum (target: ratio < 1). The separate calls
are timed one by one, interleaved with ours, and summed. Until ``explain_many``
exists this benchmark fails (it does not skip).
"""

from __future__ import annotations

import pytest
import torch
from limits import (
    SideBySide,
    bench_inputs,
    bench_model,
    count_forwards,
    record,
    rounds_for,
    row,
    stage_profile,
    synced,
    timed,
)

import saliencybench as sb

METHODS = ["saliency", "gradcam", "gradcam_pp", "cam", "guided_gradcam"]


@pytest.mark.parametrize("name,b", [("resnet18", 4), ("synthetic-resnet", 16)], ids=["resnet18", "synthetic-resnet"])
def test_explain_many_vs_separate(benchmark, name, b):
    explain_many = getattr(sb, "explain_many", None)
    if explain_many is None:
        pytest.fail("saliencybench.explain_many does not exist yet (issue 4, target 7: the lead adds it); "
                    "this benchmark compares it with separate explain() calls")
    model = bench_model(name)
    x, t, _ = bench_inputs(name, b)

    def ours():
        return explain_many(model, x, t, METHODS)

    with count_forwards(model) as c_many:
        warm, many = timed(ours)
    separate = {}
    with count_forwards(model) as c_sep:
        for m in METHODS:
            separate[m] = sb.explain(model, x, t, m)
    assert set(many) >= set(METHODS), f"explain_many returned {sorted(many)}"
    for m in METHODS:
        ref = separate[m]
        assert many[m].shape == ref.shape, m
        err = float((many[m] - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        assert err <= 1e-5, f"{m}: explain_many differs from explain by {err:.3g} of the maximum"

    side = SideBySide()
    for m in METHODS:
        side.add(m, lambda m=m: sb.explain(model, x, t, m))
    benchmark.pedantic(synced(ours), setup=side.round, rounds=rounds_for(warm), iterations=1)
    total = sum(side.best(m) for m in METHODS)
    each = ", ".join(f"{m} {side.best(m):.3f}s" for m in METHODS)
    measure = f"explain_many({'+'.join(METHODS)}), {name} {x.shape[-1]}px, batch {b}"
    rows = [row(measure, 7, benchmark.stats.stats.min, "sum of separate explain() calls", total, "shared_vs_separate",
                note=f"images through the first conv: shared {c_many['images']}, separate {c_sep['images']}; {each}")]
    record(benchmark, rows, profile=lambda: stage_profile(ours, model, title=measure), model=name,
           separate_s={m: side.best(m) for m in METHODS})
    assert torch.isfinite(many["gradcam"]).all()
