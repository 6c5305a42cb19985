"""Preprocessing protocols: how an image reaches the model and where heatmaps are scored.

- ``squash`` (RISE, Petsiuk et al. 2018): resize to size x size ignoring the aspect
  ratio; ground truth is scaled with it and heatmaps are scored at that size.
- ``shorter_side`` (TorchRay, Fong et al. 2019): resize so the shorter side is
  ``size``, keeping the aspect ratio; the heatmap is resized back and scored at
  the image's original resolution against the original ground truth.
- ``center_crop`` (timm's evaluation transform): resize the shorter side to
  floor(size / crop_pct), then crop the central size x size; ground truth is
  scaled, shifted and clipped to the crop.

Each function takes a :class:`Sample` with image Tensor[3,H,W] in [0,1], boxes
Tensor[N,4] (x1, y1, x2, y2, exclusive) and mask BoolTensor[H,W].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .datasets import Sample

PREPROCESSING = ("squash", "shorter_side", "center_crop")


def _resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (h, w):
        return image
    out = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp(0, 1)


def _resize_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A mask at (h, w): a pixel is in it when its area overlaps the mask (so a small object never vanishes
    when the image shrinks); nearest neighbour when it grows."""
    if tuple(mask.shape) == (h, w):
        return mask
    if h <= mask.shape[0] and w <= mask.shape[1]:
        return F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0] > 0
    return F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].bool()


def _check_ground_truth(sample: Sample, size: tuple[int, int]) -> Sample:
    if not sample.mask.any():
        raise InvalidInputError(f"image {sample.image_id!r}: its ground-truth region is empty at {size[1]}x{size[0]} "
                                "px after preprocessing; the sample is skipped")
    return sample


def preprocess(sample: Sample, size: int, mode: str = "squash", crop_pct: float = 0.875) -> tuple[torch.Tensor, Sample]:
    """(model input Tensor[3,h,w] in [0,1], the sample whose ground truth heatmaps are scored against).

    The model input is size x size except for ``shorter_side``, whose input keeps
    the aspect ratio and whose scored sample is ``sample`` itself (original
    resolution). A ``center_crop`` that cuts every box out of the image raises
    :class:`InvalidInputError`.
    """
    if mode not in PREPROCESSING:
        raise InvalidInputError(f"unknown preprocessing {mode!r}; use one of {PREPROCESSING}")
    h, w = sample.image.shape[-2:]
    if mode == "shorter_side":
        scale = size / min(h, w)
        return (_resize(sample.image, max(1, round(h * scale)), max(1, round(w * scale))),
                _check_ground_truth(sample, (h, w)))
    if mode == "squash":
        scale = torch.tensor([size / w, size / h, size / w, size / h])
        image = _resize(sample.image, size, size)
        return image, _check_ground_truth(Sample(sample.image_id, image, sample.label, sample.boxes * scale,
                                                 _resize_mask(sample.mask, size, size), sample.difficult, sample.meta),
                                          (size, size))
    if not 0 < crop_pct <= 1:
        raise InvalidInputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = math.floor(size / crop_pct)
    scale = short / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (rh - size) // 2, (rw - size) // 2
    image = _resize(sample.image, rh, rw)[:, top : top + size, left : left + size]
    mask = _resize_mask(sample.mask, rh, rw)[top : top + size, left : left + size]
    boxes = sample.boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h]) - torch.tensor([left, top, left, top])
    boxes = boxes.clamp(min=0, max=size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.any():
        raise InvalidInputError(
            f"image {sample.image_id!r}: the central crop cuts every object box out; use preprocess 'squash' or "
            "'shorter_side' for this data set"
        )
    return image, _check_ground_truth(Sample(sample.image_id, image, sample.label, boxes[keep], mask, sample.difficult,
                                             sample.meta), (size, size))
