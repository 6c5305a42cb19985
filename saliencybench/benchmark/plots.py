"""Seaborn figures of a run (PNG and SVG): metric bars with confidence intervals,
mean deletion/insertion curves, a gallery with ground-truth boxes, sanity-check
curves and the rank agreement (Kendall tau) between metrics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from ..metrics.base import METRICS, output_spec  # noqa: E402
from .leaderboard import summary  # noqa: E402


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def metric_bars(rows: pd.DataFrame, out: Path) -> list[Path]:
    """One bar plot per image-level metric in the rows: method means per model with 95% bootstrap CIs."""
    paths = []
    for metric in sorted(set(rows.metric) & set(METRICS.names())) if not rows.empty else []:
        spec = METRICS.get(metric)
        d = rows[(rows.metric == metric)].dropna(subset=["value"])
        if d.empty or spec.level != "image":
            continue
        order = d.groupby("method").value.mean().sort_values(ascending=not spec.higher_is_better).index
        fig, ax = plt.subplots(figsize=(9, 4))
        sns.barplot(data=d, x="method", y="value", hue="model", order=order, errorbar=("ci", 95), n_boot=1000,
                    seed=0, ax=ax)
        ax.set(title=f"{metric} ({spec.direction()})", xlabel="", ylabel=metric)
        ax.tick_params(axis="x", rotation=45)
        paths += _save(fig, out, f"bar_{metric}")
    return paths


def perturbation_curves(rows: pd.DataFrame, out: Path) -> list[Path]:
    """Mean curves per method, one panel per (model, metric), for every metric that returns curves."""
    curve_metrics = [n for n, s in METRICS.entries.items() if "curve" in s.columns]
    d = rows[rows.metric.isin(curve_metrics)].dropna(subset=["value"]) if not rows.empty else rows
    if d.empty or "curve" not in d:
        return []
    recs = []
    for r in d.dropna(subset=["curve"]).itertuples():
        ys = json.loads(r.curve)
        xs = np.linspace(0, 1, len(ys))
        recs += [{"model": r.model, "method": r.method, "metric": r.metric, "fraction": x, "score": y}
                 for x, y in zip(xs, ys)]
    if not recs:
        return []
    c = pd.DataFrame(recs)
    g = sns.relplot(data=c, x="fraction", y="score", hue="method", col="metric", row="model", kind="line",
                    errorbar=None, height=2.6, aspect=1.4, facet_kws={"sharey": False})
    g.set_axis_labels("fraction of pixels changed", "target score")
    return _save(g.figure, out, "curves")


def sanity_curves(rows: pd.DataFrame, out: Path) -> list[Path]:
    """Similarity to the original heatmaps as blocks are randomised (metrics with per-stage outputs)."""
    if rows.empty or "stage" not in rows:
        return []
    d = rows[rows.metric.map(lambda m: (s := output_spec(m)) is not None and m in s.outputs) & rows.stage.notna()]
    if d.empty:
        return []
    g = sns.relplot(data=d, x="stage", y="value", hue="method", col="metric", row="model", kind="line",
                    errorbar=("ci", 95), n_boot=200, seed=0, height=2.6, aspect=1.3)
    g.set_axis_labels("blocks randomised (output first)", "similarity")
    return _save(g.figure, out, "per_stage_similarity")


def rank_agreement(rows: pd.DataFrame, out: Path) -> tuple[list[Path], pd.DataFrame]:
    """Kendall tau between metrics of the methods' orderings (each in its better direction),
    averaged over models. Returns the figure paths and the matrix."""
    s = summary(rows, n_boot=10)
    s = s[s.ranked].dropna(subset=["score"])
    metrics = sorted(s.metric.unique())
    if len(metrics) < 2:
        return [], pd.DataFrame()
    mat = np.full((len(metrics), len(metrics)), np.nan)
    for i, a in enumerate(metrics):
        for j, b in enumerate(metrics):
            taus = []
            for _model, g in s.groupby("model"):
                pa = g[g.metric == a].set_index("method")["rank"]
                pb = g[g.metric == b].set_index("method")["rank"]
                common = pa.index.intersection(pb.index)
                if len(common) >= 3:
                    taus.append(kendalltau(pa[common], pb[common]).statistic)
            mat[i, j] = np.nanmean(taus) if taus else np.nan
    frame = pd.DataFrame(mat, index=metrics, columns=metrics)
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.heatmap(frame, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="vlag", ax=ax)
    ax.set_title("rank agreement between metrics (Kendall tau)")
    return _save(fig, out, "rank_agreement"), frame


def gallery(images: torch.Tensor, boxes: list[torch.Tensor], heatmaps: dict[str, torch.Tensor], titles: list[str],
            out: Path, name: str = "gallery") -> list[Path]:
    """Images (rows) x methods (columns) with heatmaps overlaid and ground-truth boxes drawn.

    images Tensor[N,3,H,W] in [0,1]; heatmaps {method: Tensor[N,H,W]}.
    """
    n, methods = images.shape[0], list(heatmaps)
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(1.6 * (len(methods) + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        for j, col in enumerate(["image", *methods]):
            ax = axes[i, j]
            ax.imshow(img)
            if col != "image":
                h = heatmaps[col][i].numpy()
                h = (h - h.min()) / (h.max() - h.min() + 1e-12)
                ax.imshow(h, cmap="jet", alpha=0.5)
            for x1, y1, x2, y2 in boxes[i].tolist():
                ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=7)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    return _save(fig, out, name)
