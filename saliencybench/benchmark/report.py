"""The run's outputs: leaderboard files, plots and one self-contained HTML report.

Every text written into the HTML is escaped (``html.escape``; tables through
``DataFrame.to_html(escape=True)``); figures are embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd
import torch

from . import plots
from ..errors import SaliencyBenchError
from .execute import TaskContext
from .leaderboard import leaderboard, localisation_error, model_accuracy, not_applicable, summary, to_markdown
from .runner import Run, open_run


def write_leaderboard(run: Run) -> tuple[pd.DataFrame, Path]:
    """Compute the leaderboard; save CSV and Markdown under ``<run>/``; return it and the CSV path."""
    rows = run.results
    board = leaderboard(rows, metric_params=run.config.metric_params)
    if board.empty:
        board = pd.DataFrame({"note": ["no scored rows yet: the run has not finished a score task"]})
    board.to_csv(run.path / "leaderboard.csv")
    loc = localisation_error(rows)
    acc = model_accuracy(rows)
    na = not_applicable(rows)
    text = ["# Leaderboard", "", "mean [95% bootstrap CI]; ranks in each metric's direction; n/a = not applicable",
            "", to_markdown(board), "", "## Localisation error (CAM protocol, IoU >= 0.5)", "", to_markdown(loc),
            "", "## Model accuracy on the run's images", "", to_markdown(acc), "", "## Not applicable", "",
            to_markdown(na) if not na.empty else "none"]
    (run.path / "leaderboard.md").write_text("\n".join(text) + "\n")
    summary(rows).to_csv(run.path / "summary.csv", index=False)
    loc.to_csv(run.path / "localisation_error.csv", index=False)
    return board, run.path / "leaderboard.csv"


def _gallery(run: Run, rows: pd.DataFrame, out: Path) -> list[Path]:
    """Gallery of the first images of each model, read from the run's heatmap store."""
    from .store import HeatmapStore

    store = HeatmapStore(run.path)
    if not store.keys():
        return []
    cfg = run.config
    ctx = TaskContext(cfg, run.run_id, run.path)
    paths: list[Path] = []
    for model in cfg.models:
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for method in cfg.methods:
            try:
                ids, heat = run.heatmaps(model, method)
            except SaliencyBenchError:
                continue
            maps[method] = dict(zip(ids, heat))
        if not maps:
            continue
        first = next(iter(maps.values()))
        ids = [i for i in list(first)[: cfg.gallery_images] if all(i in m for m in maps.values())]
        samples = {}
        for i in range(min(len(ctx.dataset), 4 * max(1, cfg.gallery_images) + 16)):
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
        images, boxes = [], []
        for i in ids:
            s = samples[i]
            hh, ww = s.image.shape[-2:]
            images.append(torch.nn.functional.interpolate(s.image[None], size=size, mode="bilinear")[0])
            boxes.append(s.boxes * torch.tensor([size[1] / ww, size[0] / hh, size[1] / ww, size[0] / hh]))
        heat = {m: torch.stack([v[i] if tuple(v[i].shape) == size else torch.nn.functional.interpolate(
            v[i][None, None], size=size, mode="bilinear")[0, 0] for i in ids]) for m, v in maps.items()}
        paths += plots.gallery(torch.stack(images), boxes, heat, ids, out, f"gallery_{model}")
    return paths


def make_plots(run: Run) -> dict[str, list[Path]]:
    """All figures of a run under ``<run>/plots/``: {section: [png, svg, ...]}."""
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    rows = run.results
    agree_paths, _ = plots.rank_agreement(rows, out)
    return {
        "Metrics": plots.metric_bars(rows, out),
        "Deletion and insertion curves": plots.perturbation_curves(rows, out),
        "Gallery (ground-truth boxes in green)": _gallery(run, rows, out),
        "Sanity check: model randomisation": plots.sanity_curves(rows, out),
        "Rank agreement between metrics": agree_paths,
    }


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(escape=True, na_rep="", border=0, classes="table")


def write_report(run: Run | str | Path) -> Path:
    """Write ``<run>/report.html``: leaderboard, tables, plots, gallery, config, environment."""
    run = run if isinstance(run, Run) else open_run(run)
    board, _ = write_leaderboard(run)
    rows = run.results
    figures = make_plots(run)
    meta = json.loads((run.path / "config.json").read_text())
    models = json.loads((run.path / "models.json").read_text()) if (run.path / "models.json").exists() else {}
    skipped = rows[rows.metric == "skipped_image"][["image_id", "note"]] if not rows.empty else pd.DataFrame()
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>saliencybench report {html.escape(run.run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style></head><body>",
        f"<h1>saliencybench report: {html.escape(run.run_id)}</h1>",
        "<p>Means with 95% bootstrap confidence intervals; ranks follow each metric's direction "
        "(deletion and the sanity similarity: lower is better). n/a: the method does not apply to the model.</p>",
        "<h2>Leaderboard</h2>", _table(board),
        "<h2>Localisation error (top-1 / top-5, IoU &ge; 0.5)</h2>", _table(localisation_error(rows)),
        "<h2>Models</h2>", _table(model_accuracy(rows).reset_index()),
        "<pre>" + html.escape(json.dumps(models, indent=2, default=str)) + "</pre>",
        "<h2>Not applicable</h2>", _table(not_applicable(rows)),
    ]
    for title, paths in figures.items():
        pngs = [p for p in paths if p.suffix == ".png"]
        if pngs:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            parts += [_img(p) for p in pngs]
    if run.config.inspect:
        from .inspection import inspection_figures

        paths, numbers = inspection_figures(run)
        parts += ["<h2>Model inspection</h2>", _table(pd.DataFrame(numbers))]
        parts += [_img(p) for p in paths if p.suffix == ".png"]
    if not skipped.empty:
        parts += ["<h2>Skipped images</h2>", _table(skipped)]
    parts += ["<h2>Config</h2>", "<pre>" + html.escape(json.dumps(meta["config"], indent=2)) + "</pre>",
              "<h2>Environment</h2>", "<pre>" + html.escape(json.dumps(meta.get("versions", {}), indent=2)) + "</pre>",
              "</body></html>"]
    path = run.path / "report.html"
    path.write_text("\n".join(parts))
    return path
