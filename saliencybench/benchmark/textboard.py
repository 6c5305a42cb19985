"""Render a :class:`~.tables.Board`: terminal text that fits the width, Markdown, CSV, JSON, HTML.

The text layout answers the question first: the overall ranking (one line per method: mean rank
over models, its group, its rank and group on each model), then one compact table per model
(methods x metrics: score +- half the 95% CI, 3 digits, ``*`` on the best of each column, the
criterion ranks with their groups, the sanity verdict, the cost), then the n/a reasons as
footnotes. Tables wider than the terminal are split into column blocks, never wrapped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..metrics.base import output_spec
from .tables import Board, overall_table

FORMATS = ("text", "md", "csv", "json", "html")
MIN_WIDTH = 60


def _num(v: float, digits: int = 3) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _cell(r: pd.Series, best: bool) -> str:
    """``score±half-CI``, ``*`` when it is (tied) best in its column."""
    if not np.isfinite(r.score):
        return "n/a"
    half = (r.ci_high - r.ci_low) / 2 if np.isfinite(r.ci_high) and np.isfinite(r.ci_low) else float("nan")
    return f"{r.score:.3f}" + (f"±{half:.3f}" if np.isfinite(half) else "") + ("*" if best else " ")


def _arrow(metric: str) -> str:
    spec = output_spec(metric.split("[")[0])
    return "" if spec is None else ("↑" if spec.higher_is_better else "↓")


def model_table(board: Board, model: str, metrics: Sequence[str] | None = None,
                criteria: Sequence[str] | None = None) -> pd.DataFrame:
    """Methods x (criterion ranks, metric cells, sanity, cost) of one model, as display strings,
    best overall first."""
    m = board.metrics[board.metrics.model == model].copy()
    if metrics:
        m = m[m.metric.isin(metrics)]
    if criteria:
        m = m[m.criterion.isin(criteria)]
    r = board.ranking[board.ranking.model == model]
    methods = list(r[r.criterion == "overall"].sort_values("rank", na_position="last").method)
    methods += [x for x in sorted(set(m.method)) if x not in methods]
    out = pd.DataFrame(index=methods)
    for crit in ["overall", *[c for c in board.criteria() if not criteria or c in criteria]]:
        c = r[r.criterion == crit].set_index("method")
        if c.empty:
            continue
        out[crit] = [f"{c.loc[x, 'rank']:.1f} {c.loc[x, 'group']}" if x in c.index and np.isfinite(c.loc[x, "rank"])
                     else ("n/a" if x in c.index else "") for x in methods]
    order = sorted(set(m.metric), key=lambda n: (not m[m.metric == n].rank_term.any(), n))
    for metric in order:
        g = m[m.metric == metric].set_index("method")
        top = g["rank"].min()
        out[f"{metric}{_arrow(metric)}"] = [_cell(g.loc[x], bool(g.loc[x, "rank"] == top)) if x in g.index else ""
                                            for x in methods]
    if not board.verdicts.empty:
        v = board.verdicts[board.verdicts.model == model].set_index("method")
        if not v.empty:
            out["sanity"] = [v.verdict.get(x, "") for x in methods]
    c = board.cost[(board.cost.model == model) & (board.cost.what == "explain")].set_index("method")
    if not c.empty:
        out["s/img"] = [_num(c.seconds_per_image.get(x, np.nan), 3) for x in methods]
    out.index.name = "method"
    return out


def _blocks(frame: pd.DataFrame, width: int, keep: int = 1) -> list[pd.DataFrame]:
    """Split ``frame``'s columns into blocks whose text fits ``width`` (the index repeated in each)."""
    if frame.empty:
        return []
    index_w = max(len(str(frame.index.name or "")), *(len(str(i)) for i in frame.index)) + 2
    widths = {c: max(len(str(c)), *(len(str(v)) for v in frame[c])) + 2 for c in frame.columns}
    blocks, cur, used = [], [], index_w
    fixed = list(frame.columns[:keep])
    base = index_w + sum(widths[c] for c in fixed)
    used = base
    for c in frame.columns[keep:]:
        if cur and used + widths[c] > width:
            blocks.append(fixed + cur)
            cur, used = [], base
        cur.append(c)
        used += widths[c]
    blocks.append(fixed + cur)
    return [frame[b] for b in blocks]


def _text(frame: pd.DataFrame) -> str:
    return frame.to_string(na_rep="", justify="right")


def render_text(board: Board, width: int = 100, models: Sequence[str] | None = None,
                metrics: Sequence[str] | None = None, criteria: Sequence[str] | None = None) -> str:
    """The terminal leaderboard, every line at most ``width`` characters."""
    width = max(MIN_WIDTH, width)
    lines: list[str] = []
    overall = overall_table(board)
    chosen = [m for m in board.models if not models or m in models]
    if not overall.empty:
        n = board.info.get("n_images", 0)
        lines += [f"Overall ranking ({len(board.models)} models, {n} images; rank 1 is best): mean over the models "
                  "of each", "model's overall rank (the mean of its criterion ranks, LATEC). Groups: not separable "
                  "at 0.05", "(Friedman-Nemenyi across models; bootstrap within a model). Model columns: rank and "
                  "group there.", ""]
        show = pd.DataFrame(index=overall.index)
        show["rank"] = [_num(v, 2) for v in overall.mean_rank]
        show["group"] = overall.group.fillna("").astype(str)
        for m in chosen:
            show[m] = [f"{_num(r, 1)} {g}" if np.isfinite(r) else "n/a" for r, g in
                       zip(overall[m], overall[f"{m} group"].fillna(""))]
        show.index.name = "method"
        for block in _blocks(show, width, keep=2):
            lines += [_text(block), ""]
        partial = list(overall.index[overall.mean_rank.isna()])
        if partial:
            lines += [f"-: {', '.join(partial)} not ranked on every model (no mean rank; see n/a below)", ""]
    for model in chosen:
        t = model_table(board, model, metrics, criteria)
        if t.empty:
            continue
        acc = board.accuracy.set_index("model").top1_accuracy.get(model, np.nan) if not board.accuracy.empty else np.nan
        lines.append(f"{model} (top-1 accuracy {_num(acc, 3)}): score ±half 95% CI, * best, ↑/↓ better")
        for block in _blocks(t, width, keep=0):
            lines += [_text(block), ""]
    for title, t in board.model_use.items():
        lines.append(f"What the model uses. {title} (mean ±half 95% CI)")
        t = t.copy()
        t.index.name = "method"
        for block in _blocks(t, width, keep=0):
            lines += [_text(block), ""]
    if not board.validity.empty:
        bad = board.validity[~board.validity["valid"].astype(bool)]
        lines.append(f"verified models: {len(board.validity) - len(bad)} of {len(board.validity)} valid" +
                     "".join(f"; {r.model} NOT VALID: {r.reason}" for r in bad.itertuples()))
        lines.append("")
    if not board.not_applicable.empty:
        lines.append("n/a:")
        for r in board.not_applicable.itertuples():
            lines.append(f"  {r.model} {r.method}: {str(r.reason).removeprefix('n/a: ')}")
    if board.missing is not None and not board.missing.empty:
        lines.append("no rank term (a ranked method lacks the metric):")
        for r in board.missing.itertuples():
            lines.append(f"  {r.model} {r.metric}: missing for {r.methods}")
    return "\n".join(_fit(line, width) for text in lines for line in text.split("\n")).rstrip() + "\n"


def _fit(line: str, width: int) -> str:
    if len(line) <= width:
        return line
    return line[: width - 1] + "…"


def render_markdown(board: Board, models: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                    criteria: Sequence[str] | None = None) -> str:
    """The same tables as GitHub Markdown."""
    parts = ["# Leaderboard", ""]
    overall = overall_table(board)
    if not overall.empty:
        parts += ["## Overall ranking", "", "Mean over models of the overall rank (1 is best); groups: not "
                  "separable at 0.05.", "", _md(overall.round(2).reset_index()), ""]
    for model in [m for m in board.models if not models or m in models]:
        parts += [f"## {model}", "", _md(model_table(board, model, metrics, criteria).reset_index()), ""]
    if not board.not_applicable.empty:
        parts += ["## Not applicable", "", _md(board.not_applicable), ""]
    return "\n".join(parts)


def _md(df: pd.DataFrame) -> str:
    def esc(v: object) -> str:
        if isinstance(v, float) and math.isnan(v):
            return ""
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(esc(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    return "\n".join([head, sep, *("| " + " | ".join(esc(v) for v in row) + " |"
                                   for row in df.itertuples(index=False))])


def render(board: Board, fmt: str = "text", width: int = 100, models: Sequence[str] | None = None,
           metrics: Sequence[str] | None = None, criteria: Sequence[str] | None = None) -> str:
    """``board`` in ``fmt``: text, md, csv (the long per-metric table), json (all tables) or html."""
    if fmt == "text":
        return render_text(board, width, models, metrics, criteria)
    if fmt == "md":
        return render_markdown(board, models, metrics, criteria)
    m = board.metrics
    if models:
        m = m[m.model.isin(models)]
    if metrics:
        m = m[m.metric.isin(metrics)]
    if criteria:
        m = m[m.criterion.isin(criteria)]
    if fmt == "csv":
        return m.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"metrics": json.loads(m.to_json(orient="records")),
                           "ranking": json.loads(board.ranking.to_json(orient="records")),
                           "across_models": json.loads(board.across.to_json(orient="records")),
                           "sanity": json.loads(board.verdicts.to_json(orient="records")),
                           "not_applicable": json.loads(board.not_applicable.to_json(orient="records"))}, indent=1)
    if fmt == "html":
        from .report import html_tables

        return html_tables(board, models, metrics, criteria)
    raise ValueError(fmt)
