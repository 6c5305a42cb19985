"""Incremental occlusion, part 3: checking and running a plan.

:func:`plan_occlusion` builds a plan (:func:`~.planning.build_plan`) and checks it
against full forward passes on a probe; :func:`run_occlusion_plan` computes the
heatmaps from it, assembling each stage's crops in one gather from a clean pass's cached
activations; :func:`incremental_occlusion` is the method's path with every fallback to
full forward passes (:func:`~.profiling.occlusion_profile` times both ways per stage).
The method and its paper: :mod:`saliencybench.methods.incremental`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InvalidInputError, NotApplicableError
from ...modelutil import describe_error, fast_inference, fast_paths_enabled, runs_channels_last, target_score
from ..base import batch_slices, get_method
from ..windows import resolve_window, window_starts
from .planning import OcclusionPlan, WindowGroup, build_plan, chunk_size
from .tracing import _close

# Below this fraction of the convolution work of full forwards the plan is not worth it.
PLAN_COST_LIMIT = 0.9
# Below this many occluded images the plan's own forward passes are not worth it.
MIN_JOBS = 32


def plan_occlusion(model: nn.Module, images: torch.Tensor, *, window: int | None = None,
                   stride: int | None = None, max_flop_ratio: float | None = None) -> OcclusionPlan:
    """Plan incremental occlusion of Tensor[B,C,H,W] images with ``window``/``stride``.

    Splits the model and plans the crops (:func:`~.planning.build_plan`), and checks the plan on a
    random probe image: three windows (the first, the middle and the last) computed
    incrementally must match full forward passes. Raises :class:`NotApplicableError`
    naming the reason when any step fails, when no stage can run on crops, or when
    the plan's convolution work per window exceeds ``max_flop_ratio`` of a full pass.
    ``model`` must be in eval mode.
    """
    plan, probe = build_plan(model, images, window=window, stride=stride, max_flop_ratio=max_flop_ratio)
    with torch.no_grad():
        _check(model, plan, probe)
    return plan


def _check(model: nn.Module, plan: OcclusionPlan, probe: torch.Tensor) -> None:
    """Compare three windows computed incrementally with full forward passes of the probe:
    the first, the middle and the last window (of the first, the largest and the last
    group)."""
    dev = probe.device
    cache = clean_inputs(plan, probe)
    ours, iys, ixs = [], [], []
    groups = plan.groups
    picks = [(groups[0], [0] if len(groups) > 1 else [0, 1, 2]),
             (max(groups, key=lambda g: g.n_windows), [1]), (groups[-1], [2])][:1 if len(groups) == 1 else 3]
    for g, pick in picks:
        iy, ix = ([0, len(a) // 2, len(a) - 1] for a in (g.iy, g.ix))
        iy, ix = g.iy[[iy[i] for i in pick]].to(dev), g.ix[[ix[i] for i in pick]].to(dev)
        ours.append(_window_logits(plan, g, cache, torch.zeros(len(iy), dtype=torch.long, device=dev), iy, ix,
                                   baseline=0.0))
        iys.append(iy)
        ixs.append(ix)
    ours_t, iy, ix = torch.cat(ours), torch.cat(iys), torch.cat(ixs)
    (ylo, yhi), (xlo, xhi) = ((lo.to(dev), hi.to(dev)) for lo, hi in plan.windows)
    rows = torch.arange(probe.shape[-2], device=dev)
    cols = torch.arange(probe.shape[-1], device=dev)
    inside = (((rows >= ylo[iy, None]) & (rows < yhi[iy, None]))[:, :, None]
              & ((cols >= xlo[ix, None]) & (cols < xhi[ix, None]))[:, None, :])
    ref = model(torch.where(inside[:, None], torch.zeros((), dtype=probe.dtype, device=dev), probe))
    if not _close(ours_t, ref):
        err = float((ours_t - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        raise NotApplicableError(
            f"the incremental computation differs from full forward passes on a probe (relative error {err:.2g}); "
            "a stage is not the local, translation-equivariant function its trace suggests")


# ---- running the plan -----------------------------------------------------------------

def _flat(x: torch.Tensor) -> torch.Tensor:
    """Tensor[N,C,h,w] as a copy Tensor[N*h*w, C], one row per position (channels last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).clone()


def clean_inputs(plan: OcclusionPlan, images: torch.Tensor) -> list[torch.Tensor | None]:
    """For Tensor[G,C,H,W] images: per stage ``j = 0 .. len(stages)`` (the last: the head)
    its clean input flattened by :func:`_flat` where :meth:`OcclusionPlan.assembled`, else
    ``None``; then the clean logits Tensor[G,K]."""
    cache: list[torch.Tensor | None] = []
    x = images
    for j, st in enumerate(plan.stages):
        cache.append(_flat(x) if plan.assembled(j) else None)
        x = st(x)
    cache.append(_flat(x) if plan.assembled(len(plan.stages)) else None)
    cache.append(plan.head(x))
    return cache


@dataclass(frozen=True)
class _Patch:
    """Per window ``i``, the changed region ``[ylo, yhi) x [xlo, xhi)`` of a map, and where
    its new values lie: the value at ``(y, x)`` is row
    ``base + (y - oy) * row_step + (x - ox) * col_step`` of ``values``[P,C] (all LongTensor[n]
    but the steps; steps 0 point every position at one row, the occlusion baseline)."""

    values: torch.Tensor
    ylo: torch.Tensor
    yhi: torch.Tensor
    xlo: torch.Tensor
    xhi: torch.Tensor
    base: torch.Tensor
    oy: torch.Tensor
    ox: torch.Tensor
    row_step: int
    col_step: int


def _assemble(clean: torch.Tensor, hw: tuple[int, int], img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              patch: _Patch, channels_last: bool) -> torch.Tensor:
    """Crops Tensor[n,C,Lh,Lw] at ``rows``[n,Lh] x ``cols``[n,Lw] of the clean maps
    ``clean``[G*h*w,C] of images ``img``[n], with ``patch``'s values inside its changed
    regions; one gather, which leaves them in channels-last memory (kept where
    ``channels_last``: the model runs so, :func:`~saliencybench.modelutil.runs_channels_last`)."""
    h, w = hw
    inside = (((rows >= patch.ylo[:, None]) & (rows < patch.yhi[:, None]))[:, :, None]
              & ((cols >= patch.xlo[:, None]) & (cols < patch.xhi[:, None]))[:, None, :])
    at_clean = (img * (h * w))[:, None, None] + rows[:, :, None] * w + cols[:, None, :]
    at_patch = ((clean.shape[0] + patch.base)[:, None, None]
                + ((rows - patch.oy[:, None]) * patch.row_step)[:, :, None]
                + ((cols - patch.ox[:, None]) * patch.col_step)[:, None, :])
    idx = torch.where(inside, at_patch, at_clean)
    src = torch.cat([clean, patch.values])
    n, lh, lw = idx.shape
    crops = src.index_select(0, idx.flatten()).view(n, lh, lw, -1).permute(0, 3, 1, 2)
    return crops if channels_last else crops.contiguous()


class _Clock:
    """Adds the seconds since the previous tick to ``timings[part][kind]``; does nothing
    without ``timings``."""

    def __init__(self, timings: list[list[float]] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self.last = time.perf_counter()

    def tick(self, part: int, kind: int) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[part][kind] += now - self.last
        self.last = now


def _window_logits(plan: OcclusionPlan, group: WindowGroup, cache: list[torch.Tensor | None], img: torch.Tensor,
                   iy: torch.Tensor, ix: torch.Tensor, baseline: float,
                   timings: list[list[float]] | None = None) -> torch.Tensor:
    """Logits Tensor[n,K] of images ``img``[n] (indices into the cached images) occluded by
    the windows at grid positions ``(iy, ix)`` (all of ``group``), from :func:`clean_inputs`'
    ``cache``.

    ``timings`` (``[assemble, compute]`` seconds per stage and for the head), if given,
    accumulates where the time goes.
    """
    dev, n = img.device, len(img)
    cl = runs_channels_last(plan.model)
    (ylo, yhi), (xlo, xhi) = ((lo.to(dev)[i], hi.to(dev)[i]) for (lo, hi), i in zip(plan.windows, (iy, ix)))
    zero = torch.zeros(n, dtype=torch.long, device=dev)
    baseline_row = torch.full((1, plan.stages[0].in_shape[0]), baseline, dtype=_cache_dtype(cache), device=dev)
    patch = _Patch(baseline_row, ylo, yhi, xlo, xhi, zero, zero, zero, 0, 0)
    clock = _Clock(timings, dev)
    x: torch.Tensor | None = None  # the previous stage's full output, when it ran in full
    whole = False  # the previous stage ran the whole block of an opened block's two parts
    for j, st in enumerate([*plan.stages, None]):
        if whole:
            whole = False
            continue
        if group.assembled(j):
            if x is not None:  # back to crops after a full stage: its changed region is the patch
                ay, ax = group.axes[j - 1]  # type: ignore[misc]
                _, c, oh, ow = x.shape
                patch = _Patch(x.permute(0, 2, 3, 1).reshape(-1, c), ay.lo.to(dev)[iy], ay.hi.to(dev)[iy],
                               ax.lo.to(dev)[ix], ax.hi.to(dev)[ix], torch.arange(n, device=dev) * (oh * ow),
                               zero, zero, ow, 1)
            if j < len(plan.stages) and group.cropped[j]:
                ay, ax = group.axes[j]  # type: ignore[misc]
                y0, x0 = ay.start.to(dev)[iy], ax.start.to(dev)[ix]
                rows = y0[:, None] + torch.arange(ay.size, device=dev)
                cols = x0[:, None] + torch.arange(ax.size, device=dev)
                x = _assemble(cache[j], (ay.n_in, ax.n_in), img, rows, cols, patch, cl)  # type: ignore[arg-type]
                clock.tick(j, 0)
                out = st(x)
                clock.tick(j, 1)
                _, c, oh, ow = out.shape
                patch = _Patch(out.permute(0, 2, 3, 1).reshape(-1, c), ay.lo.to(dev)[iy], ay.hi.to(dev)[iy],
                               ax.lo.to(dev)[ix], ax.hi.to(dev)[ix], torch.arange(n, device=dev) * (oh * ow),
                               y0 // ay.stride, x0 // ax.stride, ow, 1)
                x = None
                continue
            shape = st.in_shape if st is not None else plan.stages[-1].out_shape
            h, w = shape[1:]
            rows = torch.arange(h, device=dev).expand(n, h)
            cols = torch.arange(w, device=dev).expand(n, w)
            x = _assemble(cache[j], (h, w), img, rows, cols, patch, cl)  # type: ignore[arg-type]
            clock.tick(j, 0)
        if st is not None and st.whole is not None and not group.cropped[j + 1]:
            x, whole = st.whole(x), True  # both parts in full: the block itself, without their concatenation
            if timings is not None:  # its time split between the parts by their work
                before = timings[j][1]
                clock.tick(j, 1)
                t, share = timings[j][1] - before, st.macs / max(1, st.macs + plan.stages[j + 1].macs)
                timings[j][1], timings[j + 1][1] = before + t * share, timings[j + 1][1] + t * (1 - share)
            continue
        x = st(x) if st is not None else plan.head(x)  # type: ignore[arg-type]
        clock.tick(j, 1)
    return x  # type: ignore[return-value]


def _cache_dtype(cache: list[torch.Tensor | None]) -> torch.dtype:
    """The dtype of the cached activations."""
    return next(t for t in cache if t is not None).dtype


def window_scores(plan: OcclusionPlan, images: torch.Tensor, targets: torch.Tensor, *, baseline: float = 0.0,
                  score: str = "logit", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean[B], occluded[B,ny,nx])`` target scores of Tensor[B,C,H,W] images, computed
    incrementally, group by group, :func:`chunk_size` occluded images at a time."""
    b = images.shape[0]
    dev = images.device
    ny, nx = len(plan.windows[0][0]), len(plan.windows[1][0])
    n_win = ny * nx
    chunk = chunk_size(plan, batch_size)
    clean = torch.empty(b, dtype=images.dtype, device=dev)
    occluded = torch.empty(b, ny, nx, dtype=images.dtype, device=dev)
    for gsl in batch_slices(b, max(1, chunk // n_win)):
        cache = clean_inputs(plan, images[gsl])
        clean[gsl] = target_score(cache[-1], targets[gsl], score)  # type: ignore[arg-type]
        for group in plan.groups:
            gy, gx = group.iy.to(dev), group.ix.to(dev)
            n_g = len(gy) * len(gx)
            g_chunk = chunk_size(plan, batch_size, group)
            for sl in batch_slices((gsl.stop - gsl.start) * n_g, g_chunk):
                job = torch.arange(sl.start, sl.stop, device=dev)
                img, win = job // n_g, job % n_g
                iy, ix = gy[win // len(gx)], gx[win % len(gx)]
                logits = _window_logits(plan, group, cache, img, iy, ix, baseline)
                occluded[gsl.start + img, iy, ix] = target_score(logits, targets[gsl][img], score)
    return clean, occluded


def run_occlusion_plan(plan: OcclusionPlan, images: torch.Tensor, targets: torch.Tensor, *, baseline: float = 0.0,
                       score: str = "logit", batch_size: int = 64) -> torch.Tensor:
    """Occlusion heatmaps Tensor[B,H,W] of the planned model, computed incrementally.

    The same windows and the same average as :func:`~.perturbation.occlusion`: each
    pixel gets the mean over the windows covering it of score(clean) - score(occluded).
    Like the full-forward loop, float32 runs with the weights and inputs channels_last
    where :func:`~saliencybench.modelutil.fast_inference` finds that safe.
    """
    _, _, h, w = images.shape
    dev = images.device
    with torch.no_grad(), fast_inference(plan.model, images, fold=False):
        clean, occluded = window_scores(plan, images, targets, baseline=baseline, score=score, batch_size=batch_size)
    delta = (clean[:, None, None] - occluded).float()
    (ylo, yhi), (xlo, xhi) = ((lo.to(dev), hi.to(dev)) for lo, hi in plan.windows)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    row_masks = ((rows[None] >= ylo[:, None]) & (rows[None] < yhi[:, None])).float()  # [ny,H]
    col_masks = ((cols[None] >= xlo[:, None]) & (cols[None] < xhi[:, None])).float()  # [nx,W]
    counts = row_masks.sum(0)[:, None] * col_masks.sum(0)[None, :]
    return torch.einsum("byx,yh,xw->bhw", delta, row_masks, col_masks) / counts


def incremental_occlusion(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                          window: int | None = None, stride: int | None = None, baseline: float = 0.0,
                          score: str = "logit", batch_size: int = 64, max_flop_ratio: float | None = PLAN_COST_LIMIT,
                          strict: bool = False) -> tuple[torch.Tensor, str]:
    """Occlusion heatmaps Tensor[B,H,W] computed incrementally where possible, and a note.

    The same numbers as :func:`~.perturbation.occlusion` (up to rounding). Falls back
    to full forward passes, saying why in the note, when the model cannot be split
    into local stages, when the plan needs more than ``max_flop_ratio`` of the
    convolution work of full forward passes, when there are fewer than ``MIN_JOBS``
    occluded images, or when the fast paths are off (:func:`~saliencybench.modelutil.fast_paths`).
    ``strict`` (``occlusion(incremental=True)``): none of these limits but the one given,
    and a plan that cannot be made raises :class:`NotApplicableError` instead. Either
    way any other failure of the incremental computation (an error in a stage, an
    operation the trace did not foresee) falls back to full forward passes with a note.
    ``model`` must be in eval mode (as :func:`~.base.explain` puts it).
    """
    b, _, h, w = images.shape
    window, stride = resolve_window(h, w, window, stride)
    n_jobs = b * len(window_starts(h, window, stride)) * len(window_starts(w, window, stride))

    def full(why: str) -> tuple[torch.Tensor, str]:
        with torch.no_grad():
            # The registered full-forward occlusion (:mod:`..perturbation`), looked up by name: that
            # module imports this one, not the other way round.
            heat = get_method("occlusion").fn(model, images, targets, window=window, stride=stride,
                                              baseline=baseline, score=score, batch_size=batch_size,
                                              incremental=False)
        return heat, f"full forward passes: {why}"

    if not strict and n_jobs < MIN_JOBS:
        return full(f"{n_jobs} occluded images are too few to pay for planning")
    if not strict and not fast_paths_enabled():
        return full("the fast paths are switched off (saliencybench.modelutil.fast_paths)")
    try:
        # Planned and run with the norms folded (the plan holds the modules it traced).
        with fast_inference(model, images):
            plan = plan_occlusion(model, images, window=window, stride=stride, max_flop_ratio=max_flop_ratio)
            heat = run_occlusion_plan(plan, images, targets, baseline=baseline, score=score, batch_size=batch_size)
        return heat, plan.note
    except InvalidInputError:
        raise
    except NotApplicableError as err:
        if strict:
            raise
        why = str(err)
    except Exception as err:  # noqa: BLE001 - an optimisation may only change the speed
        why = f"the incremental computation failed ({describe_error(err)})"
    return full(why)
