"""The run's outputs: leaderboard files, figures and one self-contained HTML report.

The report opens with the answer: a summary a reader can quote (the winner per criterion and
model with its significance group), a table of contents, the ranking (with the critical-difference
diagrams and the sanity verdicts) and the settings behind every number; then one section per
criterion with its tables and figures, the gallery, the models, costs and details; model
inspection last, collapsed. Every text written into the HTML is escaped (``html.escape``);
figures are embedded as base64 PNG; tables scroll horizontally inside their box and keep their
header in view.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import SaliencyBenchError
from . import plots
from .execute import TaskContext
from .runner import Run, open_run
from .tables import Board, compute_board, overall_table
from .textboard import model_table, render_markdown

CSS = """body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 2em;max-width:1500px;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.box{overflow-x:auto;max-height:70vh;overflow-y:auto;border:1px solid #ddd;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;white-space:nowrap}td,th{border:1px solid #e3e3e3;padding:2px 6px;
text-align:right}th{background:#f4f4f4;position:sticky;top:0;z-index:1}td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#eaf6ea}.summary{background:#f6f8fb;border-left:4px solid #4a7;padding:.6em 1em}
nav ul{columns:3;font-size:13px}img{max-width:100%;height:auto}figure{margin:.6em 0}
figcaption{font-size:12px;color:#555}details{margin:1em 0}.muted{color:#777;font-size:12px}"""


def _models_info(run: Run) -> dict[str, dict]:
    file = run.path / "models.json"
    try:
        info = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        info = {}
    return info if isinstance(info, dict) else {}


def _rows_and_board(run: Run) -> tuple[pd.DataFrame, Board]:
    rows = run.results
    n_classes = None
    try:
        n_classes = len(TaskContext(run.config, run.run_id, run.path).dataset.classes)
    except SaliencyBenchError:
        pass
    return rows, compute_board(rows, run.config.metric_params, n_classes, seed=run.config.seed,
                               models_info=_models_info(run))


def write_leaderboard(run: Run, board: Board | None = None, push: bool = True) -> tuple[Board, Path]:
    """Compute the board; save ``leaderboard.csv`` (per model, metric and method), ``ranking.csv``
    (model, method, criterion, rank, group), ``leaderboard.md``, ``sanity.csv``, ``settings.csv`` and
    ``localisation_error.csv`` under ``<run>/`` (and, with ``push``, on a run URL); return the board and
    the CSV path."""
    if board is None:
        _, board = _rows_and_board(run)
    board.metrics.to_csv(run.path / "leaderboard.csv", index=False)
    board.metrics.to_csv(run.path / "summary.csv", index=False)
    board.ranking.to_csv(run.path / "ranking.csv", index=False)
    board.across.to_csv(run.path / "ranking_across_models.csv", index=False)
    board.verdicts.to_csv(run.path / "sanity.csv", index=False)
    pd.concat([board.settings_methods.assign(kind="method"), board.settings_metrics.assign(kind="metric")]
              ).to_csv(run.path / "settings.csv", index=False)
    board.loc_error.to_csv(run.path / "localisation_error.csv", index=False)
    md = render_markdown(board)
    md += "\n## Settings\n\n" + _settings_md(board) + "\n"
    (run.path / "leaderboard.md").write_text(md)
    if push and run.remote is not None:
        run.remote.push_outputs(run.path)
    return board, run.path / "leaderboard.csv"


def _settings_md(board: Board) -> str:
    from .textboard import _md

    parts = []
    for title, t in (("Methods", board.settings_methods), ("Metrics", board.settings_metrics)):
        if not t.empty:
            parts += [f"### {title}", "", _md(t), ""]
    return "\n".join(parts)


def _img(path: Path, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption or path.stem)}" '
            f'loading="eager">{cap}</figure>')


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.3f}"
    if isinstance(v, (np.floating,)):
        return "" if np.isnan(v) else f"{float(v):.3f}"
    return str(v)


def table_html(df: pd.DataFrame, index: bool = False, best: Sequence[str] = ()) -> str:
    """An escaped HTML table (3-digit floats, no pandas index unless asked), in a scrolling box;
    cells ending in ``*`` (the best of their column) are marked."""
    if df is None or df.empty:
        return "<p class='muted'>none</p>"
    frame = df.reset_index() if index else df
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            text = _fmt(v)
            cls = " class='best'" if text.endswith("*") else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='box'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def html_tables(board: Board, models: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                criteria: Sequence[str] | None = None) -> str:
    """The leaderboard's tables as a standalone HTML page (``saliencybench leaderboard --format html``)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{CSS}</style></head><body>",
             "<h2>Overall ranking</h2>", table_html(overall_table(board).round(2), index=True)]
    for model in [m for m in board.models if not models or m in models]:
        parts += [f"<h2>{html.escape(model)}</h2>", table_html(model_table(board, model, metrics, criteria), True)]
    return "\n".join(parts + ["</body></html>"])


def summary_sentences(board: Board) -> list[str]:
    """Quotable sentences: per criterion and model the winner with its significance group."""
    out = []
    overall = overall_table(board)
    if not overall.empty and len(board.models) > 1 and np.isfinite(overall.mean_rank.iloc[0]):
        top = overall.index[0]
        tied = [m for m in overall.index[1:] if overall.loc[m, "group"] == overall.loc[top, "group"]
                and str(overall.loc[m, "group"])]
        rest = f" (not separable from {', '.join(tied)} at 0.05)" if tied else ""
        out.append(f"Across the {len(board.models)} models, {top} ranks first overall (mean rank "
                   f"{overall.mean_rank.iloc[0]:.2f}, group {overall.loc[top, 'group'] or '-'}){rest}.")
    r = board.ranking
    for model in board.models:
        parts = []
        for crit in ["overall", *board.criteria()]:
            c = r[(r.model == model) & (r.criterion == crit)].dropna(subset=["rank"]).sort_values("rank")
            if c.empty:
                continue
            first = c.iloc[0]
            same = list(c[(c.group == first.group) & (c.method != first.method)].method)
            tie = f", with {', '.join(same[:3])}{' ...' if len(same) > 3 else ''} in the same group" if same else ""
            parts.append(f"{crit}: {first.method} (group {first.group}{tie})")
        if parts:
            out.append(f"On {model}, the best method is " + "; ".join(parts) + ".")
    return out


def _gallery_maps(ctx: TaskContext, model: str, want: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{method: {image id: map}}`` of ``model``'s first images, from the store: the explain tasks'
    files read shard by shard in data-set order (fetched from a run URL on first use) until ``want``
    images have a map of every method with maps; methods without any (n/a, not stored) left out.
    (In an unfinished run, a method whose first shards are not stored yet may be left out.)"""
    from .execute import stored_heat
    from .tasks import plan_units

    cfg = ctx.config
    units = [u for u in plan_units(cfg, len(ctx.dataset)) if u.explain.model == model]
    tasks = {m: [u.explain for u in units if u.explain.method == m] for m in cfg.methods}
    maps: dict[str, dict[str, torch.Tensor]] = {m: {} for m in cfg.methods}
    for shard in range(max((len(t) for t in tasks.values()), default=0)):
        for method, ts in tasks.items():
            try:
                heat = stored_heat(ts[shard], ctx) if shard < len(ts) else None
            except SaliencyBenchError:  # a file that cannot be read or fetched: the method is left out there
                heat = None
            if heat is not None:
                maps[method].update((heat.ids[i], heat.maps[i]) for i in sorted(heat.maps))
        have = [m for m in maps.values() if m]
        if have and sum(all(i in m for m in have) for i in have[0]) >= want:
            break
    return {m: v for m, v in maps.items() if v}


def _gallery(run: Run, rows: pd.DataFrame, out: Path) -> list[Path]:
    """A gallery per model of its first images, true and predicted class over each, from the store."""
    if not run.config.store_heatmaps or run.config.gallery_images < 1:
        return []
    cfg = run.config
    ctx = TaskContext(cfg, run.run_id, run.path)
    pred = rows[rows.metric == "top1_correct"].drop_duplicates(["model", "image_id"]) if not rows.empty else rows
    paths: list[Path] = []
    for model in cfg.models:
        maps = _gallery_maps(ctx, model, cfg.gallery_images)
        if not maps:
            continue
        first = next(iter(maps.values()))
        ids = [i for i in first if all(i in m for m in maps.values())][: cfg.gallery_images]
        samples = {}
        for i in range(min(len(ctx.dataset), 4 * cfg.gallery_images + 16)):
            try:
                s = ctx.dataset[i]
            except SaliencyBenchError:
                continue
            if s.image_id in ids:
                samples[s.image_id] = s
        ids = [i for i in ids if i in samples]
        if not ids:
            continue
        size = tuple(first[ids[0]].shape)
        images, boxes, titles = [], [], []
        p = pred[pred.model == model].set_index("image_id") if not pred.empty else pd.DataFrame()
        for i in ids:
            s = samples[i]
            hh, ww = s.image.shape[-2:]
            images.append(torch.nn.functional.interpolate(s.image[None], size=size, mode="bilinear")[0])
            boxes.append(s.boxes * torch.tensor([size[1] / ww, size[0] / hh, size[1] / ww, size[0] / hh]))
            guess = p.predicted_class.get(i, "?") if "predicted_class" in p else "?"
            titles.append(f"{i}\ntrue: {ctx.class_name(model, s.label)}\npred: {guess}")
        heat = {m: torch.stack([v[i] if tuple(v[i].shape) == size else torch.nn.functional.interpolate(
            v[i][None, None], size=size, mode="bilinear")[0, 0] for i in ids]) for m, v in maps.items()}
        paths += plots.gallery(torch.stack(images), boxes, heat, titles, out, f"gallery_{plots._safe(model)}")
    return paths


def _models_table(run: Run, board: Board) -> pd.DataFrame:
    info = _models_info(run)
    acc = board.accuracy.set_index("model").top1_accuracy if not board.accuracy.empty else pd.Series(dtype=float)
    out = []
    for name in [*run.config.models, *(m for p in run.config.parts.values() for m in p.get("models", []))]:
        i = info.get(name, {})
        out.append({"model": name, "architecture": i.get("architecture", ""), "input size": i.get("input_size", ""),
                    "parameters": f"{i['parameters'] / 1e6:.2f} M" if "parameters" in i else "",
                    "accuracy on the run's images": acc.get(name, np.nan),
                    "held-out accuracy": i.get("val_accuracy", np.nan), "provenance": i.get("source", ""),
                    "weights": Path(str(i.get("weights", ""))).name})
    return pd.DataFrame(out)


def write_report(run: Run | str | Path, board: Board | None = None) -> Path:
    """Write ``<run>/report.html`` (and the leaderboard files, unless ``board`` is given: then they are
    written already); returns its path."""
    run = run if isinstance(run, Run) else open_run(run)
    if run.remote is not None:  # the URL still holds this run (its maps are fetched from there below)
        run.remote.check_instance(run.path)
    if board is None:
        rows, board = _rows_and_board(run)
        write_leaderboard(run, board, push=False)  # uploaded with the report below
    else:
        rows = board.rows if not board.rows.empty else run.results
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    meta = json.loads((run.path / "config.json").read_text())
    bars = plots.metric_bars(board, out)
    curve_figs = plots.curves(rows, out)
    cds = plots.cd_diagrams(board, out)
    agree, _ = plots.rank_agreement(board, out)
    stages = plots.stage_curves(rows, out)
    gallery = _gallery(run, rows, out)
    png = lambda ps: [p for p in ps if p.suffix == ".png"]  # noqa: E731
    sections: list[tuple[str, str, list[str]]] = []  # (id, title, html parts)
    ranking = [table_html(overall_table(board).round(2), index=True)] if len(board.models) > 1 else []
    ranking += [_img(p, "critical-difference diagram, overall") for p in png(cds.get("overall", []))]
    for model in board.models:
        t = model_table(board, model)
        keep = [c for c in t.columns if c in ("overall", *board.criteria(), "sanity", "s/img")]
        ranking += [f"<h3>{html.escape(model)}</h3>", table_html(t[keep], index=True)]
    sections.append(("ranking", "Ranking", ranking))
    settings = ["<p>The exact parameters behind every number (resolved for the image size used).</p>",
                "<h3>Methods</h3>", table_html(board.settings_methods), "<h3>Metrics</h3>",
                table_html(board.settings_metrics)]
    sections.append(("settings", "Settings", settings))
    for crit in board.criteria():
        part = []
        for model in board.models:
            part += [f"<h3>{html.escape(model)}</h3>", table_html(model_table(board, model, criteria=[crit]), True)]
        part += [_img(p, f"critical-difference diagram, {crit}") for p in png(cds.get(crit, []))]
        names = sorted(set(board.metrics[board.metrics.criterion == crit].metric))
        for metric in names:
            part += [_img(p, f"{metric}") for p in png(bars.get(metric, []))]
            part += [_img(p, f"{metric} curves") for p in png(curve_figs.get(metric, []))]
        sections.append((f"criterion-{crit}", f"Criterion: {crit}", part))
    if not board.verdicts.empty or stages:
        part = [table_html(board.verdicts.drop(columns=["rule"], errors="ignore"))]
        if not board.verdicts.empty:
            part.append(f"<p class='muted'>Rule: {html.escape(str(board.verdicts.rule.dropna().iloc[0]))} "
                        "(Adebayo et al., NeurIPS 2018); never a rank term.</p>")
        part += [_img(p, "similarity to the original maps as blocks are randomised") for p in png(stages)]
        sections.append(("sanity", "Sanity check: model randomisation", part))
    if board.model_use:
        part = ["<p>Exact masks say where the object is, not what the model relies on. These blocks use models "
                "whose cue is verified by intervention (FunnyBirds, Hesse et al. ICCV 2023; Zhou et al. AAAI 2022; "
                "BAM, Yang & Kim 2019): the score on the verified cue beside the score on the object masks, and "
                "the model-contrast score (1 is perfect, 0 is a method blind to the model).</p>"]
        if not board.validity.empty:
            part += ["<h3>Verification of the models</h3>", table_html(board.validity)]
        for title, t in board.model_use.items():
            part += [f"<h3>{html.escape(title)}</h3>", table_html(t, index=True)]
        sections.append(("model-use", "What the model uses", part))
    if gallery:
        sections.append(("gallery", "Heatmaps", [_img(p, p.stem.replace("gallery_", "")) for p in png(gallery)]))
    sections.append(("models", "Models", [table_html(_models_table(run, board)), *_applicability(run)]))
    cost = board.cost.pivot_table(index="method", columns=["model", "what"], values="seconds_per_image") \
        if not board.cost.empty else pd.DataFrame()
    if not cost.empty:
        cost.columns = [f"{m} {w}" for m, w in cost.columns]
    sections.append(("cost", "Cost (seconds per image)", [table_html(cost, index=True)]))
    details = ["<h3>Not applicable</h3>", table_html(board.not_applicable)]
    if not board.loc_error.empty:
        details += ["<h3>Localisation error (CAM protocol, top-1 / top-5 at IoU &ge; 0.5)</h3>",
                    table_html(board.loc_error)]
    if board.missing is not None and not board.missing.empty:
        details += ["<h3>Metrics without a rank term</h3>", table_html(board.missing)]
    if not board.skipped.empty:
        details += ["<h3>Skipped images</h3>", table_html(board.skipped)]
    details += [_img(p, "rank agreement between metrics") for p in png(agree)]
    details += ["<h3>Per-metric scores</h3>", table_html(board.metrics.drop(columns=["p_vs_random_raw",
                                                                                  "p_vs_next_raw"], errors="ignore"))]
    sections.append(("details", "Details", details))
    inspection = _inspection(run)
    body = [f"<h1>saliencybench report: {html.escape(run.run_id)}</h1>",
            f"<p class='muted'>data set {html.escape(run.config.dataset)}, {board.info.get('n_images', 0)} images, "
            f"{len(run.config.models)} models, {len(run.config.methods)} methods; started "
            f"{html.escape(str(meta.get('started', '')))}</p>",
            "<div class='summary' id='summary'><b>Summary.</b> " +
            " ".join(html.escape(s) for s in summary_sentences(board) or ["No scored rows yet."]) +
            " <span class='muted'>Ranks: 1 is best; metric ranks averaged per criterion, criteria averaged "
            "overall (LATEC); groups: methods not separable at 0.05.</span></div>",
            "<nav><ul>" + "".join(f"<li><a href='#{i}'>{html.escape(t)}</a></li>" for i, t, _ in sections) +
            ("<li><a href='#inspection'>Model inspection</a></li>" if inspection else "") +
            "<li><a href='#config'>Config</a></li></ul></nav>"]
    for sid, title, part in sections:
        body += [f"<section id='{sid}'><h2>{html.escape(title)}</h2>", *part, "</section>"]
    if inspection:
        body += ["<section id='inspection'><h2>Model inspection</h2><details><summary>show</summary>", inspection,
                 "</details></section>"]
    body += ["<section id='config'><h2>Config</h2><details><summary>show</summary><pre>" +
             html.escape(json.dumps(meta.get("config", {}), indent=2)) + "</pre><pre>" +
             html.escape(json.dumps(meta.get("versions", {}), indent=2)) + "</pre></details></section>"]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>saliencybench report {html.escape(run.run_id)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    path = run.path / "report.html"
    path.write_text(page)
    if run.remote is not None:
        run.remote.push_outputs(run.path)
    return path


def _applicability(run: Run) -> list[str]:
    """Which of the run's methods apply to which of its models (the methods' own checks), with the reasons."""
    from ..methods.applicability import applicability_matrix

    ctx = TaskContext(run.config, run.run_id, run.path)
    try:
        table = applicability_matrix({m: ctx.model(m).model for m in run.config.models}, run.config.methods)
    except SaliencyBenchError as e:
        return [f"<p class='muted'>applicability not computed: {html.escape(str(e))}</p>"]
    reasons = [(method, model, v) for method, row in table.iterrows() for model, v in row.items() if v != "ok"]
    return ["<h3>Which method applies to which model</h3>",
            table_html(table.map(lambda v: "ok" if v == "ok" else "no"), index=True),
            "<ul class='muted'>" + "".join(f"<li>{html.escape(f'{a} on {b}: {v}')}</li>" for a, b, v in reasons) +
            "</ul>"]


def _inspection(run: Run) -> str:
    if not run.config.inspect:
        return ""
    from .inspection import inspection_figures

    try:
        paths, numbers = inspection_figures(run)
    except SaliencyBenchError as e:
        return f"<p class='muted'>inspection skipped: {html.escape(str(e))}</p>"
    return table_html(pd.DataFrame(numbers)) + "".join(_img(p) for p in paths if p.suffix == ".png")
