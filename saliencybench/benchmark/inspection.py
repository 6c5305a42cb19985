"""Model-inspection figures for a run's report, when its config asks (``inspect: [...]``).

``filters`` (first-layer filters), ``neighbours`` (feature vs pixel nearest
neighbours, with class agreement) and ``tsne`` (with trustworthiness), one set
per model of the run, on the run's data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import inspect as ins
from .runner import Run, TaskContext

INSPECTIONS = ("filters", "neighbours", "tsne")


def inspection_figures(run: Run, k: int = 5, limit: int = 200) -> tuple[list[Path], list[dict[str, Any]]]:
    """Write the requested inspection figures under ``<run>/plots/inspect``: (paths, numbers)."""
    out = run.path / "plots" / "inspect"
    ctx = TaskContext(run.config, run.run_id)
    paths: list[Path] = []
    numbers: list[dict[str, Any]] = []
    for name in run.config.models:
        bundle = ctx.model(name)
        model_out = out / name
        model_out.mkdir(parents=True, exist_ok=True)
        if "filters" in run.config.inspect:
            paths.append(ins.write_filters(ins.filter_grid(bundle.model), model_out, f"{name}: first-layer filters"))
        if not {"neighbours", "tsne"} & set(run.config.inspect):
            continue
        images, labels, _ = ins.dataset_tensors(ctx.dataset, size=run.config.image_size or bundle.input_size,
                                                limit=limit)
        if len(images) < 6:
            numbers.append({"model": name, "measure": "neighbours and t-SNE skipped: fewer than 6 images",
                            "value": float(len(images))})
            continue
        k = min(k, len(images) - 1)
        with torch.inference_mode():
            feats = ins.penultimate_features(bundle.model.eval(), bundle.normalise(images))
        if "neighbours" in run.config.inspect:
            everyone = torch.arange(len(images))
            fnn, _ = ins.nearest_neighbours(feats, feats, k, "cosine", exclude=everyone)
            pnn, _ = ins.nearest_neighbours(ins.pixel_features(images), ins.pixel_features(images), k, "euclidean",
                                            exclude=everyone)
            numbers.append({"model": name, "measure": f"class agreement of {k} nearest neighbours, features",
                            "value": ins.class_agreement(fnn, labels, labels)})
            numbers.append({"model": name, "measure": f"class agreement of {k} nearest neighbours, pixels",
                            "value": ins.class_agreement(pnn, labels, labels)})
            q = torch.arange(min(6, len(images)))
            paths.append(ins.write_neighbours(images[q], images, fnn[q], pnn[q], labels[q], labels, model_out,
                                              classes=bundle.classes, title=f"{name}: features vs pixels"))
        if "tsne" in run.config.inspect:
            emb, trust = ins.tsne_embedding(feats, seed=run.config.seed)
            numbers.append({"model": name, "measure": "t-SNE trustworthiness", "value": trust})
            paths += ins.write_tsne(emb, labels, model_out, classes=bundle.classes, images=images,
                                    title=f"{name}: t-SNE of penultimate features")
    return paths, numbers
