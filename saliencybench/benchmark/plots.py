"""Figures of a run (PNG and SVG): per-metric bars with confidence intervals, curves as small
multiples, a gallery per model, per-stage similarity curves, critical-difference diagrams and the
rank agreement between metrics.

Every figure is built from the registry-driven board (:mod:`.tables`) or the rows; colours are
seaborn's colour-blind-safe palette; facet titles are short (the facet's own name) and laid out
with ``constrained`` layout so they never overlap; maps are shown as Captum's visualisation
does (divided by the 99th percentile of their absolute values and clipped), so a few extreme
gradient values do not hide the rest.
"""

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
from .overlay import display_scale  # noqa: E402
from .tables import Board  # noqa: E402

PALETTE = "colorblind"
MIN_AGREEMENT_METHODS = 5


def _save(fig: plt.Figure, out: Path, name: str, svg: bool = True) -> list[Path]:
    """Save ``fig`` as PNG (and SVG for charts; image grids stay PNG-only, their SVG would only wrap the pixels)."""
    paths = [out / f"{name}.png", *([out / f"{name}.svg"] if svg else [])]
    for p in paths:
        fig.savefig(p, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def metric_bars(board: Board, out: Path) -> dict[str, list[Path]]:
    """One bar chart per metric: the data-set score per method and model with its 95% bootstrap CI,
    methods in the order of the first model's ranking; the legend outside the bars."""
    paths: dict[str, list[Path]] = {}
    m = board.metrics.dropna(subset=["score"])
    for metric, d in m.groupby("metric"):
        spec = output_spec(metric.split("[")[0])
        order = d.groupby("method")["rank"].mean().sort_values().index
        models = sorted(d.model.unique())
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(order) * max(1, len(models)) ** 0.5 + 2), 3.4),
                               layout="constrained")
        colours = sns.color_palette(PALETTE, len(models))
        width = 0.8 / len(models)
        for k, model in enumerate(models):
            g = d[d.model == model].set_index("method").reindex(order)
            x = np.arange(len(order)) + (k - (len(models) - 1) / 2) * width
            err = np.vstack([g.score - g.ci_low, g.ci_high - g.score]).clip(min=0)
            ax.bar(x, g.score, width, yerr=err, color=colours[k], label=model, capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(np.arange(len(order)), order, rotation=45, ha="right", fontsize=8)
        direction = spec.direction() if spec else ""
        ax.set_title(f"{metric} ({direction}; 95% bootstrap CI)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        paths[metric] = _save(fig, out, f"bar_{_safe(metric)}")
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def curves(rows: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """For every metric that returns curves: small multiples, one panel per method (all models in
    it, colour-blind palette), the mean curve over images."""
    paths: dict[str, list[Path]] = {}
    if rows.empty or "curve" not in rows:
        return paths
    names = [n for n, s in METRICS.entries.items() if "curve" in s.columns]
    for metric in sorted(set(rows.metric) & set(names)):
        d = rows[(rows.metric == metric)].dropna(subset=["curve"])
        recs = []
        for r in d.itertuples():
            ys = json.loads(r.curve)
            recs += [{"model": r.model, "method": r.method, "fraction": x, "score": y}
                     for x, y in zip(np.linspace(0, 1, len(ys)), ys)]
        if not recs:
            continue
        c = pd.DataFrame(recs).groupby(["model", "method", "fraction"], as_index=False).score.mean()
        methods = sorted(c.method.unique())
        cols = min(5, len(methods))
        rows_n = int(np.ceil(len(methods) / cols))
        fig, axes = plt.subplots(rows_n, cols, figsize=(2.1 * cols, 1.7 * rows_n + 0.4), sharex=True, sharey=True,
                                 squeeze=False, layout="constrained")
        colours = dict(zip(sorted(c.model.unique()), sns.color_palette(PALETTE, c.model.nunique())))
        for ax, method in zip(axes.flat, methods):
            for model, g in c[c.method == method].groupby("model"):
                ax.plot(g.fraction, g.score, color=colours[model], lw=1.2, label=model)
            ax.set_title(method, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        fig.supxlabel("fraction of pixels changed", fontsize=8)
        fig.supylabel("target score", fontsize=8)
        fig.suptitle(f"{metric}: mean curve per method", fontsize=9)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
        paths[metric] = _save(fig, out, f"curves_{_safe(metric)}")
    return paths


def stage_curves(rows: pd.DataFrame, out: Path) -> list[Path]:
    """Similarity to the original maps as blocks are randomised, for metrics with per-stage outputs:
    one panel per (model, output), methods in the colour-blind palette."""
    if rows.empty or "stage" not in rows:
        return []
    d = rows[rows.metric.map(lambda m: (s := output_spec(m)) is not None and m in s.outputs) & rows.stage.notna()]
    if d.empty:
        return []
    g = sns.relplot(data=d, x="stage", y="value", hue="method", col="metric", row="model", kind="line",
                    errorbar=("ci", 95), n_boot=200, seed=0, height=2.2, aspect=1.3, palette=PALETTE,
                    facet_kws={"margin_titles": True})
    g.set_titles(row_template="{row_name}", col_template="{col_name}", size=8)
    g.set_axis_labels("blocks randomised (output first)", "similarity")
    return _save(g.figure, out, "per_stage_similarity")


def rank_agreement(board: Board, out: Path) -> tuple[list[Path], pd.DataFrame]:
    """Kendall tau between ranked metrics of the methods' ranks, averaged over models; only over
    models where at least :data:`MIN_AGREEMENT_METHODS` methods have both metrics (n given)."""
    s = board.metrics[board.metrics.rank_term.astype(bool)].dropna(subset=["rank"])
    metrics = sorted(s.metric.unique())
    if len(metrics) < 2:
        return [], pd.DataFrame()
    mat = np.full((len(metrics), len(metrics)), np.nan)
    ns = []
    for i, a in enumerate(metrics):
        for j, b in enumerate(metrics):
            taus = []
            for _model, g in s.groupby("model"):
                pa = g[g.metric == a].set_index("method")["rank"]
                pb = g[g.metric == b].set_index("method")["rank"]
                common = pa.index.intersection(pb.index)
                if len(common) >= MIN_AGREEMENT_METHODS:
                    taus.append(kendalltau(pa[common], pb[common]).statistic)
                    ns.append(len(common))
            mat[i, j] = np.nanmean(taus) if taus else np.nan
    if not ns:
        return [], pd.DataFrame()
    frame = pd.DataFrame(mat, index=metrics, columns=metrics)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(metrics), 0.6 + 0.6 * len(metrics)), layout="constrained")
    sns.heatmap(frame, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="vlag", ax=ax, annot_kws={"size": 7})
    ax.set_title(f"rank agreement between metrics (Kendall tau over n = {min(ns)}-{max(ns)} methods per model)",
                 fontsize=8)
    ax.tick_params(labelsize=7)
    return _save(fig, out, "rank_agreement"), frame


def cd_diagrams(board: Board, out: Path) -> dict[str, list[Path]]:
    """The critical-difference diagram (Demsar 2006) of every criterion and overall, when there are
    at least two models to compare over."""
    from .cd_diagram import cd_diagram

    paths: dict[str, list[Path]] = {}
    if board.across.empty or board.across.n_blocks.max() < 2:
        return paths
    for crit in ["overall", *board.criteria()]:
        t = board.across[(board.across.criterion == crit) & board.across.mean_rank.notna()]
        if len(t) < 2:
            continue
        fig = cd_diagram(board.across, crit)
        paths[crit] = [out / f"cd_{crit}.png", out / f"cd_{crit}.svg"]
        for p in paths[crit]:
            fig.savefig(p, dpi=100, bbox_inches="tight")
    return paths


def gallery(images: torch.Tensor, boxes: list[torch.Tensor], heatmaps: dict[str, torch.Tensor], titles: list[str],
            out: Path, name: str = "gallery", clip: float = 99.0) -> list[Path]:
    """Images (rows) x methods (columns): each map over its image, divided by its ``clip`` percentile
    of |map| and clipped (Captum's display rule), a colour bar, ground-truth boxes in green; the
    aspect ratio kept. images Tensor[N,3,H,W] in [0,1]; heatmaps {method: Tensor[N,H,W]};
    ``titles``: one per image (e.g. its true and predicted class)."""
    n, methods = images.shape[0], list(heatmaps)
    h, w = images.shape[-2:]
    cell = 1.5
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(cell * (len(methods) + 1) * w / h + 0.8, cell * n + 0.5),
                             squeeze=False, layout="constrained")
    im = None
    for i in range(n):
        img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        for j, col in enumerate(["image", *methods]):
            ax = axes[i, j]
            ax.imshow(img)
            if col != "image":
                shown, signed = display_scale(heatmaps[col][i].numpy(), clip)
                shown = shown if signed else np.clip(shown, 0, 1)
                im = ax.imshow(np.abs(shown), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
            for x1, y1, x2, y2 in boxes[i].tolist():
                ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=7, rotation=20)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, fraction=0.02, label=f"|map| / {clip:g}th percentile")
    return _save(fig, out, name, svg=False)
