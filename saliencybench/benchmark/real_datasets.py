"""Real data sets read from disk: image folders with VOC XML, PASCAL VOC 2007, ImageNet val (COCO: :mod:`.coco`).

Every loader checks its paths and parses all annotations when it is built (a
missing directory or file, an unparsable annotation, an unknown class or a
degenerate box raises :class:`SaliencyBenchError` naming the file), and reads
images lazily with Pillow when a sample is loaded (an image that cannot be read
raises :class:`UnreadableImageError` naming the file). Images are returned as
stored, RGB, without applying any EXIF orientation, since the annotations refer
to the stored pixels.

Box conventions: VOC-style XML (``folder``, ``voc07``, ``imagenet-val``) gives
1-based inclusive pixel coordinates, converted to 0-based with x2, y2 exclusive
as ``(xmin - 1, ymin - 1, xmax, ymax)``; COCO ``[x, y, w, h]`` becomes
``(x, y, x + w, y + h)``. Boxes are clipped to the image when a sample is loaded,
with a :class:`BoxClippedWarning` when one reaches more than 0.001 px outside.

All path parameters are taken as given (relative paths against the working
directory). ``n_images`` keeps the first n images, in sorted order, among those
that yield at least one sample.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SaliencyBenchError
from ..validation import clip_boxes as clip_to_image
from .datasets import GroundTruthDataset, Sample, UnreadableImageError, boxes_mask, register_dataset

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
CLIP_TOLERANCE_PX = 1e-3

Box = tuple[float, float, float, float]


# ---- shared helpers -----------------------------------------------------------------------

def read_image(path: Path) -> torch.Tensor:
    """Read an image file as RGB float Tensor[3,H,W] in [0,1]; :class:`UnreadableImageError` if it cannot be."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(f"image file {path} does not exist") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {e}") from e
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


def clip_boxes(boxes: torch.Tensor, height: int, width: int, source: str) -> torch.Tensor:
    """Clip boxes Tensor[n,4] to the image, ignoring float noise under :data:`CLIP_TOLERANCE_PX`."""
    return clip_to_image(boxes, height, width, source, CLIP_TOLERANCE_PX)


def _require_dir(path: str | Path | None, what: str, param: str) -> Path:
    """``path`` as a Path, or :class:`SaliencyBenchError` unless it is an existing directory."""
    if path is None:
        raise SaliencyBenchError(f"parameter {param!r} is required: {what}")
    p = Path(path)
    if not p.is_dir():
        raise SaliencyBenchError(f"{param}={str(p)!r} is not a directory; expected {what}")
    return p


def _require_file(path: str | Path | None, what: str, param: str) -> Path:
    """``path`` as a Path, or :class:`SaliencyBenchError` unless it is an existing file."""
    if path is None:
        raise SaliencyBenchError(f"parameter {param!r} is required: {what}")
    p = Path(path)
    if not p.is_file():
        raise SaliencyBenchError(f"{param}={str(p)!r} is not a file; expected {what}")
    return p


def _check_n_images(n_images: int | None) -> None:
    if n_images is not None and n_images < 1:
        raise SaliencyBenchError(f"n_images must be >= 1 or None (all images), got {n_images}")


def _read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file where line i means index i (blank lines only at the end)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SaliencyBenchError(f"cannot read {what} file {path}: {e}") from e
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines or not lines[0]:
        raise SaliencyBenchError(f"{what} file {path} is empty; expected one entry per line")
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise SaliencyBenchError(f"{what} file {path} has blank line(s) {blank[:5]}; line i must give index i")
    return lines


def _unique(names: list[str], source: str) -> list[str]:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SaliencyBenchError(f"{source} lists class(es) {dup} more than once")
    return names


def _id_name(name: str) -> str:
    """A class name as used inside a sample id (whitespace replaced by '_')."""
    return "_".join(name.split())


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of a VOC-style XML file, its box already 0-based with x2, y2 exclusive."""

    name: str
    box: Box
    difficult: bool


def parse_voc_xml(path: Path) -> list[VocObject]:
    """The objects of a VOC-style annotation file, boxes converted ``(xmin-1, ymin-1, xmax, ymax)``.

    Raises :class:`SaliencyBenchError` naming ``path`` when the file cannot be read
    or parsed, an object lacks its name or box, or a box is degenerate (x2 <= x1 or
    y2 <= y1 after conversion, i.e. xmax < xmin or ymax < ymin).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise SaliencyBenchError(f"cannot parse annotation {path}: {e}") from e
    except OSError as e:
        raise SaliencyBenchError(f"cannot read annotation {path}: {e}") from e
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        bndbox = obj.find("bndbox")
        if not name or bndbox is None:
            raise SaliencyBenchError(f"annotation {path}: object {k} lacks <name> or <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(tag) or "") for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(float((obj.findtext("difficult") or "0").strip() or "0")) != 0
        except ValueError as e:
            raise SaliencyBenchError(f"annotation {path}: object {k} ({name}) has a non-numeric field: {e}") from e
        box = (xmin - 1.0, ymin - 1.0, xmax, ymax)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise SaliencyBenchError(
                f"annotation {path}: object {k} ({name}) has a degenerate box xmin={xmin:g} ymin={ymin:g} "
                f"xmax={xmax:g} ymax={ymax:g} (VOC boxes are 1-based inclusive; need xmax >= xmin, ymax >= ymin)")
        objects.append(VocObject(name, box, difficult))
    return objects


# ---- box-annotated data sets (folder, voc07, imagenet-val) -----------------------------------

@dataclass(frozen=True)
class BoxEntry:
    """What is needed to load one sample of a box-annotated data set."""

    image_id: str
    image_key: str
    path: Path
    annotation: Path
    label: int
    boxes: tuple[Box, ...]
    box_difficult: tuple[bool, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def difficult(self) -> bool:
        """True when every box of this sample's class is marked difficult."""
        return all(self.box_difficult)


class LastImageReader:
    """Reads a data set's images, keeping the last one (a multi-label image gives a sample per class)."""

    _last: tuple[Path, torch.Tensor] | None = None

    def image(self, path: Path) -> torch.Tensor:
        """The image at ``path`` as Tensor[3,H,W] (the last one read is cached for multi-label images)."""
        if self._last is None or self._last[0] != path:
            self._last = (path, read_image(path))
        return self._last[1].clone()


class BoxDataset(LastImageReader, GroundTruthDataset):
    """Samples whose ground truth is boxes; the mask is the union of the sample's boxes."""

    def __init__(self, entries: list[BoxEntry], classes: list[str], multi_label: bool):
        super().__init__(entries, classes)
        self.multi_label = multi_label
        self.unannotated: list[Path] = []
        self.synsets: list[str] | None = None
        self.split: str | None = None

    def load(self, key: BoxEntry) -> Sample:
        img = self.image(key.path)
        h, w = img.shape[1:]
        boxes = clip_boxes(torch.tensor(key.boxes, dtype=torch.float32).view(-1, 4), h, w, str(key.annotation))
        meta = {"image": key.image_key, "path": str(key.path), "annotation": str(key.annotation),
                "box_difficult": list(key.box_difficult), **key.meta}
        return Sample(key.image_id, img, key.label, boxes, boxes_mask(boxes, h, w), key.difficult, meta)


def _class_entries(image_key: str, path: Path, annotation: Path, objects: list[VocObject],
                   class_index: dict[str, int], skip_difficult: bool) -> list[BoxEntry]:
    """One :class:`BoxEntry` per class present among ``objects``, in class-index order."""
    by_class: dict[int, list[VocObject]] = {}
    for obj in objects:
        if obj.name not in class_index:
            raise SaliencyBenchError(
                f"annotation {annotation}: class {obj.name!r} is not one of the data set's classes "
                f"{sorted(class_index, key=class_index.__getitem__)}")
        by_class.setdefault(class_index[obj.name], []).append(obj)
    names = {i: n for n, i in class_index.items()}
    entries = []
    for label in sorted(by_class):
        objs = by_class[label]
        entry = BoxEntry(f"{image_key}-{_id_name(names[label])}", image_key, path, annotation, label,
                         tuple(o.box for o in objs), tuple(o.difficult for o in objs))
        if not (skip_difficult and entry.difficult):
            entries.append(entry)
    return entries


def _first_images(per_image: list[list[BoxEntry]], n_images: int | None) -> list[BoxEntry]:
    """Flatten per-image entry lists, keeping the first ``n_images`` images that have any."""
    kept = [e for e in per_image if e]
    if n_images is not None:
        kept = kept[:n_images]
    return [entry for entries in kept for entry in entries]


@register_dataset("folder")
def folder(*, root: str | None = None, annotations: str | None = None, classes: list[str] | str | None = None,
           skip_difficult: bool = False, n_images: int | None = None) -> BoxDataset:
    """Image folder with one VOC-style XML box file per image (same stem), one sample per class present.

    ``root``: directory of images (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp,
    not recursive). ``annotations``: directory holding ``<stem>.xml`` for each image;
    None means the XML files lie beside the images in ``root``. Images without an
    XML file are skipped (listed in the data set's ``unannotated``). ``classes``: a
    list of class names, a path to a text file with one name per line (line i is
    class i), or None for the sorted names found in the XML files. Each ``<object>``
    becomes a box of its class (1-based inclusive VOC coordinates converted to
    0-based, x2/y2 exclusive); the mask is the union of the class's boxes; a class
    whose boxes are all ``<difficult>1`` gets ``Sample.difficult=True`` and is
    dropped when ``skip_difficult``.
    """
    _check_n_images(n_images)
    image_dir = _require_dir(root, "a directory of images", "root")
    ann_dir = image_dir if annotations is None else _require_dir(
        annotations, "a directory of VOC-style <stem>.xml files, one per image", "annotations")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise SaliencyBenchError(f"images {stems[p.stem]} and {p} share the stem {p.stem!r}; "
                                     f"their annotation {p.stem}.xml would be ambiguous")
        stems[p.stem] = p
    parsed: list[tuple[Path, Path, list[VocObject]]] = []
    unannotated: list[Path] = []
    for p in images:
        xml = ann_dir / f"{p.stem}.xml"
        if xml.is_file():
            parsed.append((p, xml, parse_voc_xml(xml)))
        else:
            unannotated.append(p)
    if not parsed:
        raise SaliencyBenchError(f"none of the {len(images)} images in {image_dir} has an annotation file "
                                 f"<stem>.xml in {ann_dir}")
    if classes is None:
        names = sorted({o.name for _, _, objs in parsed for o in objs})
    elif isinstance(classes, (str, Path)):
        names = _read_lines(_require_file(classes, "a text file with one class name per line", "classes"),
                            "class names")
    else:
        names = [str(c) for c in classes]
    names = _unique(names, "classes")
    index = {n: i for i, n in enumerate(names)}
    per_image = [_class_entries(p.stem, p, xml, objs, index, skip_difficult) for p, xml, objs in parsed]
    ds = BoxDataset(_first_images(per_image, n_images), names, multi_label=True)
    ds.unannotated = unannotated
    return ds


@register_dataset("voc07")
def voc07(*, root: str | None = None, split: str = "test", skip_difficult: bool = False,
          n_images: int | None = None) -> BoxDataset:
    """PASCAL VOC 2007 (VOCdevkit layout, XML boxes), 20 classes, one sample per class present.

    ``root``: the VOCdevkit directory or the VOC2007 directory inside it, holding
    ``ImageSets/Main/{split}.txt``, ``JPEGImages/`` and ``Annotations/``. Classes are
    the 20 VOC classes in the standard order (aeroplane=0 ... tvmonitor=19). A
    sample's boxes and mask are all the class's boxes, difficult ones included; a
    class whose boxes are all difficult gets ``Sample.difficult=True`` and is
    dropped when ``skip_difficult``.
    """
    _check_n_images(n_images)
    base = _require_dir(root, "the VOCdevkit directory (or VOCdevkit/VOC2007)", "root")
    if (base / "VOC2007").is_dir():
        base = base / "VOC2007"
    main = base / "ImageSets" / "Main"
    if not main.is_dir():
        raise SaliencyBenchError(f"{main} is not a directory; root must be VOCdevkit or VOC2007, "
                                 f"containing ImageSets/Main, JPEGImages and Annotations")
    split_file = main / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
        raise SaliencyBenchError(f"split file {split_file} does not exist; splits found: {available}")
    ann_dir = _require_dir(base / "Annotations", "the VOC Annotations directory of <id>.xml files", "root")
    jpeg_dir = _require_dir(base / "JPEGImages", "the VOC JPEGImages directory of <id>.jpg files", "root")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    index = {n: i for i, n in enumerate(VOC_CLASSES)}
    per_image = []
    for image_id in ids:
        xml = ann_dir / f"{image_id}.xml"
        if not xml.is_file():
            raise SaliencyBenchError(f"annotation file {xml} for image {image_id!r} of split {split!r} does not exist")
        per_image.append(_class_entries(image_id, jpeg_dir / f"{image_id}.jpg", xml, parse_voc_xml(xml), index,
                                        skip_difficult))
    ds = BoxDataset(_first_images(per_image, n_images), list(VOC_CLASSES), multi_label=True)
    ds.split = split
    return ds


def read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """(synsets, names) from a file with one ``<synset>[ <human name>]`` per line; line i is class i.

    A line without a human name uses the synset itself as the name.
    """
    synsets, names = [], []
    for line in _read_lines(path, "synset"):
        wnid, _, name = line.partition(" ")
        synsets.append(wnid)
        names.append(name.strip() or wnid)
    dup = sorted({s for s in synsets if synsets.count(s) > 1})
    if dup:
        raise SaliencyBenchError(f"synset file {path} lists synset(s) {dup[:5]} more than once")
    return synsets, names


@register_dataset("imagenet-val")
def imagenet_val(*, root: str | None = None, annotations: str | None = None, synsets: str | None = None,
                 n_images: int | None = None) -> BoxDataset:
    """ILSVRC2012 validation images with per-image VOC-style XML boxes (synset names), one sample per image.

    ``root``: directory of ``ILSVRC2012_val_XXXXXXXX.JPEG`` images (flat, or one
    level of sub-directories when ``root`` holds no image directly).
    ``annotations``: directory of per-image ``<stem>.xml`` (ILSVRC2012_bbox_val_v3,
    whose object names are synsets such as n01751748); every image needs one.
    ``synsets``: text file mapping line i to class index i, each line a synset
    optionally followed by a space and a human name (LOC_synset_mapping.txt:
    ``n01440764 tench, Tinca tinca``). Class names are the human names (the
    synsets when absent; ``synsets`` attribute of the data set keeps the ids).
    The label is the image's synset's index; boxes and mask are all its boxes.
    """
    _check_n_images(n_images)
    image_dir = _require_dir(root, "a directory of ILSVRC2012_val_*.JPEG images", "root")
    ann_dir = _require_dir(annotations, "a directory of per-image VOC-style XML files (ILSVRC2012_bbox_val_v3)",
                           "annotations")
    wnids, names = read_synsets(_require_file(
        synsets, "a text file with one synset per line, line i = class i (e.g. LOC_synset_mapping.txt)", "synsets"))
    index = {s: i for i, s in enumerate(wnids)}

    def images_in(d: Path) -> list[Path]:
        return [p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]

    images = images_in(image_dir)
    if not images:
        images = [p for d in image_dir.iterdir() if d.is_dir() for p in images_in(d)]
    if not images:
        raise SaliencyBenchError(f"no images found in {image_dir} (nor one level below)")
    images.sort(key=lambda p: p.name)
    if n_images is not None:
        images = images[:n_images]
    missing = [p.stem for p in images if not (ann_dir / f"{p.stem}.xml").is_file()]
    if missing:
        raise SaliencyBenchError(f"{len(missing)} image(s) have no annotation <stem>.xml in {ann_dir}, "
                                 f"e.g. {missing[:3]}")
    entries = []
    for p in images:
        xml = ann_dir / f"{p.stem}.xml"
        objects = parse_voc_xml(xml)
        found = sorted({o.name for o in objects})
        if len(found) != 1:
            raise SaliencyBenchError(f"annotation {xml} names synset(s) {found}; expected exactly one per image")
        if found[0] not in index:
            raise SaliencyBenchError(f"annotation {xml} names synset {found[0]!r}, which is not in the synset file")
        entries.append(BoxEntry(p.stem, p.stem, p, xml, index[found[0]], tuple(o.box for o in objects),
                                tuple(o.difficult for o in objects), {"synset": found[0]}))
    ds = BoxDataset(entries, names, multi_label=False)
    ds.synsets = wnids
    return ds
