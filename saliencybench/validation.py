"""Input checks shared by methods and metrics.

Each check raises :class:`~saliencybench.errors.InvalidInputError` with a message
that names the argument, what was expected, what was given and how to fix it.
"""

from __future__ import annotations

import warnings

import torch

from .errors import BoxClippedWarning, InvalidInputError


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite. A NaN or infinity makes the sum non-finite, so a finite
    sum (one reduction, no mask) answers at once; only a non-finite sum (a bad value, or finite values
    whose sum overflows) runs the elementwise check."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_images(images: object) -> torch.Tensor:
    """Check ``images`` is a floating Tensor[B,3,H,W] with B >= 1 and finite values."""
    if not isinstance(images, torch.Tensor):
        raise InvalidInputError(
            f"images must be a torch.Tensor of shape [B,3,H,W], got {type(images).__name__}; "
            "convert with torch.as_tensor(...) and normalise for the model first"
        )
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise InvalidInputError(
            f"images must have shape [B,3,H,W] with B >= 1, got {tuple(images.shape)}{hint}"
        )
    if not images.is_floating_point():
        raise InvalidInputError(
            f"images must be a floating tensor normalised for the model, got dtype {images.dtype}; "
            "use images.float() and apply the model's mean/std normalisation"
        )
    if images.is_meta:
        raise InvalidInputError("images are on the 'meta' device (no data); create them on 'cpu' or 'cuda'")
    if not all_finite(images):
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"images contain NaN or infinite values in samples {bad}")
    return images


def check_model_inputs(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Check ``images`` have the dtype and device of ``model``'s weights (a clear error instead of torch's)."""
    p = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if p is None:
        return
    if p.is_meta:
        raise InvalidInputError("the model's weights are on the 'meta' device (not loaded); load weights first, "
                                "e.g. model.to_empty(device='cpu') then load_state_dict")
    if p.device != images.device:
        raise InvalidInputError(f"images are on {images.device} but the model is on {p.device}; move one of them "
                                f"(images.to('{p.device}') or model.to('{images.device}'))")
    if p.dtype != images.dtype:
        raise InvalidInputError(f"images are {images.dtype} but the model's weights are {p.dtype}; use "
                                f"images.to({p.dtype}) or model.to({images.dtype})")


def check_targets(targets: object, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Check ``targets`` is an integer Tensor[B] (or a list of ints) within ``num_classes``."""
    if isinstance(targets, int):
        targets = [targets] * batch
    targets = torch.as_tensor(targets)
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise InvalidInputError(f"targets must be integer class indices, got dtype {targets.dtype}")
    targets = targets.long().flatten() if targets.ndim == 0 else targets.long()
    if targets.ndim != 1 or targets.shape[0] != batch:
        raise InvalidInputError(
            f"targets must be a LongTensor[B] with one class per image (B={batch}), "
            f"got shape {tuple(targets.shape)}"
        )
    if num_classes is not None:
        bad = ((targets < 0) | (targets >= num_classes)).nonzero().flatten().tolist()
        if bad:
            raise InvalidInputError(
                f"targets out of range [0, {num_classes}) for the model's {num_classes} classes "
                f"at samples {bad}: values {targets[bad].tolist()}"
            )
    return targets


def check_heatmaps(heatmaps: object, images_or_shape: torch.Tensor | tuple[int, ...]) -> torch.Tensor:
    """Check ``heatmaps`` is a finite float Tensor[B,H,W] matching the images (or a shape)."""
    if isinstance(images_or_shape, torch.Tensor):
        b, _, h, w = images_or_shape.shape
    else:
        b, h, w = images_or_shape
    if not isinstance(heatmaps, torch.Tensor):
        raise InvalidInputError(f"heatmaps must be a torch.Tensor[B,H,W], got {type(heatmaps).__name__}")
    if heatmaps.ndim == 4 and heatmaps.shape[1] == 1:
        heatmaps = heatmaps[:, 0]
    if tuple(heatmaps.shape) != (b, h, w):
        raise InvalidInputError(
            f"heatmaps must have shape [B,H,W] = {(b, h, w)} to match the images, "
            f"got {tuple(heatmaps.shape)}; upsample them to the input resolution first"
        )
    heatmaps = heatmaps.float()
    finite = torch.isfinite(heatmaps).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise InvalidInputError(
            f"heatmaps contain NaN or infinite values in samples {bad}; "
            "fix the method producing them (or replace them with torch.nan_to_num)"
        )
    return heatmaps


def check_masks(masks: object, heatmaps: torch.Tensor) -> torch.Tensor:
    """Check ``masks`` is a Tensor[B,H,W] (bool or 0/1) of the heatmaps' shape; return bool."""
    if not isinstance(masks, torch.Tensor):
        raise InvalidInputError(f"masks must be a bool torch.Tensor[B,H,W], got {type(masks).__name__}")
    if tuple(masks.shape) != tuple(heatmaps.shape):
        raise InvalidInputError(
            f"masks must have the heatmaps' shape {tuple(heatmaps.shape)}, got {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise InvalidInputError("masks must be boolean (or 0/1 valued); threshold them first")
        masks = masks.bool()
    return masks.to(heatmaps.device)


def clip_boxes(boxes: torch.Tensor, height: int, width: int, source: str, tolerance: float = 0.0) -> torch.Tensor:
    """Clip boxes Tensor[n,4] (x1, y1, x2, y2) to an image of ``height`` x ``width``.

    Warns :class:`BoxClippedWarning` naming ``source`` when a box reaches more than
    ``tolerance`` pixels outside; raises :class:`InvalidInputError` when a box lies
    entirely outside (nothing left after clipping).
    """
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    moved = (clipped - boxes).abs().amax(1) > tolerance
    if moved.any():
        warnings.warn(BoxClippedWarning(
            f"{source}: box(es) {boxes[moved].tolist()} reach outside the {width}x{height} image; clipped to it"),
            stacklevel=3)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        raise InvalidInputError(
            f"{source}: box(es) {boxes[empty].tolist()} lie entirely outside the {width}x{height} image")
    return clipped


def check_boxes(boxes: object, batch: int, height: int, width: int) -> list[torch.Tensor]:
    """Check a list of B float Tensors[n_i,4] of ``(x1, y1, x2, y2)`` boxes, x2/y2 exclusive.

    Boxes reaching outside the image are clipped with a :class:`BoxClippedWarning`;
    degenerate boxes (x2 <= x1 or y2 <= y1, also after clipping) and empty lists are errors.
    """
    if isinstance(boxes, torch.Tensor) and boxes.ndim == 3:
        boxes = list(boxes)
    if not isinstance(boxes, (list, tuple)) or len(boxes) != batch:
        got = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise InvalidInputError(f"boxes must be a list of {batch} Tensors[n_i,4] (one per image), got {got}")
    out = []
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32)
        if b.ndim == 1 and b.numel() == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4:
            raise InvalidInputError(f"boxes[{i}] must have shape [n,4] as (x1, y1, x2, y2), got {tuple(b.shape)}")
        if b.shape[0] == 0:
            raise InvalidInputError(f"boxes[{i}] is empty: every image needs at least one ground-truth box")
        if not torch.isfinite(b).all():
            raise InvalidInputError(f"boxes[{i}] contains NaN or infinite coordinates")
        if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
            raise InvalidInputError(
                f"boxes[{i}] has a box with x2 <= x1 or y2 <= y1: {b.tolist()}; boxes are "
                "(x1, y1, x2, y2) with x2, y2 exclusive (VOC's 1-based inclusive xmax needs no +1 after x1-1)"
            )
        out.append(clip_boxes(b, height, width, f"boxes[{i}]"))
    return out
