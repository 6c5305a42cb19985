"""Sliding-window geometry shared by occlusion (:mod:`.perturbation`) and its incremental
computation (:mod:`.incremental`): the default window, the window positions, the checks.

Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014 (the
occluding square); the positions follow Captum's ``Occlusion``.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidInputError


def default_occlusion_window(height: int, width: int, per_side: float = 14.0) -> tuple[int, int]:
    """Default occlusion window and stride: window = round(min(H,W) / per_side), stride = window // 2.

    (``per_side`` 14: 16 and 8 at 224 px, as Zeiler & Fergus' patch of about 1/14 of the
    image; 8 and 4 at 112 px.) The number of window positions, about (2 per_side - 1)^2,
    does not depend on the image size: ``per_side`` is a cost budget that scales.
    """
    window = max(1, round(min(height, width) / per_side))
    return window, max(1, window // 2)


def window_starts(size: int, window: int, stride: int) -> torch.Tensor:
    """Start offsets of a window sliding over ``size`` pixels, Captum's convention.

    ceil((size - window) / stride) + 1 positions at multiples of ``stride``; the
    last window may be cut off by the border, so every pixel is covered.
    """
    n = math.ceil((size - window) / stride) + 1
    return torch.arange(n) * stride


def resolve_window(height: int, width: int, window: int | None, stride: int | None) -> tuple[int, int]:
    """``(window, stride)`` for ``height`` x ``width`` images: the defaults of
    :func:`default_occlusion_window` where ``None``; raises :class:`InvalidInputError`
    unless 1 <= window <= min(H, W) and 1 <= stride <= window."""
    dw, ds = default_occlusion_window(height, width)
    window = dw if window is None else int(window)
    stride = ds if stride is None else int(stride)
    if not 1 <= window <= min(height, width):
        raise InvalidInputError(
            f"occlusion window must be in [1, {min(height, width)}] for {height}x{width} images, got {window}")
    if not 1 <= stride <= window:
        raise InvalidInputError(f"occlusion stride must be in [1, window={window}], got {stride}")
    return window, stride
