"""COCO read from disk (instances JSON + image folder), with the conventions of :mod:`.real_datasets`:
``[x, y, w, h]`` boxes become ``(x, y, x + w, y + h)``, clipped when a sample is loaded; the mask is
the union of the instance segmentations (``pycocotools``, the ``coco`` extra)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SaliencyBenchError
from .datasets import GroundTruthDataset, Sample, UnreadableImageError, boxes_mask, register_dataset
from .real_datasets import Box, LastImageReader, _check_n_images, _id_name, _require_dir, _require_file, clip_boxes


@dataclass(frozen=True)
class CocoEntry:
    """One (image, category) sample of COCO: the image record and its non-crowd annotations."""

    image_id: str
    image_key: str
    path: Path
    label: int
    coco_image_id: int
    category_id: int
    ann_ids: tuple[int, ...]
    boxes: tuple[Box, ...]


class CocoDataset(LastImageReader, GroundTruthDataset):
    """COCO samples: boxes from ``bbox``, mask the union of the instance segmentations."""

    def __init__(self, entries: list[CocoEntry], classes: list[str], coco: Any, annotation_file: Path):
        super().__init__(entries, classes)
        self.multi_label = True
        self.coco = coco
        self.annotation_file = annotation_file

    def load(self, key: CocoEntry) -> Sample:
        img = self.image(key.path)
        h, w = img.shape[1:]
        record = self.coco.imgs[key.coco_image_id]
        if (record["height"], record["width"]) != (h, w):
            raise UnreadableImageError(f"image {key.path} is {w}x{h} but {self.annotation_file} says "
                                       f"{record['width']}x{record['height']}")
        source = f"{self.annotation_file} (image {key.path.name})"
        boxes = clip_boxes(torch.tensor(key.boxes, dtype=torch.float64).view(-1, 4), h, w, source).float()
        mask = np.zeros((h, w), dtype=bool)
        for ann_id, box in zip(key.ann_ids, boxes.tolist()):
            ann = self.coco.anns[ann_id]
            if ann.get("segmentation"):
                mask |= self.coco.annToMask(ann).astype(bool)
            else:
                mask |= boxes_mask(torch.tensor([box]), h, w).numpy()
        meta = {"image": key.image_key, "path": str(key.path), "coco_image_id": key.coco_image_id,
                "category_id": key.category_id, "ann_ids": list(key.ann_ids)}
        return Sample(key.image_id, img, key.label, boxes, torch.from_numpy(mask), False, meta)


@register_dataset("coco")
def coco(*, root: str | None = None, annotations: str | None = None, n_images: int | None = None) -> CocoDataset:
    """COCO instances JSON (via optional pycocotools), boxes and segmentation masks, one sample per category present.

    ``root``: the image directory (e.g. val2017/); ``annotations``: the instances
    JSON (e.g. instances_val2017.json). Class index = position of the category in
    sorted category ids; class names from the JSON. Boxes ``[x, y, w, h]`` become
    ``(x, y, x + w, y + h)``; the mask is the union of the category's instance
    segmentations (``annToMask``). Crowd annotations (``iscrowd=1``) are excluded
    entirely, from boxes and mask; a category present only as crowd gives no
    sample, and images without a non-crowd annotation are skipped. Images are
    ordered by COCO image id. Needs ``pip install pycocotools``.
    """
    _check_n_images(n_images)
    image_dir = _require_dir(root, "the COCO image directory (e.g. val2017/)", "root")
    ann_file = _require_file(annotations, "a COCO instances JSON file (e.g. instances_val2017.json)", "annotations")
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise SaliencyBenchError(f"the 'coco' data set needs pycocotools: pip install pycocotools ({e})") from e
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api = COCO(str(ann_file))
        categories = sorted(api.cats.values(), key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(categories)}
        names = [str(c["name"]) for c in categories]
        image_ids = sorted(api.imgs)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SaliencyBenchError(f"cannot read COCO annotation file {ann_file}: {type(e).__name__}: {e}") from e
    if len(set(names)) != len(names):
        raise SaliencyBenchError(f"COCO annotation file {ann_file} names a category more than once")
    entries: list[CocoEntry] = []
    kept = 0
    for img_id in image_ids:
        if n_images is not None and kept >= n_images:
            break
        record = api.imgs[img_id]
        by_cat: dict[int, list[dict[str, Any]]] = {}
        for ann in api.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in cat_index:
                raise SaliencyBenchError(f"{ann_file}: annotation {ann['id']} has unknown category_id "
                                         f"{ann['category_id']}")
            by_cat.setdefault(ann["category_id"], []).append(ann)
        if not by_cat:
            continue
        kept += 1
        key = Path(record["file_name"]).stem
        for cat_id in sorted(by_cat, key=cat_index.__getitem__):
            anns = sorted(by_cat[cat_id], key=lambda a: a["id"])
            boxes = []
            for ann in anns:
                x, y, w, h = (float(v) for v in ann["bbox"])
                if w <= 0 or h <= 0:
                    raise SaliencyBenchError(f"{ann_file}: annotation {ann['id']} (image {record['file_name']}) "
                                             f"has a degenerate bbox [x, y, w, h] = {ann['bbox']}")
                boxes.append((x, y, x + w, y + h))
            label = cat_index[cat_id]
            entries.append(CocoEntry(f"{key}-{_id_name(names[label])}", key, image_dir / record["file_name"],
                                     label, img_id, cat_id, tuple(a["id"] for a in anns), tuple(boxes)))
    return CocoDataset(entries, names, api, ann_file)
