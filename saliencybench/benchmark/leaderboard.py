"""Leaderboards from result rows, driven by the metric registry.

Rows are pooled per (model, metric, method) over the run's images
(:func:`pools`): each metric's spec says its direction, criterion, level and how
its per-image results reduce to a data-set score (the mean, a per-class mean,
MaxBoxAcc's pooled hits ...). A metric scored with parameters other than the
run's (``saliencybench score`` with new parameters) is a variant labelled
``name[param=value]``. Nothing here names a metric or a method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics.base import MetricSpec, Pooled, output_spec

NA_PREFIX = "n/a"


@dataclass
class MetricPools:
    """One metric (or variant) of one model: its spec, configured params and the per-method pools."""

    model: str
    label: str
    spec: MetricSpec
    params: dict
    pools: dict[str, tuple[list[str], Pooled]]
    notes: dict[str, str]


def _variant_labels(rows: pd.DataFrame, metric_params: dict | None = None) -> pd.Series:
    """``metric`` where the configured parameters are the run's (``metric_params``, else the most common
    ones for that metric), else ``metric[k=v,...]`` with the parameters that differ."""
    if "metric_config" not in rows:
        return rows.metric
    cfg = rows.metric_config.fillna("{}")
    labels = rows.metric.copy()
    for metric, g in rows.groupby("metric"):
        configs = cfg[g.index].value_counts()
        if len(configs) < 2:
            continue
        run_params = json.dumps((metric_params or {}).get(metric, {}), sort_keys=True, default=str)
        main_text = run_params if metric_params is not None and run_params in configs.index else configs.index[0]
        main = json.loads(main_text)
        for c in [c for c in configs.index if c != main_text]:
            d = json.loads(c)
            diff = ",".join(f"{k}={d.get(k)}" for k in sorted(set(d) | set(main)) if d.get(k) != main.get(k))
            labels[g.index[cfg[g.index] == c]] = f"{metric}[{diff}]"
    return labels


def pools(rows: pd.DataFrame, n_classes: int | None = None, metric_params: dict | None = None) -> list[MetricPools]:
    """Per-image results pooled per (model, metric label, method), each with its image ids (sorted), so
    comparisons can pair methods on the images they share.

    Only rows of a registered metric's own output are pooled (predictions, skipped samples and
    further outputs such as per-stage similarities are not). A method whose values are all NaN
    with an ``n/a`` note gets that note and no pool.
    """
    from .execute import decode_stats

    out: list[MetricPools] = []
    if rows.empty or "metric" not in rows:
        return out
    rows = rows[rows.metric.map(lambda m: (s := output_spec(m)) is not None and s.name == m)]
    if rows.empty:
        return out
    rows = rows.assign(_metric_label=_variant_labels(rows, metric_params))
    for (model, label), g in rows.groupby(["model", "_metric_label"], sort=True):
        spec = output_spec(g.metric.iloc[0])
        assert spec is not None
        params = json.loads(g.metric_config.dropna().iloc[0]) if "metric_config" in g and g.metric_config.notna().any() else {}
        entry = MetricPools(model, label, spec, params, {}, {})
        for method, m in g.groupby("method", sort=True):
            m = m.drop_duplicates("image_id").set_index("image_id").sort_index()
            ids = list(m.index)
            notes = m.note.fillna("") if "note" in m else pd.Series("", index=m.index)
            values = m.value.reindex(ids).to_numpy(dtype=float)
            if not np.isfinite(values).any() and notes.str.startswith(NA_PREFIX).any():
                entry.notes[method] = notes[notes.str.startswith(NA_PREFIX)].iloc[0]
                continue
            entry.notes[method] = next((n for n in notes if n), "")
            stats = None
            if spec.level == "dataset" and "stats" in m:
                have = m.stats.reindex(ids).map(lambda v: isinstance(v, (bytes, bytearray)))
                if not have.all():
                    continue
                stats = np.stack([decode_stats(m.loc[i]) for i in ids])
            labels = (pd.to_numeric(m.label.reindex(ids), errors="coerce").fillna(-1).astype(np.int64).to_numpy()
                      if "label" in m else None)
            entry.pools[method] = (ids, Pooled(values, stats, labels, n_classes))
        out.append(entry)
    return out


def data_set_score(mp: MetricPools, pool: Pooled) -> float:
    """The data-set score of one pool by the metric's reduce (the main key of a dict result)."""
    value = mp.spec.reduce(pool, mp.params)
    if isinstance(value, dict):
        value = value.get(mp.spec.name, next(iter(value.values())))
    return float(value)


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


def _pool_ci(mp: MetricPools, pool: Pooled, n_boot: int, seed: int) -> tuple[float, float]:
    n = len(pool.values)
    if n < 2:
        s = data_set_score(mp, pool)
        return s, s
    rng = np.random.default_rng(seed)
    boots = np.array([data_set_score(mp, pool.take(rng.integers(0, n, n))) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return float("nan"), float("nan")
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, n_classes: int | None = None,
            metric_params: dict | None = None) -> pd.DataFrame:
    """One row per (model, method, metric): score, ci_low, ci_high, n, note, rank, criterion, ranked."""
    cols = ["model", "method", "metric", "criterion", "score", "ci_low", "ci_high", "n", "note", "rank", "ranked"]
    out = []
    for mp in pools(rows, n_classes, metric_params):
        for method, (ids, pool) in mp.pools.items():
            score = data_set_score(mp, pool)
            lo, hi = _pool_ci(mp, pool, n_boot, seed)
            out.append({"model": mp.model, "method": method, "metric": mp.label, "criterion": mp.spec.criterion,
                        "score": score, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(pool.values).sum())
                        if mp.spec.level == "image" else len(ids), "note": mp.notes.get(method, ""),
                        "ranked": mp.spec.ranked and mp.label == mp.spec.name})
        for method, note in mp.notes.items():
            if method not in mp.pools and note.startswith(NA_PREFIX):
                out.append({"model": mp.model, "method": method, "metric": mp.label, "criterion": mp.spec.criterion,
                            "score": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0, "note": note,
                            "ranked": False})
    table = pd.DataFrame(out, columns=cols[:-2] + ["ranked"])
    table["rank"] = np.nan
    for (_model, metric), g in table[table.score.notna()].groupby(["model", "metric"]):
        spec = output_spec(metric.split("[")[0])
        asc = not (spec.higher_is_better if spec else True)
        table.loc[g.index, "rank"] = g.score.rank(ascending=asc, method="average")
    return table[cols]


def leaderboard(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, metric_params: dict | None = None
                ) -> pd.DataFrame:
    """Method x (model, metric) table of ``score [ci_low, ci_high]`` (or ``n/a``), with the mean
    rank per model over ranked metrics, sorted by the overall mean rank."""
    s = summary(rows, n_boot, seed, metric_params=metric_params)
    if s.empty:
        return pd.DataFrame()

    def cell(r: pd.Series) -> str:
        if str(r.note).startswith(NA_PREFIX) or not np.isfinite(r.score):
            return "n/a"
        return f"{r.score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    s = s.assign(cell=s.apply(cell, axis=1))
    table = s.pivot_table(index="method", columns=["model", "metric"], values="cell", aggfunc="first")
    ranks = s[s.ranked].groupby(["method", "model"])["rank"].mean().unstack("model")
    for model in ranks.columns:
        table[(model, "mean_rank")] = ranks[model].round(2)
    table = table.sort_index(axis=1)
    table["overall_mean_rank"] = ranks.mean(axis=1).round(2)
    return table.sort_values("overall_mean_rank", na_position="last")


def not_applicable(rows: pd.DataFrame) -> pd.DataFrame:
    """(model, method, reason) for every method that did not apply to a model."""
    if rows.empty or "note" not in rows:
        return pd.DataFrame(columns=["model", "method", "reason"])
    notes = rows[rows.note.fillna("").str.startswith(NA_PREFIX)]
    return notes.groupby(["model", "method"])["note"].first().reset_index().rename(columns={"note": "reason"})


def predictions(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (model, image): top-1 and top-5 correctness and the predicted class (from the explain tasks)."""
    if rows.empty or "metric" not in rows:
        return pd.DataFrame(columns=["model", "image_id", "top1_correct", "top5_correct"])
    t = rows[rows.metric == "top1_correct"].drop_duplicates(["model", "image_id"])
    return t.assign(top1_correct=t.value.astype(bool))[
        ["model", "image_id", "top1_correct", "top5_correct"] + (["predicted_class"] if "predicted_class" in t else [])]


def localisation_error(rows: pd.DataFrame, min_iou: float = 0.5) -> pd.DataFrame:
    """Top-1 / top-5 localisation error per (model, method, metric) for every metric whose values are box
    IoUs (``unit="IoU"``), the CAM / Grad-CAM protocol: an image is localised when the class is in the
    top-k and the IoU >= ``min_iou``."""
    cols = ["model", "method", "metric", "top1_loc_error", "top5_loc_error", "n"]
    if rows.empty or "metric" not in rows:
        return pd.DataFrame(columns=cols)
    iou = [m for m in rows.metric.unique() if (s := output_spec(m)) is not None and s.name == m and s.unit == "IoU"]
    b = rows[rows.metric.isin(iou)].dropna(subset=["value"])
    if b.empty:
        return pd.DataFrame(columns=cols)
    if "top1_correct" not in b or b.top1_correct.isna().all():
        pred = predictions(rows)[["model", "image_id", "top1_correct", "top5_correct"]]
        b = b.drop(columns=[c for c in ("top1_correct", "top5_correct") if c in b]).merge(
            pred, on=["model", "image_id"], how="left")
    ok = b.value >= min_iou
    b = b.assign(l1=(ok & b.top1_correct.fillna(False).astype(bool)).astype(float),
                 l5=(ok & b.top5_correct.fillna(False).astype(bool)).astype(float))
    if "metric" not in b:
        b = b.assign(metric="")
    g = b.groupby(["model", "method", "metric"])
    return pd.DataFrame({"top1_loc_error": 1 - g.l1.mean(), "top5_loc_error": 1 - g.l5.mean(),
                         "n": g.size()}).reset_index()


def model_accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1 accuracy of each model on the run's images."""
    t = predictions(rows)
    return t.groupby("model")["top1_correct"].agg(["mean", "size"]).rename(
        columns={"mean": "top1_accuracy", "size": "n"})


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
