"""Model-inspection figures for a run's report, when its config asks (``inspect: [...]``).

``filters`` (first-layer filters), ``activations`` (the top-k images of the
deepest feature stage's most active channel, cropped to its receptive field),
``class-visualisation`` (one regularised gradient-ascent image per class),
``neighbours`` (feature vs pixel nearest neighbours, with class agreement) and
``tsne`` (with trustworthiness), one set per model, on the run's data set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .. import inspect as ins
from .execute import TaskContext
from .runner import Run

INSPECTIONS = ("filters", "activations", "class-visualisation", "neighbours", "tsne")


def deepest_stage(model: torch.nn.Module) -> str:
    """Name of the module giving the last feature stage (timm's ``feature_info``)."""
    info = getattr(model, "feature_info", None)
    names = [f["module"] for f in info] if isinstance(info, list) else []
    if not names:
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        names = convs[-1:]
    return names[-1]


def inspection_figures(run: Run, k: int = 5, limit: int = 200) -> tuple[list[Path], list[dict[str, Any]]]:
    """Write the requested inspection figures under ``<run>/plots/inspect``: (paths, numbers)."""
    out = run.path / "plots" / "inspect"
    ctx = TaskContext(dataclasses.replace(run.config, device="cpu"), run.run_id)  # the inspect tools run on CPU
    paths: list[Path] = []
    numbers: list[dict[str, Any]] = []
    for name in run.config.models:
        bundle = ctx.model(name)
        model_out = out / name
        model_out.mkdir(parents=True, exist_ok=True)
        if "filters" in run.config.inspect:
            paths.append(ins.write_filters(ins.filter_grid(bundle.model), model_out, f"{name}: first-layer filters"))
        size = run.config.image_size or bundle.input_size
        if "activations" in run.config.inspect:
            layer = deepest_stage(bundle.model)
            images, _, _ = ins.dataset_tensors(ctx.dataset, size=size, limit=limit)
            with torch.inference_mode():
                acts = ins.layer_activations(bundle.model.eval(), bundle.normalise(images[:64]), layer)
            channel = int(acts.amax((2, 3)).mean(0).argmax())
            tops, rf = ins.top_activating(bundle.model, ctx.dataset, layer, channel, k=8, transform=bundle.normalise,
                                          size=size, limit=limit)
            numbers.append({"model": name, "measure": f"receptive field of {layer} (px)", "value": float(rf.size[0])})
            paths.append(ins.write_top_activating(tops, model_out, f"{name}: {layer} channel {channel}",
                                                  classes=bundle.classes))
        if "class-visualisation" in run.config.inspect:
            for target, cls in enumerate(bundle.classes[:12]):
                vis = ins.class_visualisation(bundle.model, target, steps=60, seed=run.config.seed, size=size,
                                              mean=bundle.mean, std=bundle.std)
                numbers.append({"model": name, "measure": f"class visualisation score gain, {cls}",
                                "value": float(vis.final_score - vis.initial_score)})
                paths.append(ins.write_class_visualisation(vis, model_out / f"class_{target}", f"{name}: {cls}"))
        if not {"neighbours", "tsne"} & set(run.config.inspect):
            continue
        images, labels, _ = ins.dataset_tensors(ctx.dataset, size=size, limit=limit)
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
