"""Grid pointing game (Böhle, Fritz, Schiele. Convolutional Dynamic Alignment Networks for
Interpretable Classifications. CVPR 2021; Rao, Böhle, Schiele. Towards Better Understanding
Attribution Methods. CVPR 2022).

Protocol. 2x2 mosaics of four images of four different classes; each cell is explained for
its class; the score of a cell is the share of the map's positive attribution that lies
inside that cell (chance: 0.25; higher is better). Rao et al. build the mosaics from
confidently classified images: ``confident_only=True`` keeps the images the model classifies
as their ground-truth label.

Mosaics (:func:`plan_mosaics`): the eligible images are visited in a seeded random order and
placed first-fit into open groups that lack their class; a group is a mosaic when it has four
images (cell order = order of arrival: top-left, top-right, bottom-left, bottom-right).
``repeats`` independent plans (seeds ``seed``, ``seed + 1``, ...) put each image in up to
``repeats`` mosaics. Per image value: the mean of its cells' scores over the mosaics it sits
in (so an image scores once per mosaic, for its own cell only); NaN for images in no mosaic
(ineligible, or left in an unfilled group). With fewer than 4 eligible classes there is no
mosaic: all values are NaN, with a note.

Mosaic size: ``cell="half"`` (default) shrinks every image to (H/2, W/2) (bilinear,
antialiased) so the mosaic has the model's input size H x W (works for every model, ViTs
included); ``cell="full"`` keeps the images and makes a 2H x 2W mosaic (Böhle et al.'s setting,
for models that accept that size). All mosaic cells are explained in one
:func:`~saliencybench.methods.base.explain` call (4 rows per mosaic).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConstantHeatmapWarning, InvalidInputError, NotApplicableError
from ..methods.base import add_note, explain, generator, get_method
from ..modelutil import model_guard, num_classes
from ..validation import check_images, check_targets
from .base import MetricResult, MetricSpec, ScoreBatch, register_metric

CELLS = ("half", "full")


def plan_mosaics(classes: torch.Tensor, eligible: torch.Tensor, *, repeats: int = 1, seed: int = 0) -> torch.Tensor:
    """Image indices of the mosaics: LongTensor[M,4] (cells in raster order).

    classes LongTensor[B] (the images' labels), eligible bool Tensor[B]. Each of ``repeats``
    plans visits the eligible images in the order ``torch.randperm`` draws from seed
    ``seed + r`` and places each into the first open group without its class; full groups
    (four distinct classes) are the mosaics. A plan's mosaics are disjoint.
    """
    cls = classes.tolist()
    pool = eligible.nonzero().flatten().tolist()
    mosaics: list[list[int]] = []
    for r in range(repeats):
        order = [pool[k] for k in torch.randperm(len(pool), generator=generator(seed + r)).tolist()]
        open_groups: list[list[int]] = []
        for i in order:
            for grp in open_groups:
                if all(cls[j] != cls[i] for j in grp):
                    grp.append(i)
                    if len(grp) == 4:
                        mosaics.append(grp)
                        open_groups.remove(grp)
                    break
            else:
                open_groups.append([i])
    return torch.tensor(mosaics, dtype=torch.long).view(-1, 4)


def make_mosaics(images: torch.Tensor, plan: torch.Tensor, cell: str = "half") -> torch.Tensor:
    """Mosaics Tensor[M,3,H',W'] of images Tensor[B,3,H,W] placed as ``plan`` LongTensor[M,4] says.

    ``cell="half"``: each image resized to (H/2, W/2) (bilinear, antialiased; H and W even),
    mosaic H x W; ``"full"``: mosaic 2H x 2W. Bilinear resizing commutes with the per-channel
    normalisation, so normalised images can be tiled directly.
    """
    if cell not in CELLS:
        raise InvalidInputError(f"cell must be one of {CELLS}, got {cell!r}")
    _, c, h, w = images.shape
    if cell == "half":
        if h % 2 or w % 2:
            raise InvalidInputError(f"cell='half' needs an even image height and width, got {h}x{w}; "
                                    "resize the images or use cell='full'")
        images = F.interpolate(images, size=(h // 2, w // 2), mode="bilinear", align_corners=False, antialias=True)
    tiles = images[plan.to(images.device)]  # [M,4,3,h,w]
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def cell_shares(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive mass inside its cell: maps Tensor[N,2h,2w], cells LongTensor[N]
    (0..3, raster order) -> Tensor[N] in [0,1]; a map without positive mass scores 0 (warned)."""
    n, hh, ww = maps.shape
    quad = maps.double().clamp(min=0).view(n, 2, hh // 2, 2, ww // 2).sum((2, 4)).view(n, 4)
    total = quad.sum(1)
    inside = quad.gather(1, cells.view(-1, 1).to(quad.device)).squeeze(1)
    if (total <= 0).any():
        warnings.warn(f"grid pointing game: {int((total <= 0).sum())} cell maps have no positive attribution; "
                      "they score 0", ConstantHeatmapWarning, stacklevel=3)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def _score(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any]) -> MetricResult:
    """The registry's scorer: the batch's ground-truth ``labels`` (required) and clean ``logits`` when given."""
    if batch.labels is None:
        raise InvalidInputError("grid_pointing_game needs the samples' ground-truth labels (ScoreBatch.labels)")
    out = grid_pointing_game(batch.model, batch.images, batch.labels, batch.method, batch.method_params,
                             batch.logits, **p)
    return MetricResult({spec.name: out.cpu().numpy()})


@register_metric(
    "grid_pointing_game",
    paper="Böhle, Fritz, Schiele. Convolutional Dynamic Alignment Networks for Interpretable Classifications. "
    "CVPR 2021; Rao, Böhle, Schiele. Towards Better Understanding Attribution Methods. CVPR 2022",
    higher_is_better=True, inputs=("method", "labels"), criterion="localisation", heatmap="positive",
    constraints={"cell": CELLS, "repeats": ">=1"}, scorer=_score,
)
def grid_pointing_game(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str,
    method_params: dict[str, Any] | None = None, logits: torch.Tensor | None = None, *, confident_only: bool = True,
    cell: str = "half", repeats: int = 1, seed: int = 0,
) -> torch.Tensor:
    """Grid pointing game score of each image's cell: Tensor[B] in [0,1] (NaN: in no mosaic), higher is better.

    images Tensor[B,3,H,W] normalised for the model, labels LongTensor[B] the ground-truth
    classes (each cell is explained for its label); ``logits`` Tensor[B,C] the clean logits
    (computed when None and ``confident_only``); protocol and parameters as in this module's
    docstring. The model is left unchanged.
    """
    get_method(method)
    images = check_images(images)
    b = images.shape[0]
    labels = check_targets(labels, b, num_classes(model)).to(images.device)
    if cell not in CELLS:
        raise InvalidInputError(f"cell must be one of {CELLS}, got {cell!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidInputError(f"repeats must be an integer >= 1, got {repeats!r}")
    eligible = torch.ones(b, dtype=torch.bool, device=images.device)
    if confident_only:
        if logits is None:
            with model_guard(model), torch.inference_mode():
                logits = model(images)
        if logits.shape[0] != b:
            raise InvalidInputError(f"logits must be a Tensor[B,C] with B = {b}, got {tuple(logits.shape)}")
        eligible = logits.argmax(1).to(images.device) == labels
    values = torch.full((b,), float("nan"), dtype=torch.float64, device=images.device)
    plan = plan_mosaics(labels.cpu(), eligible.cpu(), repeats=repeats, seed=seed)
    if plan.shape[0] == 0:
        n_cls = int(labels[eligible].unique().numel())
        text = (f"grid pointing game: {int(eligible.sum())} eligible images of {n_cls} classes"
                f"{' (correctly classified ones only)' if confident_only else ''} form no 2x2 mosaic of four "
                "different classes; all values are NaN")
        warnings.warn(text, UserWarning, stacklevel=2)
        add_note(text)
        return values.float()
    mosaics = make_mosaics(images, plan, cell)
    rows = plan.flatten().to(images.device)
    try:
        maps = explain(model, mosaics.repeat_interleave(4, 0), labels[rows], method, **dict(method_params or {}))
    except (RuntimeError, AssertionError) as err:
        if cell == "full":
            raise NotApplicableError(f"grid pointing game: the model does not accept the {tuple(mosaics.shape[-2:])} "
                                     f"mosaics of cell='full' ({err}); use cell='half'") from err
        raise
    shares = cell_shares(maps, torch.arange(rows.numel(), device=images.device) % 4)
    total = torch.zeros(b, dtype=torch.float64, device=images.device).index_add_(0, rows, shares)
    count = torch.zeros(b, dtype=torch.float64, device=images.device).index_add_(0, rows, torch.ones_like(shares))
    values = torch.where(count > 0, total / count.clamp(min=1), values)
    return values.float()
