"""Incremental occlusion, part 4: where the time goes, stage by stage, incremental vs full.

:func:`occlusion_profile` times the plan's stages both ways on one image's windows (as
:func:`~.executing.run_occlusion_plan` and full forward passes run them);
:func:`format_profile` prints it. The method and its paper: :mod:`saliencybench.methods.incremental`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...modelutil import fast_inference
from .executing import _Clock, _window_logits, clean_inputs, plan_occlusion
from .planning import chunk_size


def _spread(n_windows: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` window indices (repeating when ``n > n_windows``) spread evenly over ``range(n_windows)``."""
    return (torch.arange(n, device=device) * n_windows // n) % n_windows


def occlusion_profile(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, window: int | None = None,
                      stride: int | None = None, baseline: float = 0.0, batch_size: int = 64,
                      repeats: int = 3) -> dict[str, Any]:
    """Per-stage time and work of incremental vs full-forward occlusion (``model`` in eval mode).

    Times windows of image 0 as each way runs them: ``batch_size`` full forward passes
    spread evenly over the window grid (an opened block runs whole, its time split
    between its two stages by their work), and incrementally each window group's
    windows in one batch (at most :func:`chunk_size`), weighted by the group's share;
    ``repeats`` times, keeping each part's minimum. Returns a dict: ``stages``, one
    entry per stage and the head with its ``mode`` (``crop``, ``full``, or ``part``
    when it runs on crops for the ``cropped_windows`` fraction of the windows), output
    ``map`` size, input ``crop`` size (of the largest group on crops), the mean
    fraction of its output map a window changes (``changed``) and the fraction the plan
    computes (``computed``),
    convolution MACs per window both ways, and milliseconds per window: ``ms_full``,
    ``ms_incremental`` (of which ``ms_assemble`` gathering the crops); the totals
    ``ms_full``, ``ms_incremental`` and ``speedup``; the batch sizes; ``flop_ratio``
    and ``ideal_flop_ratio`` (convolution work per window relative to a full pass, as
    planned and if every convolution computed exactly its changed region); the number
    of ``groups``; the plan's ``note``.
    """
    with torch.no_grad(), fast_inference(model, images):  # both ways with the norms folded, as they run
        return _occlusion_profile(model, images, targets, window, stride, baseline, batch_size, repeats)


def _occlusion_profile(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, window: int | None,
                       stride: int | None, baseline: float, batch_size: int, repeats: int) -> dict[str, Any]:
    plan = plan_occlusion(model, images, window=window, stride=stride)
    dev = images.device
    ny, nx = len(plan.windows[0][0]), len(plan.windows[1][0])
    chunk = chunk_size(plan, batch_size)
    win = _spread(ny * nx, batch_size, dev)
    iy, ix = win // nx, win % nx
    (ylo, yhi), (xlo, xhi) = ((lo.to(dev)[i], hi.to(dev)[i]) for (lo, hi), i in zip(plan.windows, (iy, ix)))
    rows, cols = torch.arange(images.shape[-2], device=dev), torch.arange(images.shape[-1], device=dev)
    inside = (((rows >= ylo[:, None]) & (rows < yhi[:, None]))[:, :, None]
              & ((cols >= xlo[:, None]) & (cols < xhi[:, None]))[:, None, :])
    occluded = torch.where(inside[:, None], torch.as_tensor(baseline, dtype=images.dtype, device=dev), images[:1])
    parts = len(plan.stages) + 1
    total = sum(g.n_windows for g in plan.groups)
    full_t = [[math.inf] * 2 for _ in range(parts)]
    inc_t = [[[math.inf] * 2 for _ in range(parts)] for _ in plan.groups]
    with torch.no_grad(), fast_inference(model, images, fold=False) as fmt:  # the enclosing block's format
        cache = clean_inputs(plan, images[:1])
        for _ in range(repeats):
            times = [[0.0, 0.0] for _ in range(parts)]
            clock = _Clock(times, dev)
            x = fmt(occluded)
            for j, st in enumerate(plan.stages):
                if j and plan.stages[j - 1].whole is not None:
                    continue
                x = st(x) if st.whole is None else st.whole(x)
                clock.tick(j, 1)
                if st.whole is not None:  # an opened block runs whole; its time is split by work
                    t, share = times[j][1], st.macs / max(1, st.macs + plan.stages[j + 1].macs)
                    times[j][1], times[j + 1][1] = t * share, t * (1 - share)
            plan.head(x)
            clock.tick(parts - 1, 1)
            full_t = [[min(a, b) for a, b in zip(p, q)] for p, q in zip(full_t, times)]
            for k, g in enumerate(plan.groups):
                # Each group's windows in one batch, as they run for one image.
                n = min(chunk_size(plan, batch_size, g), g.n_windows)
                win = _spread(g.n_windows, n, dev)
                times = [[0.0, 0.0] for _ in range(parts)]
                _window_logits(plan, g, cache, torch.zeros_like(win), g.iy.to(dev)[win // len(g.ix)],
                               g.ix.to(dev)[win % len(g.ix)], baseline, times)
                inc_t[k] = [[min(a, b / n) for a, b in zip(p, q)] for p, q in zip(inc_t[k], times)]
    full_ms = [1e3 * t[1] / batch_size for t in full_t]
    inc_ms = [[1e3 * sum(inc_t[k][j][m] * g.n_windows for k, g in enumerate(plan.groups)) / total for m in range(2)]
              for j in range(parts)]
    entries = []
    for j, st in enumerate(plan.stages):
        n_crop = sum(g.n_windows for g in plan.groups if g.cropped[j])
        big = max((g for g in plan.groups if g.cropped[j]), key=lambda g: g.n_windows, default=None)
        computed = sum((g.crop_out[j][0] * g.crop_out[j][1] / (st.out_shape[1] * st.out_shape[2])  # type: ignore[index]
                        if g.cropped[j] else 1.0) * g.n_windows for g in plan.groups) / total
        entries.append({
            "stage": st.name, "mode": "full" if big is None else "crop" if n_crop == total else "part",
            "cropped_windows": n_crop / total, "map": list(st.out_shape[1:]),
            "crop": [big.axes[j][0].size, big.axes[j][1].size] if big else list(st.in_shape[1:]),  # type: ignore[index]
            "changed": plan.changed_fraction[j], "computed": min(1.0, computed),
            "macs_full": st.macs, "macs_incremental": plan.stage_macs[j],
            "ms_full": full_ms[j], "ms_incremental": sum(inc_ms[j]), "ms_assemble": inc_ms[j][0],
        })
    entries.append({"stage": "head", "mode": "full", "ms_full": full_ms[-1], "ms_incremental": sum(inc_ms[-1]),
                    "ms_assemble": inc_ms[-1][0]})
    total_full, total_inc = sum(full_ms), sum(sum(t) for t in inc_ms)
    batch = min(chunk, max(g.n_windows for g in plan.groups))
    return {"stages": entries, "batch_full": batch_size, "batch_incremental": batch, "ms_full": total_full,
            "ms_incremental": total_inc, "speedup": total_full / total_inc, "flop_ratio": plan.flop_ratio,
            "ideal_flop_ratio": plan.ideal_flop_ratio, "groups": len(plan.groups), "note": plan.note}


def format_profile(profile: dict[str, Any]) -> str:
    """A plain-text table of :func:`occlusion_profile`'s result (times in ms per window)."""
    lines = [(f"{'stage':24} {'mode':4} {'map':>7} {'crop':>7} {'changed':>7} {'computed':>8} {'MMAC full':>9} "
              f"{'MMAC inc':>8} {'ms full':>7} {'ms inc':>7} {'gather':>7}")]
    for e in profile["stages"]:
        shape = {k: "x".join(map(str, e[k])) if k in e else "" for k in ("map", "crop")}
        work = f"{'':7} {'':8} {'':9} {'':8}"
        if "changed" in e:
            work = (f"{e['changed']:7.2f} {e['computed']:8.2f} {e['macs_full'] / 1e6:9.1f} "
                    f"{e['macs_incremental'] / 1e6:8.1f}")
        lines.append(f"{e['stage'][:24]:24} {e['mode']:4} {shape['map']:>7} {shape['crop']:>7} {work} "
                     f"{e['ms_full']:7.2f} {e['ms_incremental']:7.2f} {e['ms_assemble']:7.2f}")
    lines.append(f"per window: full {profile['ms_full']:.2f} ms (batches of {profile['batch_full']}), incremental "
                 f"{profile['ms_incremental']:.2f} ms (batches of {profile['batch_incremental']}), speedup "
                 f"{profile['speedup']:.2f}x; convolution work {profile['flop_ratio']:.2f} of full (bound "
                 f"{1 / profile['flop_ratio']:.2f}x), ideal {profile['ideal_flop_ratio']:.2f} (bound "
                 f"{1 / profile['ideal_flop_ratio']:.2f}x)")
    return "\n".join(lines)
