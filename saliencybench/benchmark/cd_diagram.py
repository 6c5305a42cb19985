"""Critical-difference diagram (Demsar, Statistical Comparisons of Classifiers over Multiple Data
Sets, JMLR 2006, Fig. 1-2) of one criterion of :func:`saliencybench.benchmark.ranking.across_models`.

Layout: an axis of mean ranks 1..k (best on the left) with integer ticks; above it, a bar of length
CD (the Nemenyi critical difference) from rank 1 with its value; each method a tick on the axis and
an elbow line to its label ``name (mean rank)``: the better half on the left, nearest the axis the
best, the worse half on the right, nearest the axis the worst, each label on its own row, so labels
never overlap whatever their length (the figure grows to fit them); below the axis, one thick bar per
group of methods the test did not separate (the group letters of the table: a maximal run of
methods spanning less than CD, or all methods when the Friedman test did not reject). The title gives
the criterion, N (blocks) and k (methods) and the Friedman p.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import InvalidInputError

FONT = 9.0
ROW_IN = FONT * 2.0 / 72  # inches per label row


def _text_in(s: str, size: float) -> float:
    """A generous estimate of the width of ``s`` in inches at ``size`` points."""
    return 0.62 * size / 72 * len(s) + 0.1


def cd_diagram(across: pd.DataFrame, criterion: str = "overall", *, width: float = 7.0) -> Figure:
    """The CD diagram of ``criterion`` from an :func:`across_models` table: a matplotlib Figure
    (no pyplot state) ``width`` inches wide at least, as tall as its label rows need."""
    need = {"method", "criterion", "mean_rank", "group", "cd", "k", "n_blocks", "friedman_p"}
    if not need <= set(across.columns):
        raise InvalidInputError(f"cd_diagram needs an across_models table; missing {sorted(need - set(across.columns))}")
    t = across[(across.criterion == criterion) & across.mean_rank.notna()].sort_values(["mean_rank", "method"])
    if t.empty:
        raise InvalidInputError(f"no ranked methods for criterion {criterion!r}; have {sorted(set(across.criterion))}")
    names, ranks = list(t.method), t.mean_rank.to_numpy(float)
    k, n, cd, p = len(names), int(t.n_blocks.iloc[0]), float(t.cd.iloc[0]), float(t.friedman_p.iloc[0])
    hi = max(k, 2)
    labels = [f"{m} ({r:.2f})" for m, r in zip(names, ranks)]
    n_left = math.ceil(k / 2)
    left, right = list(range(n_left)), list(range(k - 1, n_left - 1, -1))  # nearest the axis first
    col_in = max(_text_in(s, FONT) for s in labels) + 0.15
    span_in = max(width - 2 * col_in, 2.5, 0.35 * (hi - 1))
    fig_w = span_in + 2 * col_in
    per_in = (hi - 1) / span_in  # rank units per inch
    x0, x1 = 1 - col_in * per_in, hi + col_in * per_in
    letters = sorted({c for g in t.group for c in str(g)})
    bars = [[i for i, g in enumerate(t.group) if c in str(g)] for c in letters]
    bars = [b for b in bars if len(b) > 1]
    y_bar0, bar_step = -0.6, 0.45
    y_rows0 = y_bar0 - bar_step * len(bars) - 0.4
    n_rows = max(len(left), len(right))
    y_min, y_max = y_rows0 - n_rows + 0.4, 4.0
    fig = Figure(figsize=(fig_w, (y_max - y_min) * ROW_IN))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y_min, y_max)
    ax.set_axis_off()
    ax.plot([1, hi], [0, 0], color="k", lw=1)
    step = max(1, math.ceil(_text_in(str(hi), FONT - 1) * per_in / 0.8))
    for r in range(1, hi + 1):
        ax.plot([r, r], [0, 0.2], color="k", lw=1)
        if (r - 1) % step == 0:
            ax.text(r, 0.35, str(r), ha="center", va="bottom", fontsize=FONT - 1)
    if np.isfinite(cd):
        ax.plot([1, 1 + cd], [1.6, 1.6], color="k", lw=1.5)
        ax.plot([1, 1], [1.45, 1.75], color="k", lw=1)
        ax.plot([1 + cd, 1 + cd], [1.45, 1.75], color="k", lw=1)
        ax.text(1, 2.0, f"CD = {cd:.2f}", ha="left", va="bottom", fontsize=FONT - 1)
    for j, members in enumerate(bars):
        y = y_bar0 - bar_step * j
        ax.plot([ranks[members[0]] - 0.05, ranks[members[-1]] + 0.05], [y, y], color="k", lw=3,
                solid_capstyle="butt")
    for side, idx in (("left", left), ("right", right)):
        for row, i in enumerate(idx):
            y = y_rows0 - row
            xe = 1 - 0.15 * per_in if side == "left" else hi + 0.15 * per_in
            ax.plot([ranks[i], ranks[i], xe], [0, y, y], color="0.3", lw=0.8)
            ax.plot([ranks[i]], [0], marker="o", color="k", ms=3)
            ax.text(xe - 0.05 * per_in if side == "left" else xe + 0.05 * per_in, y, labels[i],
                    ha="right" if side == "left" else "left", va="center", fontsize=FONT)
    fp = f", Friedman p = {p:.3g}" if np.isfinite(p) else ", no Friedman test"
    ax.text((x0 + x1) / 2, 3.0, f"{criterion}: N = {n} blocks, k = {k} methods{fp}", ha="center", va="bottom",
            fontsize=FONT + 1)
    return fig
