"""Perturbation methods: occlusion (sliding window) and RISE (random masks).

Both are batched over (image, perturbation) jobs, ``batch_size`` images per
forward pass, build their perturbed inputs on the device without Python loops
over pixels, and score the clean images once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..modelutil import (autocast, fast_inference, resolve_batch_size, safe_forward, target_score,
                         upcast)
from .base import add_note, batch_slices, generator, register_method, report_progress
from .incremental import incremental_occlusion
from .windows import default_occlusion_window, window_starts


# incremental=None: measured on 2 CPU cores, exact incremental occlusion beat full forward
# passes where it cut the convolution work to at most ~0.6 (resnet18, resnet50 and
# mobilenetv2_100 at 224 px: 0.48-0.57, 2.4-4.4x per window), not on 64 px or 112 px images
# (the default models at 64 px and resnet18 at 112 px: 0.63-0.78, 0.6-1.5x end to end with
# the planning).
AUTO_MIN_PIXELS = 128 * 128
AUTO_MAX_FLOP_RATIO = 0.6


@register_method(
    "occlusion",
    paper="Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014",
    family="perturbation",
    needs_grad=False,
    scaled=lambda h, w, p: dict(zip(("window", "stride"), default_occlusion_window(h, w, p["windows_per_side"]))),
    constraints={"window": ">=1", "stride": ">=1", "windows_per_side": ">=1", "batch_size": ">=1", "score": ("logit", "probability",
                                                                                 "log_probability"),
                 "sign": ("signed", "abs", "positive")},
    signed=True,
)
def occlusion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, window: int | None = None,
    stride: int | None = None, windows_per_side: float = 14.0, baseline: float = 0.0, score: str = "logit", batch_size: int = 64,
    incremental: bool | None = None, sign: str = "signed",
) -> torch.Tensor:
    """Occlusion: mean over the windows covering a pixel of score(clean) - score(occluded).

    A ``window`` x ``window`` square filled with ``baseline`` (all channels) slides
    with ``stride``; defaults from :func:`default_occlusion_window` (window = min(H, W) /
    ``windows_per_side``, stride = window // 2, so the cost scales with nothing but that budget). Equal to
    ``captum.attr.Occlusion`` with sliding_window_shapes=(3,w,w), strides=(3,s,s).
    Forward passes: B x (number of windows) + B. Returns Tensor[B,H,W].

    ``incremental``: recompute per window only the changed region of each feature
    map (:mod:`.incremental`, exact up to rounding). ``None``: for images of at least
    ``AUTO_MIN_PIXELS`` pixels when the model splits into local stages and the plan
    needs at most ``AUTO_MAX_FLOP_RATIO`` of the convolution work of full forward
    passes; ``False``: full forward passes; ``True``: always, raising
    :class:`NotApplicableError` with the reason when impossible. Either way, a failure of
    the incremental computation falls back to full forward passes. The path taken is
    left as a note (:func:`~.base.collect_notes`; the runner puts it in the rows).

    ``sign``: the map is signed by definition and stays so by default (``"signed"``;
    negative where occluding raises the score); ``"abs"`` takes its magnitude,
    ``"positive"`` max(0, map).
    """
    finish = {"signed": lambda m: m, "abs": torch.abs, "positive": torch.relu}.get(sign)
    if finish is None:
        raise InvalidInputError(f"unknown occlusion sign {sign!r}; use 'signed', 'abs' or 'positive'")
    b, _, h, w = images.shape
    dw, ds = default_occlusion_window(h, w, windows_per_side)
    window = dw if window is None else int(window)
    stride = ds if stride is None else int(stride)
    if not 1 <= window <= min(h, w):
        raise InvalidInputError(f"occlusion window must be in [1, {min(h, w)}] for {h}x{w} images, got {window}")
    if not 1 <= stride <= window:
        raise InvalidInputError(f"occlusion stride must be in [1, window={window}], got {stride}")
    if incremental is None and h * w < AUTO_MIN_PIXELS:
        add_note(f"full forward passes: incremental occlusion is tried from {AUTO_MIN_PIXELS} pixels up "
                 f"(these images have {h * w}); below, planning and crops cost more than they save")
    elif incremental is not False:
        heat, note = incremental_occlusion(model, images, targets, window=window, stride=stride, baseline=baseline,
                                           score=score, batch_size=batch_size, strict=bool(incremental),
                                           max_flop_ratio=None if incremental else AUTO_MAX_FLOP_RATIO)
        add_note(note)
        return finish(heat)
    dev = images.device
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    ys, xs = window_starts(h, window, stride).to(dev), window_starts(w, window, stride).to(dev)
    row_masks = (rows[None] >= ys[:, None]) & (rows[None] < ys[:, None] + window)  # [ny,H]
    col_masks = (cols[None] >= xs[:, None]) & (cols[None] < xs[:, None] + window)  # [nx,W]
    n_win = len(ys) * len(xs)
    counts = row_masks.sum(0).float()[:, None] * col_masks.sum(0).float()[None, :]
    heat = torch.zeros(b, h, w, device=dev, dtype=torch.float32)
    jobs = b * n_win
    fill = torch.as_tensor(baseline, dtype=images.dtype, device=dev)
    with fast_inference(model, images) as fmt:
        source = fmt(images)
        clean = torch.cat([
            target_score(model(source[sl]), targets[sl], score) for sl in batch_slices(b, batch_size)
        ])
        buffer = fmt(torch.empty(min(batch_size, jobs), *images.shape[1:], device=dev, dtype=images.dtype))
        for sl in batch_slices(jobs, batch_size):
            report_progress(sl.start, jobs)
            job = torch.arange(sl.start, sl.stop, device=dev)
            img, win = job // n_win, job % n_win
            mask = row_masks[win // len(xs)][:, :, None] & col_masks[win % len(xs)][:, None, :]  # [n,H,W]
            x = buffer[: len(job)]
            for i in img.unique().tolist():  # the jobs of one image are adjacent
                at = (img == i).nonzero().flatten()
                seg = slice(int(at[0]), int(at[-1]) + 1)
                torch.where(mask[seg, None], fill, source[i : i + 1], out=x[seg])
            delta = (clean[img] - target_score(model(x), targets[img], score)).float()
            heat.index_add_(0, img, delta[:, None, None] * mask)
    return finish(heat / counts)


def rise_masks(
    n_masks: int, height: int, width: int, grid_size: int, keep_prob: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE's random grids and shifts, drawn from ``seed``: ``(grids[N,s,s], shifts[N,2])``.

    Materialise masks with :func:`rise_mask_batch`; drawing all grids first keeps
    the masks identical whatever batch size renders them.
    """
    g = generator(seed)
    grids = (torch.rand(n_masks, grid_size, grid_size, generator=g) < keep_prob).float()
    cell_h, cell_w = math.ceil(height / grid_size), math.ceil(width / grid_size)
    shifts = torch.stack(
        [torch.randint(0, cell_h, (n_masks,), generator=g), torch.randint(0, cell_w, (n_masks,), generator=g)], 1
    )
    return grids, shifts


def rise_mask_batch(grids: torch.Tensor, shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Smooth masks Tensor[n,H,W] in [0,1]: each grid upsampled bilinearly to
    (s+1) x cell size and cropped at its random shift (Petsiuk et al., sec. 3.2)."""
    s = grids.shape[-1]
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    up = F.interpolate(grids[:, None], size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear", align_corners=False)
    rows = shifts[:, 0, None] + torch.arange(height, device=grids.device)[None]  # [n,H]
    cols = shifts[:, 1, None] + torch.arange(width, device=grids.device)[None]  # [n,W]
    n = grids.shape[0]
    idx = torch.arange(n, device=grids.device)[:, None, None]
    return up[:, 0][idx, rows[:, :, None], cols[:, None, :]]


@register_method(
    "rise",
    paper="Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. BMVC 2018",
    family="perturbation",
    needs_grad=False,
)
def rise(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_masks: int = 4000, grid_size: int = 7,
    keep_prob: float = 0.5, seed: int = 0, score: str = "probability", batch_size: int | str = 64,
    precision: str = "float32",
) -> torch.Tensor:
    """RISE: saliency = 1/(N p) sum_i score(image * M_i) M_i over N random smooth masks.

    Masks: ``grid_size`` x ``grid_size`` binary grids kept with ``keep_prob``,
    upsampled and randomly shifted (deterministic given ``seed``), shared by all
    images as in the authors' code; the tracked score is the target's softmax
    probability. Forward passes: B x ``n_masks``, ``batch_size`` images each
    (``"auto"``: from free memory; a batch that runs out of memory is split);
    ``precision``: float32 or bfloat16/float16 autocast. Returns Tensor[B,H,W].
    """
    if n_masks < 1 or grid_size < 1 or not 0 < keep_prob <= 1:
        raise InvalidInputError("rise needs n_masks >= 1, grid_size >= 1 and 0 < keep_prob <= 1")
    b, _, h, w = images.shape
    dev = images.device
    grids, shifts = rise_masks(n_masks, h, w, grid_size, keep_prob, seed)
    heat = torch.zeros(b, h, w, device=dev, dtype=torch.float32)
    batch_size = resolve_batch_size(batch_size, model, images)
    per_chunk = max(1, batch_size // b)
    with fast_inference(model, images) as fmt, autocast(images, precision):
        source = fmt(images)
        buffer = fmt(torch.empty(per_chunk * min(b, batch_size), *images.shape[1:], device=dev, dtype=images.dtype))
        for msl in batch_slices(n_masks, per_chunk):
            report_progress(msl.start, n_masks)
            masks = rise_mask_batch(grids[msl].to(dev), shifts[msl].to(dev), h, w).to(images.dtype)  # [m,H,W]
            for isl in batch_slices(b, batch_size):
                bi, m = images[isl].shape[0], masks.shape[0]
                x = buffer[: m * bi]  # [m*bi,3,H,W], written in the model's memory format
                torch.mul(source[None, isl], masks[:, None, None], out=x.view(m, bi, *images.shape[1:]))
                tg = targets[isl].repeat(m)
                sc = target_score(upcast(safe_forward(model, x)), tg, score).view(m, bi).float()
                heat[isl] += torch.einsum("mb,mhw->bhw", sc, masks.float())
    return heat / (n_masks * keep_prob)
