"""Incremental (Krypton-style) occlusion against full forward passes: resnet18, 224 px, window 16, stride 8.

Run: ``pytest benchmarks/ --benchmark-only``. The incremental heatmap is first checked
equal to the full one (1e-4 relative to its largest value). Both run in this one
process on the same model, image and batch size, in interleaved rounds (the best of
each kept); stored in the benchmark's ``extra_info`` and printed: the time of
full-forward occlusion (as ``occlusion(incremental=False)`` runs it, channels_last in
float32, and in the plain NCHW layout of the earlier implementation), the speedups,
the convolution-work ratios of the plan and of the ideal (every convolution computing
exactly its changed region), and a per-stage profile
(:func:`saliencybench.methods.incremental.occlusion_profile`) that says where the
time goes.
"""

from __future__ import annotations

import time

import timm
import torch
from torch import nn

from saliencybench.methods.incremental import format_profile, incremental_occlusion, occlusion_profile
from saliencybench.methods.perturbation import occlusion, window_starts
from saliencybench.modelutil import target_score

SIZE, WINDOW, STRIDE, IMAGES, BATCH, ROUNDS = 224, 16, 8, 1, 64, 2


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    # timm zero-initialises each block's last norm, which makes every residual branch
    # vanish; random norm statistics and scales (as in tests/conftest.py) bring them back.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    x = torch.randn(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.arange(IMAGES) % 10
    return model, x, t


def _full_nchw(model, x, t):
    """The full-forward loop of the earlier occlusion, in the default NCHW layout: per-window scores."""
    ys = window_starts(SIZE, WINDOW, STRIDE)
    rows = torch.arange(SIZE)
    masks = (rows[None] >= ys[:, None]) & (rows[None] < ys[:, None] + WINDOW)
    n = len(ys)
    scores = []
    for img in range(x.shape[0]):
        for s in range(0, n * n, BATCH):
            win = torch.arange(s, min(s + BATCH, n * n))
            mask = masks[win // n][:, :, None] & masks[win % n][:, None, :]
            occluded = torch.where(mask[:, None], torch.zeros(()), x[img])
            scores.append(target_score(model(occluded), t[img].repeat(len(win))))
    return torch.cat(scores)


def test_incremental_occlusion_vs_full(benchmark):
    model, x, t = _setup()
    kw = {"window": WINDOW, "stride": STRIDE, "batch_size": BATCH}
    full_s: dict[str, list[float]] = {"full": [], "nchw": []}

    def time_full() -> None:
        # Before each incremental round, so that both ways share the machine's load of the moment.
        t0 = time.perf_counter()
        occlusion(model, x, t, incremental=False, **kw)
        full_s["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _full_nchw(model, x, t)
        full_s["nchw"].append(time.perf_counter() - t0)

    with torch.inference_mode():
        full = occlusion(model, x, t, incremental=False, **kw)
        ours, note = incremental_occlusion(model, x, t, **kw)
        err = float((ours - full).abs().max() / full.abs().max())
        assert note.startswith("incremental:"), note
        assert err < 1e-4, f"incremental differs from full occlusion: max relative error {err:.2g}"
        benchmark.pedantic(incremental_occlusion, args=(model, x, t), kwargs=kw, setup=time_full, rounds=ROUNDS,
                           iterations=1)
        profile = occlusion_profile(model, x, t, window=WINDOW, stride=STRIDE, batch_size=BATCH, repeats=3)
    t_inc, t_full, t_nchw = benchmark.stats.stats.min, min(full_s["full"]), min(full_s["nchw"])
    benchmark.extra_info.update({
        "full_s": t_full, "full_nchw_s": t_nchw, "incremental_s": t_inc, "speedup": t_full / t_inc,
        "speedup_vs_nchw": t_nchw / t_inc, "max_relative_error": err, "flop_ratio": profile["flop_ratio"],
        "ideal_flop_ratio": profile["ideal_flop_ratio"], "note": note, "profile": profile["stages"],
        "profile_speedup": profile["speedup"], "profile_ms_full": profile["ms_full"],
        "profile_ms_incremental": profile["ms_incremental"],
        "bound": (f"an exact plan needs at least {profile['ideal_flop_ratio']:.0%} of the convolution work of full "
                  f"forwards (every convolution computing exactly the region a window changes): "
                  f"{1 / profile['ideal_flop_ratio']:.1f}x at equal speed per multiply-add; "
                  + "; ".join(f"{e['stage']} changes {e['changed']:.0%} of its map" for e in profile["stages"]
                              if str(e["stage"]).startswith("layer4"))),
    })
    print(f"\nocclusion resnet18 {SIZE}px window {WINDOW} stride {STRIDE}, {IMAGES} image(s), batch {BATCH}, "
          f"best of {ROUNDS} interleaved rounds: full {t_full:.2f}s (NCHW {t_nchw:.2f}s), incremental {t_inc:.2f}s: "
          f"speedup {t_full / t_inc:.2f}x ({t_nchw / t_inc:.2f}x vs NCHW); convolution work "
          f"{profile['flop_ratio']:.2f} of full (ideal {profile['ideal_flop_ratio']:.2f}); max relative error "
          f"{err:.1e}\n{note}\n{format_profile(profile)}")
