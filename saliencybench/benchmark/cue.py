"""Data sets whose ground truth is what the model uses: a causal cue and a model contrast.

An object mask says where the object is, not what a model relies on: a model may
classify from context, and then a faithful map is "wrong" by the mask. The benchmarks
that measure attribution quality directly control what the model can use: FunnyBirds
(Hesse, Schaub-Meyer, Roth, ICCV 2023) removes rendered parts; Zhou, Booth, Ribeiro,
Shah ("Do Feature Attribution Methods Correctly Attribute Features?", AAAI 2022) and
BAM (Yang, Kim, "Benchmarking Attribution Methods with Relative Feature Importance",
arXiv 2019) inject label-correlated features and retrain; BAM's model contrast trains
two models on the same images with different labels. Two synthetic sets do the same:

- ``synthetic-cue``: the class is carried only by a small patch of a class texture
  (:data:`CUE_TEXTURES`, two random colours of different brightness, random phase) at a
  random place away from the shape; the large shape (any of the synthetic set's, uniform)
  is independent of the label. ``Sample.mask`` / ``boxes`` are the cue's exact square.
- ``synthetic-contrast``: an object (a shape, as the synthetic set) on a background
  covered by a class texture, object and texture classes drawn independently;
  ``label="object"`` or ``"background"`` chooses which class (and mask: the object, or
  everything outside it) the samples carry; ``meta`` carries both.

Every image is rendered from one generator stream whose draws do not depend on what is
painted, so the interventions (:func:`cue_removed`, :func:`shape_removed`,
:func:`object_removed`, :func:`background_removed`) render the same scene without one
part: the pixels it covered show exactly what lies under it, and no other pixel changes.
Textures are invariant (up to phase) under the horizontal flip the training recipes use.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidInputError
from .datasets import (SHAPES, SPLIT_SEED, GroundTruthDataset, Sample, _background, _colour, _shape_mask, mask_box,
                       register_dataset)

CUE_TEXTURES = ("hstripes", "vstripes", "checker", "dots")
CONTRAST_TEXTURES = CUE_TEXTURES
_SALT = {"synthetic-cue": 611_953, "synthetic-contrast": 1_299_709}


def texture(kind: str, height: int, width: int, period: int, phase_y: int = 0, phase_x: int = 0) -> torch.Tensor:
    """A binary texture bool Tensor[height,width] on integer pixel coordinates.

    ``period`` (even, px) with half-period bands: ``hstripes`` (horizontal bands),
    ``vstripes`` (vertical bands), ``checker`` (square cells of half a period), ``dots``
    (half-period squares on a period grid, a quarter of the pixels); ``phase_y``,
    ``phase_x`` shift the pattern. Each is its own mirror image up to phase.
    """
    if kind not in CUE_TEXTURES:
        raise InvalidInputError(f"unknown texture {kind!r}; use one of {CUE_TEXTURES}")
    if period < 2 or period % 2:
        raise InvalidInputError(f"texture period must be an even number of pixels >= 2, got {period}")
    half = period // 2
    yy = torch.arange(height).view(-1, 1) + int(phase_y)
    xx = torch.arange(width).view(1, -1) + int(phase_x)
    rows, cols = (yy % period) < half, (xx % period) < half
    if kind == "hstripes":
        return rows.expand(height, width).clone()
    if kind == "vstripes":
        return cols.expand(height, width).clone()
    if kind == "checker":
        return ((yy // half + xx // half) % 2 == 1).expand(height, width).clone()
    return rows & cols


def _generator(name: str, index: int, size: int, seed: int, split: str) -> torch.Generator:
    if split not in SPLIT_SEED:
        raise InvalidInputError(f"split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    return torch.Generator().manual_seed(int(seed) * 7_919 + SPLIT_SEED[split] + int(index) * 104_729 + _SALT[name]
                                         + size)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5, torch.arange(size, dtype=torch.float32) + 0.5,
                          indexing="ij")


def _distractors(img: torch.Tensor, g: torch.Generator, n: int) -> torch.Tensor:
    """Paint ``n`` bars and arcs (no class), as the synthetic set does."""
    size = img.shape[-1]
    yy, xx = _grid(size)
    for _ in range(n):
        kind = "bar" if torch.rand(1, generator=g).item() < 0.5 else "arc"
        r = size * (0.1 + 0.2 * torch.rand(1, generator=g).item())
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        m = _shape_mask(kind, yy, xx, cy, cx, r, torch.rand(1, generator=g).item() * 6.28)
        img = torch.where(m, _colour(g).view(3, 1, 1), img)
    return img


def classes_of(index: int, n_first: int, n_second: int) -> tuple[int, int]:
    """The two independent classes of image ``index``: (index mod n_first, (index div n_first) mod n_second).

    Every block of n_first x n_second consecutive images holds each pair once, so both
    classes are exactly balanced and exactly independent there (a constant prediction
    scores exactly chance on such a block).
    """
    return index % n_first, (index // n_first) % n_second


def _place_shape(g: torch.Generator, size: int, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask[S,S], colour Tensor[3,S,S]) of one upright shape of class ``cls``, as the synthetic set's single object."""
    yy, xx = _grid(size)
    for _attempt in range(50):
        r = size * (0.18 + 0.12 * torch.rand(1, generator=g).item())
        cy, cx = (r + torch.rand(2, generator=g) * (size - 2 * r)).tolist()
        m = _shape_mask(SHAPES[cls], yy, xx, cy, cx, r, 0.0)
        if m.sum() > 20:
            break
    colour = _colour(g).view(3, 1, 1) + 0.04 * torch.randn(3, size, size, generator=g)
    return m, colour


def check_common(size: int, n_images: int, split: str, n_distractors: int) -> None:
    """Checks shared by both sets; raises :class:`InvalidInputError` naming the fix."""
    if not 32 <= size <= 256:
        raise InvalidInputError(f"size must be in [32, 256] px, got {size}")
    if split not in SPLIT_SEED:
        raise InvalidInputError(f"split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    if n_images < 1:
        raise InvalidInputError(f"n_images must be >= 1, got {n_images}")
    if n_distractors < 0:
        raise InvalidInputError(f"n_distractors must be >= 0, got {n_distractors}")


# ---- synthetic-cue ----------------------------------------------------------------------------

def cue_sizes(size: int, cue_min: int | None, cue_max: int | None) -> tuple[int, int]:
    """The cue's side range in px: by default 8-12 px at 64 px, scaled with the image size."""
    lo = cue_min if cue_min is not None else max(4, round(8 * size / 64))
    hi = cue_max if cue_max is not None else max(lo, round(12 * size / 64))
    if not 2 <= lo <= hi <= size // 2:
        raise InvalidInputError(f"cue sides must satisfy 2 <= cue_min <= cue_max <= size/2 = {size // 2}, got "
                                f"{lo}..{hi}")
    return lo, hi


def render_cue(index: int, seed: int, split: str, *, size: int = 64, cue: bool = True, shape: bool = True,
               cue_min: int | None = None, cue_max: int | None = None, period: int = 4,
               n_distractors: int = 3) -> tuple[torch.Tensor, dict[str, Any]]:
    """Render ``synthetic-cue`` image ``index``: (image Tensor[3,S,S] in [0,1], truth).

    Scene (deterministic in ``seed``, ``split``, ``index``): the synthetic set's clutter,
    ``n_distractors`` bars and arcs, one upright shape, then the cue; the cue's class
    (``label``) and the shape's are :func:`classes_of` the index (balanced, independent).
    The cue: a square of side in
    [``cue_min``, ``cue_max``] px, of texture ``CUE_TEXTURES[label]`` (``period`` px,
    random phase) in a dark colour (channels in [0, 0.35]) and a bright one (in
    [0.65, 1]), which is which random, plus 0.04 pixel noise, at a random place whose
    2-px margin does not touch the shape (if 50 draws find none, the last; the shape's
    mask is then its visible part). ``cue=False`` / ``shape=False`` leave that part
    unpainted, every draw unchanged. truth: ``label``, ``cue_mask`` bool Tensor[S,S] (the
    square, also when not painted), ``shape_label``, ``shape_mask`` bool Tensor[S,S].
    """
    g = _generator("synthetic-cue", index, size, seed, split)
    lo, hi = cue_sizes(size, cue_min, cue_max)
    img = _distractors(_background(size, g), g, n_distractors)
    label, shape_cls = classes_of(index, len(CUE_TEXTURES), len(SHAPES))
    shape_mask, shape_colour = _place_shape(g, size, shape_cls)
    side = int(torch.randint(lo, hi + 1, (1,), generator=g))
    grown = torch.nn.functional.max_pool2d(shape_mask[None, None].float(), 5, 1, 2)[0, 0].bool()
    for _attempt in range(50):
        y0, x0 = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        if not grown[y0 : y0 + side, x0 : x0 + side].any():
            break
    phase = torch.randint(0, period, (2,), generator=g).tolist()
    dark, bright = torch.rand(3, generator=g) * 0.35, 0.65 + torch.rand(3, generator=g) * 0.35
    on, off = (dark, bright) if torch.rand(1, generator=g).item() < 0.5 else (bright, dark)
    noise = 0.04 * torch.randn(3, side, side, generator=g)
    cue_mask = torch.zeros(size, size, dtype=torch.bool)
    cue_mask[y0 : y0 + side, x0 : x0 + side] = True
    shape_mask = shape_mask & ~cue_mask
    if shape:
        img = torch.where(shape_mask, shape_colour, img)
    if cue:
        t = texture(CUE_TEXTURES[label], side, side, period, *phase)
        img = img.clone()
        img[:, y0 : y0 + side, x0 : x0 + side] = torch.where(t, on.view(3, 1, 1), off.view(3, 1, 1)) + noise
    return img.clamp(0, 1), {"label": label, "cue_mask": cue_mask, "shape_label": shape_cls, "shape_mask": shape_mask}


def cue_removed(index: int, seed: int, split: str, **params: Any) -> torch.Tensor:
    """``synthetic-cue`` image ``index`` with the cue not painted (what it covered shows): Tensor[3,S,S]."""
    return render_cue(index, seed, split, cue=False, **params)[0]


def shape_removed(index: int, seed: int, split: str, **params: Any) -> torch.Tensor:
    """``synthetic-cue`` image ``index`` with the shape not painted (clutter continues): Tensor[3,S,S]."""
    return render_cue(index, seed, split, shape=False, **params)[0]


# ---- synthetic-contrast -------------------------------------------------------------------------

def render_contrast(index: int, seed: int, split: str, *, size: int = 64, obj: bool = True, background: bool = True,
                    period: int = 6, n_distractors: int = 3) -> tuple[torch.Tensor, dict[str, Any]]:
    """Render ``synthetic-contrast`` image ``index``: (image Tensor[3,S,S] in [0,1], truth).

    Scene (deterministic in ``seed``, ``split``, ``index``): the synthetic set's clutter;
    the background texture ``CONTRAST_TEXTURES[background_label]`` (``period`` px, random
    phase) added over the whole image as ``amp * (t - 1/2) * tint`` (amp in [0.02, 0.3],
    tint channels in [0.5, 1]); ``n_distractors`` bars and arcs; one upright object shape
    (the synthetic set's single object). The classes (object, background) are
    :func:`classes_of` the index: balanced and independent.
    ``obj=False`` leaves the object unpainted (the textured background continues under
    it); ``background=False`` leaves the texture out (plain clutter); every draw is
    unchanged. truth: ``object_label``, ``object_mask`` bool Tensor[S,S],
    ``background_label``, ``background_mask`` (every pixel outside the object).
    """
    g = _generator("synthetic-contrast", index, size, seed, split)
    img = _background(size, g)
    obj_cls, bg_label = classes_of(index, len(SHAPES), len(CONTRAST_TEXTURES))
    phase = torch.randint(0, period, (2,), generator=g).tolist()
    amp = 0.02 + 0.28 * torch.rand(1, generator=g).item()
    tint = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)
    if background:
        t = texture(CONTRAST_TEXTURES[bg_label], size, size, period, *phase).float()
        img = img + amp * (t - 0.5) * tint
    img = _distractors(img, g, n_distractors)
    obj_mask, obj_colour = _place_shape(g, size, obj_cls)
    if obj:
        img = torch.where(obj_mask, obj_colour, img)
    return img.clamp(0, 1), {"object_label": obj_cls, "object_mask": obj_mask, "background_label": bg_label,
                             "background_mask": ~obj_mask}


def object_removed(index: int, seed: int, split: str, **params: Any) -> torch.Tensor:
    """``synthetic-contrast`` image ``index`` without the object (the textured background continues): Tensor[3,S,S]."""
    return render_contrast(index, seed, split, obj=False, **params)[0]


def background_removed(index: int, seed: int, split: str, **params: Any) -> torch.Tensor:
    """``synthetic-contrast`` image ``index`` without the background texture (plain clutter): Tensor[3,S,S]."""
    return render_contrast(index, seed, split, background=False, **params)[0]


# ---- the data sets -------------------------------------------------------------------------------

class _Rendered(GroundTruthDataset):
    """Images rendered on the fly from (seed, split, index); subclasses turn a render into a Sample."""

    def __init__(self, n_images: int, seed: int, split: str, classes: list[str], params: dict[str, Any]):
        self.seed, self.split, self.params = seed, split, params
        super().__init__(list(range(n_images)), classes)

    def render(self, index: int, **flags: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images Tensor[N,3,S,S] and labels LongTensor[N], for training."""
        samples = [self[i] for i in range(len(self))]
        return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])

    def images(self, **flags: bool) -> torch.Tensor:
        """All images Tensor[N,3,S,S] rendered with ``flags`` (an intervention such as ``cue=False``)."""
        return torch.stack([self.render(i, **flags)[0] for i in range(len(self))])

    def labels(self) -> torch.Tensor:
        """The samples' labels LongTensor[N] (from the index, without rendering)."""
        raise NotImplementedError


class CueDataset(_Rendered):
    """``synthetic-cue``: samples carry the cue's class, its exact square as mask and box."""

    def render(self, index: int, **flags: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        return render_cue(index, self.seed, self.split, **flags, **self.params)

    def labels(self) -> torch.Tensor:
        return torch.tensor([classes_of(i, len(CUE_TEXTURES), len(SHAPES))[0] for i in self.ids])

    def load(self, key: int) -> Sample:
        img, t = self.render(key)
        image_id = f"{self.split}-{key:05d}"
        return Sample(image_id, img, t["label"], mask_box(t["cue_mask"])[None], t["cue_mask"],
                      meta={"image": image_id, "texture": CUE_TEXTURES[t["label"]], "shape_label": t["shape_label"],
                            "shape": SHAPES[t["shape_label"]], "shape_mask": t["shape_mask"]})


class ContrastDataset(_Rendered):
    """``synthetic-contrast``: samples carry the object's or the background's class and mask (``label``)."""

    def __init__(self, n_images: int, seed: int, split: str, label: str, params: dict[str, Any]):
        self.label = label
        super().__init__(n_images, seed, split, list(SHAPES if label == "object" else CONTRAST_TEXTURES), params)

    def render(self, index: int, **flags: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        return render_contrast(index, self.seed, self.split, **flags, **self.params)

    def labels(self) -> torch.Tensor:
        which = 0 if self.label == "object" else 1
        return torch.tensor([classes_of(i, len(SHAPES), len(CONTRAST_TEXTURES))[which] for i in self.ids])

    def load(self, key: int) -> Sample:
        img, t = self.render(key)
        mask = t[f"{self.label}_mask"]
        image_id = f"{self.split}-{key:05d}"
        meta = {"image": image_id, "object_label": t["object_label"], "object_mask": t["object_mask"],
                "background_label": t["background_label"], "background_mask": t["background_mask"],
                "texture": CONTRAST_TEXTURES[t["background_label"]]}
        return Sample(image_id, img, t[f"{self.label}_label"], mask_box(mask)[None], mask, meta=meta)


@register_dataset("synthetic-cue")
def synthetic_cue(*, size: int = 64, n_images: int = 64, seed: int = 0, split: str = "test", cue_min: int | None = None,
                  cue_max: int | None = None, period: int = 4, n_distractors: int = 3) -> CueDataset:
    """Class carried only by a small texture patch (4 textures) beside a label-independent shape; mask = the patch.

    ``cue_min`` / ``cue_max``: the patch's side range (default 8-12 px at 64 px, scaled);
    ``period``: the texture's period in px (even). See :func:`render_cue`.
    """
    check_common(size, n_images, split, n_distractors)
    cue_sizes(size, cue_min, cue_max)
    if period < 2 or period % 2:
        raise InvalidInputError(f"period must be an even number of pixels >= 2, got {period}")
    return CueDataset(n_images, seed, split, list(CUE_TEXTURES),
                      {"size": size, "cue_min": cue_min, "cue_max": cue_max, "period": period,
                       "n_distractors": n_distractors})


@register_dataset("synthetic-contrast")
def synthetic_contrast(*, size: int = 64, n_images: int = 64, seed: int = 0, split: str = "test", label: str = "object",
                       period: int = 6, n_distractors: int = 3) -> ContrastDataset:
    """Object shape (6 classes) on a class texture background (4 classes), independent; ``label`` picks which one.

    ``label="object"``: samples carry the shape's class and mask; ``"background"``: the
    texture's class and the mask of every pixel outside the object. Both give the same
    images and image ids (BAM's model contrast). See :func:`render_contrast`.
    """
    check_common(size, n_images, split, n_distractors)
    if label not in ("object", "background"):
        raise InvalidInputError(f"label must be 'object' or 'background', got {label!r}")
    if period < 2 or period % 2 or period > size:
        raise InvalidInputError(f"period must be an even number of pixels in [2, size], got {period}")
    return ContrastDataset(n_images, seed, split, label, {"size": size, "period": period,
                                                          "n_distractors": n_distractors})
