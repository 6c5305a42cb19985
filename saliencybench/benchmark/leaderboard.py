"""Leaderboards from result rows: means with 95% bootstrap confidence intervals,
ranks in each metric's direction, mean rank, n/a reasons, localisation error."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics.base import METRICS

SCORED = ("deletion", "insertion", "pointing_game", "energy_pointing_game", "box_iou", "sanity_spearman_abs")
HIGHER_IS_BETTER = {**{name: spec.higher_is_better for name, spec in METRICS.entries.items()},
                    "sanity_spearman_abs": False, "localisation_accuracy": True}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaNs dropped)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _final_sanity(rows: pd.DataFrame) -> pd.DataFrame:
    """Per image, the similarity at the last (fully randomised) stage of the cascade."""
    s = rows[rows.metric == "sanity_spearman_abs"]
    if s.empty:
        return s
    last = s.groupby(["model", "method"])["stage"].transform("max")
    return s[s.stage == last]


def summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, method, metric): mean, ci_low, ci_high, n, note (n/a reason), rank."""
    if rows.empty:
        return pd.DataFrame(columns=["model", "method", "metric", "mean", "ci_low", "ci_high", "n", "note", "rank"])
    main = rows[rows.metric.isin(SCORED) & (rows.metric != "sanity_spearman_abs")]
    data = pd.concat([main, _final_sanity(rows)], ignore_index=True)
    if "box_iou" in set(rows.metric):
        loc = rows[rows.metric == "box_iou"].copy()
        loc["value"] = np.where(loc.value.isna(), np.nan, (loc.value >= 0.5).astype(float))
        loc["metric"] = "localisation_accuracy"
        data = pd.concat([data, loc], ignore_index=True)
    out = []
    for (model, method, metric), g in data.groupby(["model", "method", "metric"], sort=True):
        vals = g.value.to_numpy(dtype=float)
        notes = g.note.fillna("") if "note" in g else pd.Series([""] * len(g))
        na = notes.str.startswith("n/a").all()
        lo, hi = bootstrap_ci(vals, n_boot, seed)
        out.append({"model": model, "method": method, "metric": metric,
                    "mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
                    "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(vals).sum()),
                    "note": notes.iloc[0] if na else next((n for n in notes if n), "")})
    table = pd.DataFrame(out)
    table["rank"] = np.nan
    for (model, metric), g in table.groupby(["model", "metric"]):
        asc = not HIGHER_IS_BETTER.get(metric, True)
        table.loc[g.index, "rank"] = g["mean"].rank(ascending=asc, method="min")
    return table


def leaderboard(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Method x (model, metric) table of ``mean [ci_low, ci_high]`` (or ``n/a``), with the
    mean rank per model, sorted by overall mean rank. Baselines are rows like any method."""
    s = summary(rows, n_boot, seed)
    if s.empty:
        return pd.DataFrame()

    def cell(r: pd.Series) -> str:
        if r.note.startswith("n/a") or not np.isfinite(r["mean"]):
            return "n/a"
        return f"{r['mean']:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    s = s.assign(cell=s.apply(cell, axis=1))
    table = s.pivot_table(index="method", columns=["model", "metric"], values="cell", aggfunc="first")
    ranks = s.groupby(["method", "model"])["rank"].mean().unstack("model")
    for model in ranks.columns:
        table[(model, "mean_rank")] = ranks[model].round(2)
    table = table.sort_index(axis=1)
    table["overall_mean_rank"] = ranks.mean(axis=1).round(2)
    return table.sort_values("overall_mean_rank")


def not_applicable(rows: pd.DataFrame) -> pd.DataFrame:
    """(model, method, reason) for every method that did not apply to a model."""
    notes = rows[rows.note.fillna("").str.startswith("n/a")]
    return notes.groupby(["model", "method"])["note"].first().reset_index().rename(columns={"note": "reason"})


def localisation_error(rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1 / top-5 localisation error per (model, method), CAM protocol: an image is
    localised when the class is in the top-k and the box IoU >= 0.5."""
    b = rows[rows.metric == "box_iou"].dropna(subset=["value"])
    if b.empty:
        return pd.DataFrame(columns=["model", "method", "top1_loc_error", "top5_loc_error", "n"])
    ok = b.value >= 0.5
    b = b.assign(l1=(ok & b.top1_correct.astype(bool)).astype(float), l5=(ok & b.top5_correct.astype(bool)).astype(float))
    g = b.groupby(["model", "method"])
    return pd.DataFrame({"top1_loc_error": 1 - g.l1.mean(), "top5_loc_error": 1 - g.l5.mean(),
                         "n": g.size()}).reset_index()


def model_accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1 accuracy of each model on the run's images."""
    t = rows[rows.metric == "top1_correct"].drop_duplicates(["model", "image_id"])
    return t.groupby("model")["value"].agg(["mean", "size"]).rename(columns={"mean": "top1_accuracy", "size": "n"})


def to_markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    flat = df.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [" / ".join(str(c) for c in col if c) for col in flat.columns]
    flat = flat.reset_index()
    head = "| " + " | ".join(map(str, flat.columns)) + " |"
    sep = "|" + "---|" * len(flat.columns)
    body = ["| " + " | ".join("" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row) + " |"
            for row in flat.itertuples(index=False)]
    return "\n".join([head, sep, *body])
