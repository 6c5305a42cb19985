"""Issue 4, targets 1 and 2: deletion + insertion, RISE and Score-CAM against the
naive and the best plain forward-pass limits of the same work.

Run: ``pytest benchmarks/test_bench_perturbation.py --benchmark-only -s``.

Each benchmark counts the forward passes its method needs (deletion + insertion:
B x (2 n + 1), the clean image shared; RISE: B x n_masks; Score-CAM: B x K + B,
K the layer's channels, plus the clean pass), builds the limits of that many
single-image passes (:class:`limits.PlainLimits`), and times ours and the limits
interleaved, round by round (after one warm-up call of ours; 2 to 5 rounds by
cost). Rows: ours / naive (target <= 0.85), ours / best
plain (target <= 1.10) and, for information, ours / torch.compile's steady state
(compile time reported apart). Work is kept small so the suite fits ~10 min on 2
CPU cores: 224 px models (resnet18, mobilenetv3_large_100, random init) on 1-2
images; the default synthetic models at their native 64 px on 1-4 images. Score-CAM
on the 224 px models uses an earlier, narrower layer (fewer channels = fewer
passes), on the synthetic models the default layer unless it has more than 256
channels; the per-pass efficiency is what is measured.
"""

from __future__ import annotations

import pytest
import torch
from limits import (
    DEVICE,
    INPUT_SIZE,
    PlainLimits,
    bench_inputs,
    bench_model,
    counted_call,
    forward_note,
    record,
    rounds_for,
    stage_profile,
    timed,
)

import saliencybench as sb
from saliencybench.methods.cam import layer_activations

MODELS = ["resnet18", "mobilenetv3_large_100", "synthetic-resnet", "synthetic-mobilenetv2", "synthetic-vgg"]
# per model: (images, steps) for deletion+insertion, (images, masks) for RISE, (images, layer) for Score-CAM
WORK = {
    "resnet18": {"di": (2, 16), "rise": (2, 32), "scorecam": (1, "layer1")},
    "mobilenetv3_large_100": {"di": (2, 16), "rise": (2, 32), "scorecam": (1, "blocks.2")},
    "synthetic-resnet": {"di": (4, 16), "rise": (4, 32), "scorecam": (1, "auto")},
    "synthetic-mobilenetv2": {"di": (4, 16), "rise": (4, 32), "scorecam": (1, "auto")},
    "synthetic-vgg": {"di": (4, 16), "rise": (4, 32), "scorecam": (1, "auto")},
}
MAX_CHANNELS = 256  # "auto": the default layer, or the last block with at most this many channels


def scorecam_layer(model, x, t, layer):
    """(layer, K): ``layer`` as given, or for "auto" the default layer when it has <= MAX_CHANNELS
    channels, else the last of ``model.blocks`` that has (the default models are redesigned often)."""
    candidates = [layer] if layer != "auto" else [None] + [
        f"blocks.{i}" for i in reversed(range(len(getattr(model, "blocks", []))))]
    with torch.inference_mode():
        for cand in candidates:
            k = layer_activations(model, x[:1], t[:1], cand, with_grads=False)[0].shape[1]
            if layer != "auto" or k <= MAX_CHANNELS:
                return cand, k
    return None, k




def _run(benchmark, name: str, measure: str, target_id: int, fn, forwards: int, example: torch.Tensor):
    """Time ``fn`` (ours) interleaved with the plain limits of ``forwards`` passes; record the rows."""
    model = bench_model(name)
    lim = PlainLimits(model, example, forwards)
    ours, counted = counted_call(fn, model)
    warm, _ = timed(ours)  # the first call pays one-time costs (allocations, layout changes)
    out = benchmark.pedantic(ours, setup=lim.round, rounds=rounds_for(warm), iterations=1)
    rows = lim.rows(measure, target_id, benchmark.stats.stats.min)
    note = forward_note(forwards, counted)
    for r in rows:
        r["note"] = "; ".join(n for n in (r["note"], note) if n)
    record(benchmark, rows, profile=lambda: stage_profile(fn, model, title=measure), limits=lim.result(),
           forwards=forwards, forwards_counted=counted.get("images"), model=name, size=INPUT_SIZE[name])
    return out


@pytest.mark.parametrize("name", MODELS)
def test_deletion_insertion(benchmark, name):
    model = bench_model(name)
    b, n = WORK[name]["di"]
    x, t, heat = bench_inputs(name, b)
    forwards = b * (2 * n + 1)  # n deletion + n insertion points, the clean image scored once

    def fn():
        return sb.metrics.deletion_insertion(model, x, t, heat, n_steps=n, batch_size=64)

    out = _run(benchmark, name, f"deletion+insertion, {name} {x.shape[-1]}px, {b} img x {n} steps", 1, fn,
               forwards, x[0])
    with torch.inference_mode():
        clean = model(x).softmax(1).gather(1, t[:, None])[:, 0].float()
    _, dele, xs = out["deletion"]
    _, ins, _ = out["insertion"]
    assert dele.shape == ins.shape == (b, n + 1) and xs[0] == 0 and xs[-1] == 1
    assert torch.allclose(dele[:, 0], clean, atol=1e-5) and torch.allclose(ins[:, -1], clean, atol=1e-5)
    assert torch.isfinite(dele).all() and torch.isfinite(ins).all()


@pytest.mark.parametrize("name", MODELS)
def test_rise(benchmark, name):
    model = bench_model(name)
    b, n_masks = WORK[name]["rise"]
    x, t, _ = bench_inputs(name, b)

    def fn():
        return sb.explain(model, x, t, "rise", n_masks=n_masks, batch_size=64)

    heat = _run(benchmark, name, f"RISE, {name} {x.shape[-1]}px, {b} img x {n_masks} masks", 2, fn,
                b * n_masks, x[0])
    assert heat.shape == (b, x.shape[-2], x.shape[-1]) and torch.isfinite(heat).all() and heat.min() >= 0


@pytest.mark.parametrize("name", MODELS)
def test_scorecam(benchmark, name):
    model = bench_model(name)
    b, layer = WORK[name]["scorecam"]
    x, t, _ = bench_inputs(name, b)
    layer, k = scorecam_layer(model, x, t, layer)

    def fn():
        return sb.explain(model, x, t, "scorecam", layer=layer, batch_size=64)

    where = layer or "forward_features"
    heat = _run(benchmark, name, f"Score-CAM, {name} {x.shape[-1]}px, {b} img, {where} (K={k})", 2, fn,
                b * k + b, x[0])
    assert heat.shape == (b, x.shape[-2], x.shape[-1]) and torch.isfinite(heat).all() and heat.min() >= 0
    assert DEVICE in str(heat.device)
