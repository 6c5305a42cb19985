"""Data sets with ground truth: the registry, the sample type and the synthetic set.

A data set yields :class:`Sample` objects: one per (image, target class), with
the image as float Tensor[3,H,W] RGB in [0,1] (not normalised; the runner
applies each model's preprocessing), the class's boxes Tensor[n,4] as
(x1, y1, x2, y2) with x2, y2 exclusive, and its pixel mask bool Tensor[H,W]
(for box-only formats, the union of the boxes, as TorchRay). Multi-label images
give one sample per class present, sharing ``image_id``. An image that cannot be
read raises :class:`UnreadableImageError`; the runner skips and records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SaliencyBenchError
from ..registry import Registry, keyword_defaults


class UnreadableImageError(SaliencyBenchError):
    """An image file that is missing, corrupt or not an image."""


@dataclass
class Sample:
    """One (image, target class) pair with its ground truth."""

    image_id: str
    image: torch.Tensor
    label: int
    boxes: torch.Tensor
    mask: torch.Tensor
    difficult: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


class GroundTruthDataset(Sequence[Sample]):
    """A sequence of :class:`Sample` with class names; subclasses implement ``load``."""

    name: str = ""
    classes: list[str]
    multi_label: bool = False

    def __init__(self, ids: list[Any], classes: list[str]):
        self.ids = ids
        self.classes = classes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.load(self.ids[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def load(self, key: Any) -> Sample:
        raise NotImplementedError


def boxes_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of boxes Tensor[n,4] (x2, y2 exclusive) as a bool mask Tensor[H,W]: every pixel a box
    overlaps (so a box smaller than a pixel still marks one)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        r0, c0 = max(math.floor(y1), 0), max(math.floor(x1), 0)
        r1, c1 = min(max(math.ceil(y2), r0 + 1), height), min(max(math.ceil(x2), c0 + 1), width)
        mask[r0:r1, c0:c1] = True
    return mask


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    """Exact bounding box Tensor[4] (x1, y1, x2, y2), x2/y2 exclusive, of a bool mask[H,W]."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


@dataclass
class DatasetSpec:
    """A registered data set factory: ``factory(**params) -> GroundTruthDataset``."""

    name: str
    factory: Callable[..., GroundTruthDataset]
    params: dict[str, Any]
    summary: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable[..., GroundTruthDataset]], Callable[..., GroundTruthDataset]]:
    """Decorator registering a data set factory under ``name``."""

    def deco(fn: Callable[..., GroundTruthDataset]) -> Callable[..., GroundTruthDataset]:
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        DATASETS.add(name, DatasetSpec(name, fn, keyword_defaults(fn), summary))
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names of the registered data sets."""
    return DATASETS.names()


def get_dataset(name: str, **params: Any) -> GroundTruthDataset:
    """Build the data set registered as ``name`` with ``params``."""
    spec = DATASETS.get(name)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise SaliencyBenchError(f"data set {name!r} has no parameter(s) {unknown}; its parameters are {sorted(spec.params)}")
    ds = spec.factory(**params)
    ds.name = name
    return ds


# ---- the synthetic data set ---------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "ring", "half_disc")
SPLIT_SEED = {"train": 0, "test": 1_000_003, "val": 2_000_029}


def _shape_mask(kind: str, yy: torch.Tensor, xx: torch.Tensor, cy: float, cx: float, r: float, theta: float) -> torch.Tensor:
    """Pixels inside a shape of ``kind`` centred at (cy, cx), radius ``r``, rotation ``theta``."""
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    d = torch.sqrt(dx * dx + dy * dy)
    if kind == "circle":
        return d < r
    if kind == "square":
        return torch.maximum(u.abs(), v.abs()) < 0.8 * r
    if kind == "triangle":
        inside = torch.ones_like(d, dtype=torch.bool)
        for k in range(3):
            a = theta + k * 2 * math.pi / 3
            inside &= (math.cos(a) * dx + math.sin(a) * dy) < 0.5 * r
        return inside
    if kind == "cross":
        w = 0.33 * r
        return ((u.abs() < w) & (v.abs() < r)) | ((v.abs() < w) & (u.abs() < r))
    if kind == "ring":
        return (d < r) & (d > 0.55 * r)
    if kind == "half_disc":
        return (d < r) & (v > 0)
    if kind == "bar":
        return (u.abs() < r) & (v.abs() < 0.12 * r)
    if kind == "arc":
        return (d < r) & (d > 0.85 * r) & (u > 0.3 * r)
    raise ValueError(kind)


def _background(size: int, g: torch.Generator) -> torch.Tensor:
    """Cluttered background: a random grating texture, a colour gradient and pixel noise."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    base = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25
    freq = (torch.rand(1, generator=g).item() * 0.25 + 0.05)
    ang = torch.rand(1, generator=g).item() * math.pi
    grating = torch.sin(freq * (math.cos(ang) * xx + math.sin(ang) * yy) + torch.rand(1, generator=g).item() * 6.28)
    amp = torch.rand(3, 1, 1, generator=g) * 0.15
    grad_dir = torch.rand(3, 1, 1, generator=g) - 0.5
    img = base + amp * grating + grad_dir * 0.3 * (xx / size - 0.5)
    img = img + 0.06 * torch.randn(3, size, size, generator=g)
    return img


def _colour(g: torch.Generator) -> torch.Tensor:
    c = torch.rand(3, generator=g)
    c[int(torch.randint(0, 3, (1,), generator=g))] = float(torch.rand(1, generator=g) > 0.5)
    return c


def render_synthetic(
    index: int, size: int, seed: int, split: str, n_objects: int = 1, n_distractors: int = 3,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Render synthetic image ``index``: (image Tensor[3,S,S] in [0,1], [(class, mask[S,S]), ...]).

    Deterministic in (``seed``, ``split``, ``index``). Class objects are upright
    (their class is their shape; position, scale and colour vary) and never overlap; distractors (bars and arcs, which belong to no class) are drawn
    under the objects, so each object's mask is exactly its visible region.
    """
    g = torch.Generator().manual_seed(int(seed) * 7_919 + SPLIT_SEED[split] + int(index) * 104_729 + n_objects)
    img = _background(size, g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    for _ in range(n_distractors):
        kind = "bar" if torch.rand(1, generator=g).item() < 0.5 else "arc"
        r = size * (0.1 + 0.2 * torch.rand(1, generator=g).item())
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        m = _shape_mask(kind, yy, xx, cy, cx, r, torch.rand(1, generator=g).item() * 6.28)
        img = torch.where(m, _colour(g).view(3, 1, 1), img)
    classes = torch.randperm(len(SHAPES), generator=g)[:n_objects].tolist()
    objects: list[tuple[int, torch.Tensor]] = []
    taken = torch.zeros(size, size, dtype=torch.bool)
    for cls in classes:
        for _attempt in range(50):
            lo, hi = (0.18, 0.3) if n_objects == 1 else (0.12, 0.19)
            r = size * (lo + (hi - lo) * torch.rand(1, generator=g).item())
            cy, cx = (r + torch.rand(2, generator=g) * (size - 2 * r)).tolist()
            m = _shape_mask(SHAPES[cls], yy, xx, cy, cx, r, 0.0)
            grown = torch.nn.functional.max_pool2d(m[None, None].float(), 5, 1, 2)[0, 0].bool()
            if m.sum() > 20 and not (grown & taken).any():
                break
        taken |= m
        colour = _colour(g).view(3, 1, 1) + 0.04 * torch.randn(3, size, size, generator=g)
        img = torch.where(m, colour, img)
        objects.append((cls, m))
    return img.clamp(0, 1), objects


class SyntheticShapes(GroundTruthDataset):
    """Shapes on clutter with exact masks and boxes, generated on the fly from a seed."""

    def __init__(self, size: int, n_images: int, seed: int, split: str, multi_label: bool):
        self.size, self.seed, self.split = size, seed, split
        self.multi_label = multi_label
        n_obj = 2 if multi_label else 1
        ids = [(i, k) for i in range(n_images) for k in range(n_obj)]
        super().__init__(ids, list(SHAPES))
        self._cache: dict[int, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}

    def render(self, index: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        if index not in self._cache:
            self._cache = {index: render_synthetic(index, self.size, self.seed, self.split, 2 if self.multi_label else 1)}
        return self._cache[index]

    def load(self, key: tuple[int, int]) -> Sample:
        index, k = key
        img, objects = self.render(index)
        cls, mask = objects[k]
        image_id = f"{self.split}-{index:05d}"
        return Sample(f"{image_id}-{SHAPES[cls]}" if self.multi_label else image_id, img, cls,
                      mask_box(mask)[None], mask, meta={"image": image_id})

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images Tensor[N,3,S,S] and labels LongTensor[N] (single-label sets), for training."""
        samples = [self[i] for i in range(len(self))]
        return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])


@register_dataset("synthetic")
def synthetic(*, size: int = 64, n_images: int = 64, seed: int = 0, split: str = "test",
              multi_label: bool = False) -> SyntheticShapes:
    """Synthetic shapes (6 classes fixed by shape) on cluttered backgrounds, exact masks and boxes.

    ``size`` 64 to 128 px; ``split`` train/val/test are disjoint by seed;
    ``multi_label=True`` puts two objects of different classes in each image
    (one sample per object, for the per-class pointing game).
    """
    if not 32 <= size <= 256:
        raise SaliencyBenchError(f"synthetic size must be in [32, 256] px, got {size}")
    if split not in SPLIT_SEED:
        raise SaliencyBenchError(f"split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    if n_images < 1:
        raise SaliencyBenchError(f"n_images must be >= 1, got {n_images}")
    return SyntheticShapes(size, n_images, seed, split, multi_label)
