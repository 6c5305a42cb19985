"""Everything the leaderboard and the report show, computed once from a run's rows: the board.

:func:`compute_board` pools the rows by the metric registry (:func:`.leaderboard.pools`), ranks
the methods with significance (:mod:`.ranking`), aggregates across models
(:mod:`.ranking_across`), gives the sanity verdicts of every metric that declares one
(:mod:`.sanity_verdict`) and collects the settings, costs, accuracies and n/a reasons. The
renderers (:mod:`.textboard` for the terminal, Markdown, CSV and JSON; :mod:`.report` for
HTML) only format these frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..metrics.base import Pooled, output_spec
from .leaderboard import localisation_error, model_accuracy, pools, predictions
from .ranking import MethodPool, MetricInfo, rank_methods
from .ranking_across import across_models
from .sanity_verdict import sanity_verdicts

CRITERIA_ORDER = ("faithfulness", "localisation", "model_use", "robustness", "complexity", "randomisation")


@dataclass
class Board:
    """The computed leaderboard of a run (all pandas frames; empty where there is nothing)."""

    metrics: pd.DataFrame
    ranking: pd.DataFrame
    across: pd.DataFrame
    verdicts: pd.DataFrame
    not_applicable: pd.DataFrame
    missing: pd.DataFrame
    settings_methods: pd.DataFrame
    settings_metrics: pd.DataFrame
    cost: pd.DataFrame
    accuracy: pd.DataFrame
    loc_error: pd.DataFrame
    skipped: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    model_use: dict[str, pd.DataFrame] = field(default_factory=dict)
    validity: pd.DataFrame = field(default_factory=pd.DataFrame)
    rows: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)  # the rows it was computed from

    @property
    def models(self) -> list[str]:
        return sorted(set(self.metrics.model)) if not self.metrics.empty else []

    def criteria(self) -> list[str]:
        present = set(self.ranking.criterion) if not self.ranking.empty else set()
        return [c for c in CRITERIA_ORDER if c in present]


def _settings(rows: pd.DataFrame, key: str, params: str) -> pd.DataFrame:
    """Distinct parameters per (model, name): one row per (name, parameters) with the models using them."""
    cols = [key, "parameters", "models"]
    if rows.empty or params not in rows:
        return pd.DataFrame(columns=cols)
    d = rows[[key, "model", params]].dropna().drop_duplicates()
    out = []
    for (name, p), g in d.groupby([key, params], sort=True):
        if p in ("{}", "") and key == "metric":
            continue
        try:  # switches of the Python API's return value are not settings of a number
            text = ", ".join(f"{k}={v}" for k, v in sorted(json.loads(p).items())
                             if not k.startswith("return_") and k not in ("per_image", "method_params"))
        except ValueError:
            text = str(p)
        out.append({key: name, "parameters": text or "(defaults)", "models": ", ".join(sorted(g.model))})
    return pd.DataFrame(out, columns=cols)


def _cost(rows: pd.DataFrame) -> pd.DataFrame:
    """Seconds per image per (model, method) for explaining, and per (model, method, metric) for scoring."""
    cols = ["model", "method", "what", "seconds_per_image", "images"]
    if rows.empty or "seconds" not in rows:
        return pd.DataFrame(columns=cols)
    ex = rows[rows.metric == "top1_correct"].dropna(subset=["seconds"])
    out = [{"model": m, "method": me, "what": "explain", "seconds_per_image": float(g.seconds.mean()),
            "images": int(g.image_id.nunique())} for (m, me), g in ex.groupby(["model", "method"])]
    sc = rows[rows.metric.map(lambda n: (s := output_spec(n)) is not None and s.name == n)].dropna(subset=["seconds"])
    out += [{"model": m, "method": me, "what": metric, "seconds_per_image": float(g.seconds.mean()),
             "images": int(g.image_id.nunique())} for (m, me, metric), g in sc.groupby(["model", "method", "metric"])]
    return pd.DataFrame(out, columns=cols)


def compute_board(rows: pd.DataFrame, metric_params: dict | None = None, n_classes: int | None = None,
                  n_boot: int = 1000, seed: int = 0, baseline: str = "random",
                  models_info: dict[str, dict] | None = None) -> Board:
    """The :class:`Board` of ``rows`` (a run's results; only its main block is ranked);
    ``metric_params``: the run's configured ones."""
    all_rows, rows = rows, main_rows(rows)
    entries: dict[tuple[str, str, str], MethodPool] = {}
    infos: dict[str, MetricInfo] = {}
    for mp in pools(rows, n_classes, metric_params):
        variant = mp.label != mp.spec.name
        infos[mp.label] = MetricInfo(mp.label, mp.spec.higher_is_better, mp.spec.criterion, mp.spec.level,
                                     mp.spec.reduce, mp.spec.ranked and not variant, mp.params,
                                     score_key=mp.spec.name)
        for method, (ids, pool) in mp.pools.items():
            entries[(mp.model, mp.label, method)] = MethodPool(pool, ids, mp.notes.get(method, ""))
        for method, note in mp.notes.items():
            if method not in mp.pools:  # does not apply: no data, the reason
                stats = np.zeros((0, 1)) if mp.spec.level == "dataset" else None
                entries[(mp.model, mp.label, method)] = MethodPool(Pooled(np.full(0, np.nan), stats), [], note)
    if entries:
        ranked = rank_methods(entries, infos, baseline=baseline, n_boot=n_boot, seed=seed)
        metrics, ranking, na, missing = ranked.metrics, ranked.ranking, ranked.not_applicable, ranked.missing
    else:
        from .ranking import METRIC_COLUMNS, RANKING_COLUMNS

        metrics, ranking = pd.DataFrame(columns=METRIC_COLUMNS), pd.DataFrame(columns=RANKING_COLUMNS)
        na, missing = pd.DataFrame(columns=["model", "method", "reason"]), pd.DataFrame()
    across = across_models(ranking) if not ranking.empty else pd.DataFrame()
    verdicts = []
    for name in sorted(set(rows.metric)) if not rows.empty else []:
        spec = output_spec(name)
        if spec is None or spec.name != name or not spec.verdict:
            continue
        judged = rows[rows.metric == spec.verdict][["model", "method", "image_id", "stage", "value"]]
        everyone = ranking[["model", "method"]].drop_duplicates().itertuples(index=False, name=None) \
            if not ranking.empty else []
        v = sanity_verdicts(judged, everyone, seed=seed, n_boot=n_boot)
        verdicts.append(v.assign(metric=name))
    skipped = rows[rows.metric == "skipped_image"][["model", "image_id", "note"]].drop_duplicates() \
        if not rows.empty and "metric" in rows else pd.DataFrame(columns=["model", "image_id", "note"])
    info = {"n_images": int(predictions(rows).image_id.nunique()) if not rows.empty else 0}
    return Board(metrics, ranking, across, pd.concat(verdicts, ignore_index=True) if verdicts else pd.DataFrame(),
                 na, missing, _settings(rows, "method", "method_params"), _settings(rows, "metric", "metric_params"),
                 _cost(rows), model_accuracy(rows).reset_index(), localisation_error(rows), skipped, info,
                 model_use_tables(all_rows, {m: i.get("arch", m) for m, i in (models_info or {}).items()}),
                 model_validity(models_info or {}), all_rows)


def main_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the run's main block (parts are reported on their own)."""
    if rows.empty or "part" not in rows:
        return rows
    return rows[rows.part.fillna("") == ""]


def _mean_ci(values: pd.Series, seed: int = 0) -> str:
    from .leaderboard import bootstrap_ci

    v = values.to_numpy(float)
    v = v[np.isfinite(v)]
    if not len(v):
        return "n/a"
    lo, hi = bootstrap_ci(v, seed=seed)
    return f"{v.mean():.3f}±{(hi - lo) / 2:.3f}"


def model_use_tables(rows: pd.DataFrame, arch_of: dict[str, str]) -> dict[str, pd.DataFrame]:
    """What the model uses, from the run's parts: per part, a table of methods x (architecture, metric): the
    metric on the main block's ground truth (object masks) beside the same metric on the part's ground truth
    (a verified cue), models matched by architecture; and one table of the pair metrics (model contrast)
    per method and pair. Scores are means over images with half their 95% bootstrap CI."""
    out: dict[str, pd.DataFrame] = {}
    if rows.empty or "part" not in rows:
        return out
    parts = sorted(p for p in rows.part.fillna("").unique() if p)
    main = main_rows(rows)
    for part in parts:
        r = rows[rows.part == part]
        pair = r[r.metric.map(lambda n: (s := output_spec(n)) is not None and s.name == n and "pair" in s.inputs)]
        if not pair.empty:
            t = {}
            for (model, partner, metric), g in pair.groupby(["model", "partner", "metric"]):
                t[f"{metric} {model} vs {partner}"] = g.groupby("method").value.apply(_mean_ci)
            out[f"{part}: model contrast"] = pd.DataFrame(t)
        single = r[r.metric.map(lambda n: (s := output_spec(n)) is not None and s.name == n
                                and "pair" not in s.inputs)]
        if single.empty:
            continue
        for metric, gm in single.groupby("metric"):
            cols = {}
            for model, g in gm.groupby("model"):
                arch = arch_of.get(model, model)
                for twin in [m for m in main.model.unique() if arch_of.get(m, m) == arch]:
                    m = main[(main.model == twin) & (main.metric == metric)]
                    if not m.empty:
                        cols[f"{twin} on objects"] = m.groupby("method").value.apply(_mean_ci)
                cols[f"{model} on {part}"] = g.groupby("method").value.apply(_mean_ci)
            out[f"{part}: {metric}, object masks vs the part's verified ground truth"] = pd.DataFrame(cols)
    return out


def model_validity(models_info: dict[str, dict]) -> pd.DataFrame:
    """The verification record of every model that has one (cue and contrast models)."""
    recs = []
    for name, info in models_info.items():
        v = info.get("verification")
        if isinstance(v, dict):
            acc = v.get("accuracy", {})
            recs.append({"model": name, "data set": v.get("dataset", ""), "valid": bool(v.get("valid", False)),
                         **{f"accuracy {k}": a for k, a in acc.items()}, "reason": v.get("reason", "")})
    return pd.DataFrame(recs)


def overall_table(board: Board) -> pd.DataFrame:
    """One row per method: its mean rank over the models (among the methods ranked on every model, re-ranked
    per model: the Friedman/Nemenyi input), its across-models group, and its rank and group on each model
    (NaN / n/a where it does not apply); a method not ranked on every model has no mean rank and comes last."""
    if board.ranking.empty:
        return pd.DataFrame()
    r = board.ranking[board.ranking.criterion == "overall"]
    wide = r.pivot_table(index="method", columns="model", values="rank", aggfunc="first")
    groups = r.pivot_table(index="method", columns="model", values="group", aggfunc="first")
    out = pd.DataFrame(index=wide.index.union(groups.index))
    a = board.across[board.across.criterion == "overall"].set_index("method") if not board.across.empty else None
    out["mean_rank"] = a.mean_rank.reindex(out.index) if a is not None else wide.mean(axis=1)
    out["group"] = a.group.reindex(out.index).fillna("") if a is not None else ""
    if a is not None:
        out.loc[out.mean_rank.isna(), "group"] = "-"
    for m in board.models:
        out[m] = wide[m] if m in wide else np.nan
        out[f"{m} group"] = groups[m] if m in groups else ""
    return out.sort_values(["mean_rank"], na_position="last")
