"""Model contrast score (Yang & Kim, BAM, 2019): does a method's map change with what the model uses?

Two models see the same images (``synthetic-contrast``): model A was trained on the
object's label, model B on the background texture's label, so A relies on the object and
B does not (checked by the intervention record of
:mod:`saliencybench.benchmark.cue_models`). A method that explains the models puts more
of A's map on the object than of B's; a method blind to the model (an edge detector)
gives the same map for both and scores 0.

Per image: ``object_attribution(map_A) - object_attribution(map_B)`` with

- ``measure="share"`` (default): the share of the map's positive mass on the object,
  ``sum(relu(h) * mask) / sum(relu(h))`` (:func:`~saliencybench.metrics.pointing.energy_pointing_game`),
  in [0, 1], so the contrast lies in [-1, 1]; an oracle that returns the object mask for A
  and the background mask for B scores 1;
- ``measure="bam"``: BAM's own object attribution (``bim/attributions.py``): the map's
  positive part rescaled by ``(h - min) / (p99 - min)`` clipped to [0, 1], averaged over the
  object's pixels. A map whose 99th percentile equals its minimum gives 0.

The data-set score (:func:`model_contrast_score`) is the mean over the images both models
classify correctly (BAM's ``MCS`` keeps only those).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..errors import ConstantHeatmapWarning, InvalidInputError, NotApplicableError
from .base import MetricResult, MetricSpec, ScoreBatch, register_metric
from .pointing import _checked, energy_pointing_game

MEASURES = ("share", "bam")


def bam_object_attribution(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BAM's object attribution: Tensor[B], the mean over each mask of the rescaled positive map.

    heatmaps Tensor[B,H,W], masks bool Tensor[B,H,W]. Per map: ``p = relu(h)``, then
    ``clip((p - min p) / (q99(p) - min p), 0, 1)`` (q99: numpy's default linear 99th
    percentile, as BAM's ``visualize_pos_attr``), averaged over the mask's pixels
    (``single_attr``). A map with ``q99 == min`` scores 0 and warns.
    """
    heatmaps, masks = _checked(heatmaps, masks)
    pos = heatmaps.clamp(min=0).double().flatten(1)
    lo = pos.amin(1, keepdim=True)
    hi = torch.quantile(pos, 0.99, dim=1, keepdim=True, interpolation="linear")
    flat = (hi - lo <= 0).flatten().nonzero().flatten().tolist()
    if flat:
        warnings.warn(f"heatmaps of samples {flat} have a 99th percentile equal to their minimum; their BAM object "
                      "attribution is 0", ConstantHeatmapWarning, stacklevel=2)
    scaled = torch.where(hi > lo, ((pos - lo) / (hi - lo).clamp(min=1e-300)).clamp(0, 1), torch.zeros_like(pos))
    m = masks.flatten(1).double()
    return ((scaled * m).sum(1) / m.sum(1)).float()


def object_attribution(heatmaps: torch.Tensor, masks: torch.Tensor, measure: str = "share") -> torch.Tensor:
    """Attribution on the object Tensor[B]: ``"share"`` (energy pointing game) or ``"bam"`` (BAM's mean)."""
    if measure == "share":
        return energy_pointing_game(heatmaps, masks)
    if measure == "bam":
        return bam_object_attribution(heatmaps, masks)
    raise InvalidInputError(f"unknown measure {measure!r}; use one of {MEASURES}")


def _scorer(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any]) -> MetricResult:
    """Score a batch of model A (object masks) against ``batch.contrast``: the same images under model B.

    The runner attaches B's :class:`ScoreBatch` (same images, same order, B's maps of B's
    targets) as ``batch.contrast``; images either model misclassifies (``logits`` vs
    ``labels``, where both are given) score NaN, which the mean leaves out.
    """
    other = getattr(batch, "contrast", None)
    if not isinstance(other, ScoreBatch):
        raise NotApplicableError(
            "model_contrast compares two models' maps of the same images: score it on the object model's batch "
            "with the background model's batch of the same images attached as batch.contrast (synthetic-contrast, "
            "models contrast-object-* and contrast-background-*)")
    if len(other.masks) != len(batch.masks) or other.heatmaps.shape != batch.heatmaps.shape:
        raise InvalidInputError(f"batch.contrast holds {len(other.masks)} maps of shape {tuple(other.heatmaps.shape)}, "
                                f"the batch {len(batch.masks)} of shape {tuple(batch.heatmaps.shape)}: both must be "
                                "the same images in the same order")
    heat_a, heat_b = batch.scored_heatmaps(), other.scored_heatmaps()
    values = np.full(len(heat_a), np.nan)
    keep = np.ones(len(heat_a), dtype=bool)
    correct_only = p.pop("correct_only", True)
    for b in (batch, other) if correct_only else ():
        if b.logits is not None and b.labels is not None:
            keep &= (b.logits.argmax(1).cpu() == b.labels.cpu()).numpy()
    for members in batch.shape_groups():
        idx = [i for i in members if keep[i]]
        if not idx:
            continue
        out = model_contrast(torch.stack([heat_a[i] for i in idx]), torch.stack([heat_b[i] for i in idx]),
                             torch.stack([batch.masks[i].cpu() for i in idx]), **p)
        values[idx] = out.double().numpy()
    return MetricResult({spec.name: values})


@register_metric(
    "model_contrast",
    paper="Yang, Kim. Benchmarking Attribution Methods with Relative Feature Importance (BAM). arXiv 1907.09701, "
    "2019 (model contrast score)",
    higher_is_better=True,
    inputs=("masks", "pair"),
    criterion="model_use",
    value_range=(-1.0, 1.0),
    heatmap="as_is",
    constraints={"measure": MEASURES},
    scorer=_scorer,
)
def model_contrast(heat_a: torch.Tensor, heat_b: torch.Tensor, object_masks: torch.Tensor, *,
                   measure: str = "share", correct_only: bool = True) -> torch.Tensor:
    """Per-image model contrast Tensor[B] in [-1, 1]: object attribution under model A minus under model B.

    ``heat_a`` Tensor[B,H,W]: the method's maps for the model that uses the object
    (explaining its class), ``heat_b`` Tensor[B,H,W]: the maps of the same images for the
    model that does not (explaining its class), ``object_masks`` bool Tensor[B,H,W].
    ``measure`` as :func:`object_attribution`. 1: all of A's positive mass on the object
    and none of B's; 0: the same attribution under both (a method blind to the model).
    ``correct_only``: in a run, score only the images both models classify correctly (BAM's
    filter; the others score NaN); this function itself scores every image it is given.
    """
    if not isinstance(heat_a, torch.Tensor) or not isinstance(heat_b, torch.Tensor) or heat_a.shape != heat_b.shape:
        raise InvalidInputError(
            f"heat_a and heat_b must be Tensors[B,H,W] of the same shape (the two models' maps of the same images), "
            f"got {getattr(heat_a, 'shape', type(heat_a).__name__)} and "
            f"{getattr(heat_b, 'shape', type(heat_b).__name__)}")
    return object_attribution(heat_a, object_masks, measure) - object_attribution(heat_b, object_masks, measure)


def model_contrast_score(heat_a: torch.Tensor, heat_b: torch.Tensor, object_masks: torch.Tensor, *,
                         correct: torch.Tensor | None = None, measure: str = "share") -> dict[str, float]:
    """BAM's model contrast score of a data set: ``{"model_contrast": mean, "n_images": n}``.

    The mean of :func:`model_contrast` over the images where ``correct`` (bool Tensor[B]:
    both models classify the image correctly, BAM's filter) is True, all images when it is
    None; NaN when no image is kept.
    """
    values = model_contrast(heat_a, heat_b, object_masks, measure=measure)
    if correct is not None:
        correct = torch.as_tensor(correct, dtype=torch.bool, device=values.device)
        if correct.shape != values.shape:
            raise InvalidInputError(f"correct must be a bool Tensor[{values.shape[0]}], got {tuple(correct.shape)}")
        values = values[correct]
    n = int(values.numel())
    return {"model_contrast": float(values.double().mean()) if n else float("nan"), "n_images": n}
