"""Incremental occlusion, part 2: the plan of crops per stage and window.

Per stage and axis, every window's changed output region follows from the previous
stage's (:func:`plan_axis`); window positions are bucketed by the work their regions
imply and each group (:class:`WindowGroup`) gets its own crop sizes; stages whose crops
would cost nearly the whole map run in full; :func:`chunk_size` sizes the batches of
windows by memory. :func:`build_plan` returns the unchecked
:class:`OcclusionPlan`; :func:`~.executing.plan_occlusion` checks it against full forward
passes. The method and its paper: :mod:`saliencybench.methods.incremental`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import NotApplicableError
from ..windows import resolve_window, window_starts
from .tracing import AxisGeometry, Geometry, Stage, open_blocks, split_stages, trace_stage

# A stage runs on crops only where a crop costs less than this fraction of the full map
# (a crop this large runs no faster than the map: gathers, halos, smaller batches).
CROP_COST_LIMIT = 0.8
# Windows are planned in this many buckets per axis (groups with their own crop sizes)
# when that saves more than ``GROUP_COST`` of the work per extra group (smaller batches).
MAX_BUCKETS = 3
GROUP_COST = 0.003
# Incremental batches hold up to this many times ``batch_size`` occluded images.
MAX_CHUNK_FACTOR = 4
# Whether timm BasicBlocks are split into their two convolutions (:func:`open_blocks`).
OPEN_BLOCKS = True


# ---- per-axis planning ----------------------------------------------------------------

@dataclass(frozen=True)
class AxisPlan:
    """One stage along one axis, for every window position along that axis.

    ``lo``/``hi``: the changed output region ``[lo, hi)`` of each window (LongTensor[n]);
    ``start``: where each window's crop of the stage input starts (a multiple of
    ``stride``); ``size``: the crop length, the same for all windows; ``n_in``/``n_out``:
    the stage's input and output lengths.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    start: torch.Tensor
    size: int
    stride: int
    n_in: int
    n_out: int

    @property
    def full(self) -> bool:
        return self.size >= self.n_in


def plan_axis(geometry: AxisGeometry, n_in: int, n_out: int, lo_in: Sequence[int],
              hi_in: Sequence[int]) -> AxisPlan:
    """Changed regions and crops of one stage along one axis, from the input's changed regions.

    Crops start at multiples of the stride, so crop output ``o'`` is full output
    ``o' + start / stride``. Interior crops reach ``size - padding`` past the region's
    last field, so that its outputs never read the crop's own padding; crops that would
    leave the map are shifted inward (the length keeps ``n_in - size`` a multiple of the
    stride, so shifted crops stay aligned), ending exactly at the true border, which is
    padded as in the full map.
    """
    s, k, p = geometry.stride, geometry.size, geometry.padding
    regions = [geometry.changed(lo, hi, n_out) for lo, hi in zip(lo_in, hi_in)]
    longest = max(1, max(hi - lo for lo, hi in regions))
    size = (-p) % s + (longest - 1) * s + k
    size = min(n_in, size + (n_in - size) % s)
    starts = [min(max(0, ((lo * s - p) // s) * s), n_in - size) for lo, _ in regions]
    for (lo, hi), a in zip(regions, starts):
        if hi > lo and not (a % s == 0 and (a == 0 or a <= lo * s - p)
                            and (a + size == n_in or (hi - 1) * s - p + k <= a + size)):
            raise NotApplicableError(f"internal error: crop [{a}, {a + size}) of {n_in} cannot give outputs "
                                     f"[{lo}, {hi}) exactly for geometry {geometry}")
    lo_t, hi_t = (torch.tensor(v, dtype=torch.long) for v in zip(*regions))
    return AxisPlan(lo_t, hi_t, torch.tensor(starts, dtype=torch.long), size, s, n_in, n_out)


def _area_fraction(geometry: Geometry, lo_hi: tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]],
                   out_hw: tuple[int, int]) -> float:
    """Mean over all windows (rows x columns) of the fraction of an output map they change."""
    fracs = []
    for n in range(2):
        regions = [geometry[n].changed(lo, hi, out_hw[n]) for lo, hi in lo_hi[n]]
        fracs.append(sum(hi - lo for lo, hi in regions) / (len(regions) * out_hw[n]))
    return fracs[0] * fracs[1]


# ---- the plan -------------------------------------------------------------------------

@dataclass
class WindowGroup:
    """The windows at grid rows ``iy`` x columns ``ix`` (LongTensors of positions), planned together.

    Stage ``j`` runs on crops for them where ``cropped[j]``, in full otherwise.
    ``axes[j] = (rows, columns)``: its changed output regions and crops per axis, indexed
    by grid position (``None`` once a non-local stage ends the tracking: it and every
    later stage run in full); a cropped stage's crop gives an output of size
    ``crop_out[j]`` and holds at most ``crop_numel[j]`` activations (input and largest
    output). ``stage_macs``: work per window of each stage as planned; ``full``: the
    stages tracked but run in full, with what a crop would cost.
    """

    iy: torch.Tensor
    ix: torch.Tensor
    cropped: list[bool]
    axes: list[tuple[AxisPlan, AxisPlan] | None]
    stage_macs: list[int]
    crop_out: list[tuple[int, int] | None]
    crop_numel: list[int]
    full: list[str]

    @property
    def n_windows(self) -> int:
        return len(self.iy) * len(self.ix)

    @property
    def macs(self) -> int:
        """Convolution work per window of this group (head excluded)."""
        return sum(self.stage_macs)

    def assembled(self, j: int) -> bool:
        """Whether stage ``j`` (``len(stages)``: the head) gathers its input from the clean
        cache: the first stage, a stage on crops, or one following a stage on crops."""
        return j == 0 or (j < len(self.cropped) and self.cropped[j]) or self.cropped[j - 1]


@dataclass
class OcclusionPlan:
    """Everything :func:`run_occlusion_plan` needs for one model, image size, window and stride.

    ``model``'s ``stages`` run (on crops or in full) as each of the window ``groups``
    plans, then ``head``. ``windows``: the occluded region of the image per axis,
    ``(lo, hi)`` LongTensors over the window positions. ``changed_fraction``: per
    stage, the mean fraction of its output a window changes; ``ideal_macs``: the work
    per window (mean) if every convolution computed exactly its changed region;
    ``note``: a summary.
    """

    model: nn.Module
    stages: list[Stage]
    head: Callable[[torch.Tensor], torch.Tensor]
    groups: list[WindowGroup]
    windows: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    window: int
    stride: int
    changed_fraction: list[float]
    ideal_macs: float
    note: str = ""

    @property
    def cropped(self) -> list[bool]:
        """Per stage, whether it runs on crops for any group."""
        return [any(g.cropped[j] for g in self.groups) for j in range(len(self.stages))]

    @property
    def n_crop(self) -> int:
        """One past the last stage on crops (for any group)."""
        return max((j + 1 for j, c in enumerate(self.cropped) if c), default=0)

    def assembled(self, j: int) -> bool:
        """Whether any group gathers stage ``j``'s input from the clean cache."""
        return any(g.assembled(j) for g in self.groups)

    @property
    def stage_macs(self) -> list[float]:
        """Per stage, its work per window as planned (mean over the windows)."""
        n = sum(g.n_windows for g in self.groups)
        return [sum(g.stage_macs[j] * g.n_windows for g in self.groups) / n for j in range(len(self.stages))]

    @property
    def full_macs(self) -> int:
        """Convolution work of one full forward pass (head excluded)."""
        return sum(s.macs for s in self.stages)

    @property
    def macs(self) -> float:
        """Convolution work per occluded image under this plan (mean; head excluded)."""
        return sum(self.stage_macs)

    @property
    def flop_ratio(self) -> float:
        """Work per occluded image relative to a full forward pass (convolutions)."""
        return self.macs / max(1, self.full_macs)

    @property
    def ideal_flop_ratio(self) -> float:
        """The same if every convolution computed exactly its changed region (Krypton's bound)."""
        return self.ideal_macs / max(1, self.full_macs)


def probe_image(images: torch.Tensor) -> torch.Tensor:
    """A seeded random image Tensor[1,C,H,W] like ``images``, on which plans are traced and checked."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *images.shape[1:], generator=g).to(images)


def build_plan(model: nn.Module, images: torch.Tensor, *, window: int | None = None, stride: int | None = None,
               max_flop_ratio: float | None = None) -> tuple[OcclusionPlan, torch.Tensor]:
    """The unchecked plan of incremental occlusion of Tensor[B,C,H,W] images, and the probe
    Tensor[1,C,H,W] it was traced on: splits the model (:func:`split_stages`, then
    :func:`open_blocks`) and plans the crops. Raises :class:`NotApplicableError` naming
    the reason when no split is found, when no stage can run on crops, or when the
    plan's convolution work per window exceeds ``max_flop_ratio`` of a full pass.
    ``model`` must be in eval mode."""
    _, _, h, w = images.shape
    window, stride = resolve_window(h, w, window, stride)
    probe = probe_image(images)
    with torch.no_grad():
        stages, head = split_stages(model, probe)
        if OPEN_BLOCKS:
            stages = open_blocks(stages, probe)
        plan = _plan(model, stages, head, h, w, window, stride, probe)
    if max_flop_ratio is not None and plan.flop_ratio > max_flop_ratio:
        raise NotApplicableError(f"the plan saves too little work ({plan.note})")
    return plan, probe


def _expand(ax: AxisPlan, idx: list[int], n: int) -> AxisPlan:
    """``ax`` planned for grid positions ``idx``, indexed by position ``0 .. n - 1`` (zeros elsewhere)."""
    def put(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, dtype=v.dtype)
        out[idx] = v
        return out

    return AxisPlan(put(ax.lo), put(ax.hi), put(ax.start), ax.size, ax.stride, ax.n_in, ax.n_out)


def _plan_group(stages: list[Stage], win: tuple[list[tuple[int, int]], list[tuple[int, int]]],
                iy: list[int], ix: list[int], probe: torch.Tensor,
                traces: dict[tuple[int, int, int], Any]) -> tuple[WindowGroup, str]:
    """The plan of the windows at grid rows ``iy`` x columns ``ix`` (``win``: every
    window's occluded region per axis), and the reason tracking stops, if it does.
    ``traces`` memoises the stages' traces on crops by size."""
    regions = ([win[0][i] for i in iy], [win[1][i] for i in ix])
    g = WindowGroup(torch.tensor(iy), torch.tensor(ix), [], [], [], [], [], [])
    stop = ""
    for st in stages:
        g.cropped.append(False)
        g.stage_macs.append(st.macs)
        g.crop_out.append(None)
        g.crop_numel.append(0)
        if st.geometry is None:
            stop = stop or f"{st.name} and later stages run in full: {st.reason}"
            regions = None
        if regions is None:
            g.axes.append(None)
            continue
        rows = plan_axis(st.geometry[0], st.in_shape[1], st.out_shape[1], *zip(*regions[0]))
        cols = plan_axis(st.geometry[1], st.in_shape[2], st.out_shape[2], *zip(*regions[1]))
        regions = (list(zip(rows.lo.tolist(), rows.hi.tolist())), list(zip(cols.lo.tolist(), cols.hi.tolist())))
        g.axes.append((_expand(rows, iy, len(win[0])), _expand(cols, ix, len(win[1]))))
        key = (id(st), rows.size, cols.size)
        if key not in traces:
            crop = torch.zeros(1, st.in_shape[0], rows.size, cols.size, dtype=probe.dtype, device=probe.device)
            y, _, convs = trace_stage(st.modules, crop)
            traces[key] = (crop.numel(), tuple(y.shape), convs)
        crop_numel, y_shape, convs = traces[key]
        macs = sum(c.macs for c in convs)
        if st.macs:
            cheaper = macs < CROP_COST_LIMIT * st.macs
        else:
            cheaper = rows.size * cols.size < st.in_shape[1] * st.in_shape[2]
        if rows.full and cols.full or not cheaper:
            g.full.append(f"{st.name} ({macs / max(1, st.macs):.0%})")
            continue
        for ax, n_crop_out in ((rows, y_shape[-2]), (cols, y_shape[-1])):
            if int((ax.hi - ax.start // ax.stride).max()) > n_crop_out:
                raise NotApplicableError(f"internal error: the crops of stage {st.name} give too few outputs")
        g.cropped[-1] = True
        g.stage_macs[-1] = macs
        g.crop_out[-1] = (y_shape[-2], y_shape[-1])
        g.crop_numel[-1] = crop_numel + max([c.numel for c in convs] + [math.prod(y_shape[1:])])
    return g, stop


def _buckets(stages: list[Stage], g: WindowGroup, axis: int, n: int) -> list[list[int]]:
    """The grid positions along ``axis`` in ``n`` buckets of positions with similar work:
    sorted by the convolution work their changed regions imply (``g`` plans all windows)."""
    n_pos = len(g.iy if axis == 0 else g.ix)
    work = [0.0] * n_pos
    for st, axes in zip(stages, g.axes):
        if axes is not None:
            ax = axes[axis]
            for i, (lo, hi) in enumerate(zip(ax.lo.tolist(), ax.hi.tolist())):
                work[i] += st.macs * (hi - lo) / ax.n_out
    order = sorted(range(n_pos), key=lambda i: (work[i], i))
    cuts = [round(k * n_pos / n) for k in range(n + 1)]
    return [sorted(order[a:b]) for a, b in itertools.pairwise(cuts) if b > a]


def _plan(model: nn.Module, stages: list[Stage], head: Callable[[torch.Tensor], torch.Tensor], h: int, w: int,
          window: int, stride: int, probe: torch.Tensor) -> OcclusionPlan:
    ys, xs = window_starts(h, window, stride).tolist(), window_starts(w, window, stride).tolist()
    win = ([(y, min(y + window, h)) for y in ys], [(x, min(x + window, w)) for x in xs])
    # Changed fractions and the ideal work, over all windows.
    regions = win
    ideal, changed_fraction = 0.0, []
    for st in stages:
        if st.geometry is None or regions is None:
            ideal += sum(c.macs * (1.0 if c.geometry is None else _area_fraction(c.geometry, regions, c.out_hw))
                         for c in st.convs) if regions is not None else st.macs
            regions = None
            changed_fraction.append(1.0)
            continue
        ideal += sum(c.macs * _area_fraction(c.geometry, regions, c.out_hw) for c in st.convs)  # type: ignore[arg-type]
        changed_fraction.append(_area_fraction(st.geometry, regions, st.out_shape[1:]))
        regions = tuple([st.geometry[n].changed(lo, hi, st.out_shape[1 + n]) for lo, hi in regions[n]]
                        for n in range(2))  # type: ignore[assignment]
    # One group of all windows, or MAX_BUCKETS x MAX_BUCKETS buckets of rows x columns with
    # their own crop sizes (windows near a border change less of the deep maps), whichever
    # plans less work, counting GROUP_COST per extra group.
    traces: dict[tuple[int, int, int], Any] = {}
    one, stop = _plan_group(stages, win, list(range(len(ys))), list(range(len(xs))), probe, traces)
    best, best_cost = [one], one.macs
    n = min(MAX_BUCKETS, len(ys), len(xs))
    if n > 1:
        groups = [_plan_group(stages, win, rows, cols, probe, traces)[0]
                  for rows in _buckets(stages, one, 0, n) for cols in _buckets(stages, one, 1, n)]
        cost = sum(g.macs * g.n_windows for g in groups) / one.n_windows * (1 + GROUP_COST * (len(groups) - 1))
        if cost < best_cost:
            best = groups
    if not any(any(g.cropped) for g in best):
        raise NotApplicableError(f"no stage can run on crops ({stop or 'the model has no stages'})")
    windows = tuple((torch.tensor([a for a, _ in r]), torch.tensor([b for _, b in r])) for r in win)
    plan = OcclusionPlan(model, stages, head, best, windows, window, stride,  # type: ignore[arg-type]
                         changed_fraction, ideal)
    cropped = plan.cropped
    first, last = cropped.index(True), plan.n_crop - 1
    big = max(best, key=lambda g: (g.n_windows, g.macs))
    note = (f"incremental: {sum(cropped)} of {len(stages)} stages on crops ({stages[first].name} ... "
            f"{stages[last].name})")
    if len(best) > 1:
        note += f" in {len(best)} groups of windows with their own crop sizes"
    if big.full:
        note += f"; in full where a crop would cost >= {CROP_COST_LIMIT:.0%} of the map: {', '.join(big.full)}"
    note += f"; {stop}" if stop else ""
    plan.note = f"{note}; convolution work {plan.flop_ratio:.0%} of full forwards (ideal {plan.ideal_flop_ratio:.0%})"
    return plan


def chunk_size(plan: OcclusionPlan, batch_size: int, group: WindowGroup | None = None) -> int:
    """Occluded images per incremental batch (of ``group``; by default the largest):
    ``batch_size`` times as many windows as fit, activation for activation, in the memory
    of one full forward pass, at most ``MAX_CHUNK_FACTOR`` times. Small crops run faster
    in larger batches (about 1.4x from 64 to 256 windows for resnet18 at 224 px on 2
    busy CPU cores), and one window's activations are several times smaller than a full
    pass's."""
    def peak(st: Stage) -> int:
        return math.prod(st.in_shape) + max([c.numel for c in st.convs] + [math.prod(st.out_shape)])

    g = group or max(plan.groups, key=lambda g: g.n_windows)
    full = max(peak(st) for st in plan.stages)
    incremental = max(n if c else peak(st) for st, c, n in zip(plan.stages, g.cropped, g.crop_numel))
    return batch_size * max(1, min(MAX_CHUNK_FACTOR, full // incremental))
