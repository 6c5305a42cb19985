"""Real-format data set loaders on small fixture trees built in tmp_path (JPEG, VOC XML, COCO JSON)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import saliencybench.benchmark.coco  # noqa: F401  (registers the data sets)
import saliencybench.benchmark.real_datasets  # noqa: F401
from saliencybench.benchmark.datasets import DATASETS, UnreadableImageError, get_dataset
from saliencybench.errors import BoxClippedWarning, SaliencyBenchError

VOC_XML = """<annotation>
\t<folder>{folder}</folder>
\t<filename>{filename}</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>flickr</image>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""

VOC_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{xmin}</xmin>
\t\t\t<ymin>{ymin}</ymin>
\t\t\t<xmax>{xmax}</xmax>
\t\t\t<ymax>{ymax}</ymax>
\t\t</bndbox>
\t</object>
"""


def write_jpeg(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> None:
    """A real JPEG file of ``width`` x ``height`` random RGB pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format="JPEG", quality=90)


def write_voc_xml(path: Path, filename: str, objects: list[tuple[str, int, int, int, int, int]],
                  width: int = 64, height: int = 48, folder: str = "VOC2007") -> None:
    """A VOC annotation file; ``objects`` are (name, xmin, ymin, xmax, ymax, difficult), 1-based inclusive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(VOC_OBJECT.format(name=n, xmin=x1, ymin=y1, xmax=x2, ymax=y2, difficult=d)
                   for n, x1, y1, x2, y2, d in objects)
    path.write_text(VOC_XML.format(folder=folder, filename=filename, width=width, height=height, objects=objs))


def by_id(ds) -> dict:
    """Samples of a data set keyed by image_id."""
    return {s.image_id: s for s in ds}


# ---- folder -------------------------------------------------------------------------------

@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    """images/ with a.jpg (cat, dog, dog), b.jpg (cat), c.jpg (no XML); XML beside the images."""
    root = tmp_path / "images"
    for i, stem in enumerate("abc"):
        write_jpeg(root / f"{stem}.jpg", seed=i)
    write_voc_xml(root / "a.xml", "a.jpg", [("cat", 11, 21, 26, 40, 0), ("dog", 1, 1, 5, 5, 0),
                                           ("dog", 31, 11, 40, 20, 0)])
    write_voc_xml(root / "b.xml", "b.jpg", [("cat", 1, 1, 64, 48, 0)])
    return root


def test_folder_counts_labels_and_exact_voc_box_conversion(folder_tree: Path) -> None:
    ds = get_dataset("folder", root=str(folder_tree))
    assert ds.classes == ["cat", "dog"] and ds.multi_label
    assert [s.image_id for s in ds] == ["a-cat", "a-dog", "b-cat"]
    assert [p.name for p in ds.unannotated] == ["c.jpg"]
    s = by_id(ds)
    cat = s["a-cat"]
    assert cat.label == 0 and cat.meta["image"] == "a" and not cat.difficult
    assert cat.image.shape == (3, 48, 64) and cat.image.dtype == torch.float32
    assert 0.0 <= cat.image.min() and cat.image.max() <= 1.0
    assert cat.boxes.tolist() == [[10.0, 20.0, 26.0, 40.0]]
    m = cat.mask
    assert m.dtype == torch.bool and m.shape == (48, 64) and int(m.sum()) == 16 * 20
    assert m[20, 10] and m[39, 25] and not m[19, 10] and not m[20, 9] and not m[40, 25] and not m[39, 26]
    dog = s["a-dog"]
    assert dog.label == 1 and dog.boxes.tolist() == [[0, 0, 5, 5], [30, 10, 40, 20]]
    assert int(dog.mask.sum()) == 25 + 100
    assert torch.equal(dog.image, cat.image)
    full = s["b-cat"]
    assert full.boxes.tolist() == [[0, 0, 64, 48]] and bool(full.mask.all())


def test_folder_annotations_dir_classes_file_and_n_images(tmp_path: Path) -> None:
    root, ann = tmp_path / "img", tmp_path / "ann"
    for i, stem in enumerate(["x1", "x2", "x3"]):
        write_jpeg(root / f"{stem}.JPG", seed=i)
        write_voc_xml(ann / f"{stem}.xml", f"{stem}.JPG", [("b", 2, 2, 9, 9, 0)])
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\n")
    ds = get_dataset("folder", root=str(root), annotations=str(ann), classes=str(classes), n_images=2)
    assert ds.classes == ["a", "b", "c"]
    assert [(s.image_id, s.label) for s in ds] == [("x1-b", 1), ("x2-b", 1)]
    assert get_dataset("folder", root=str(root), annotations=str(ann), classes=["b", "z"])[0].label == 0
    with pytest.raises(SaliencyBenchError, match=r"x1\.xml.*'b' is not one of"):
        get_dataset("folder", root=str(root), annotations=str(ann), classes=["a"])
    with pytest.raises(SaliencyBenchError, match="none of the 3 images"):
        get_dataset("folder", root=str(root))


def test_folder_difficult_flag_and_skip(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "i.jpg")
    write_voc_xml(tmp_path / "i.xml", "i.jpg", [("a", 1, 1, 4, 4, 1), ("b", 1, 1, 4, 4, 1), ("b", 5, 5, 9, 9, 0)])
    s = by_id(get_dataset("folder", root=str(tmp_path)))
    assert s["i-a"].difficult and not s["i-b"].difficult
    assert s["i-b"].meta["box_difficult"] == [True, False]
    assert [x.image_id for x in get_dataset("folder", root=str(tmp_path), skip_difficult=True)] == ["i-b"]


def test_box_outside_image_is_clipped_with_warning(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "i.jpg", width=64, height=48)
    write_voc_xml(tmp_path / "i.xml", "i.jpg", [("a", 0, 41, 70, 60, 0)])
    ds = get_dataset("folder", root=str(tmp_path))
    with pytest.warns(BoxClippedWarning, match=r"i\.xml"):
        s = ds[0]
    assert s.boxes.tolist() == [[0.0, 40.0, 64.0, 48.0]]
    assert int(s.mask.sum()) == 64 * 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", BoxClippedWarning)
        write_voc_xml(tmp_path / "i.xml", "i.jpg", [("a", 1, 1, 64, 48, 0)])
        get_dataset("folder", root=str(tmp_path))[0]


def test_degenerate_box_raises_at_construction_naming_file(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "i.jpg")
    write_voc_xml(tmp_path / "i.xml", "i.jpg", [("a", 20, 5, 19, 9, 0)])
    with pytest.raises(SaliencyBenchError, match=r"i\.xml.*degenerate"):
        get_dataset("folder", root=str(tmp_path))
    write_voc_xml(tmp_path / "i.xml", "i.jpg", [("a", 20, 5, 20, 5, 0)])
    assert get_dataset("folder", root=str(tmp_path))[0].boxes.tolist() == [[19, 4, 20, 5]]


def test_corrupt_and_missing_image_raise_unreadable_on_load_only(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\x00garbage, not a JPEG\xff" * 10)
    write_voc_xml(tmp_path / "bad.xml", "bad.jpg", [("a", 1, 1, 4, 4, 0)])
    write_jpeg(tmp_path / "ok.jpg")
    write_voc_xml(tmp_path / "ok.xml", "ok.jpg", [("a", 1, 1, 4, 4, 0)])
    ds = get_dataset("folder", root=str(tmp_path))
    assert len(ds) == 2
    with pytest.raises(UnreadableImageError, match=r"bad\.jpg"):
        ds[0]
    assert ds[1].image_id == "ok-a"
    fresh = get_dataset("folder", root=str(tmp_path))
    (tmp_path / "ok.jpg").unlink()
    with pytest.raises(UnreadableImageError, match=r"ok\.jpg does not exist"):
        fresh[1]


def test_grayscale_png_is_converted_to_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 12), 255, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    write_voc_xml(tmp_path / "g.xml", "g.png", [("a", 1, 1, 4, 4, 0)], width=12, height=10)
    img = get_dataset("folder", root=str(tmp_path))[0].image
    assert img.shape == (3, 10, 12) and bool((img == 1.0).all())


# ---- voc07 --------------------------------------------------------------------------------

@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2007 with a 3-image test split and a 1-image train split."""
    base = tmp_path / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "test.txt").write_text("000001\n000004\n000010\n")
    (main / "train.txt").write_text("000002\n")
    (main / "dog_test.txt").write_text("000001  1\n000004 -1\n000010 -1\n")
    for i, image_id in enumerate(["000001", "000002", "000004", "000010"]):
        write_jpeg(base / "JPEGImages" / f"{image_id}.jpg", width=80, height=60, seed=i)
    ann = base / "Annotations"
    write_voc_xml(ann / "000001.xml", "000001.jpg", [("dog", 11, 11, 30, 30, 0), ("person", 40, 5, 60, 50, 0),
                                                    ("dog", 21, 21, 40, 40, 1)], width=80, height=60)
    write_voc_xml(ann / "000002.xml", "000002.jpg", [("cat", 1, 1, 10, 10, 0)], width=80, height=60)
    write_voc_xml(ann / "000004.xml", "000004.jpg", [("chair", 5, 5, 14, 14, 1), ("chair", 50, 5, 59, 14, 1)],
                  width=80, height=60)
    write_voc_xml(ann / "000010.xml", "000010.jpg", [("tvmonitor", 1, 1, 80, 60, 0)], width=80, height=60)
    return tmp_path / "VOCdevkit"


def test_voc07_multilabel_labels_masks_and_difficult(voc_root: Path) -> None:
    ds = get_dataset("voc07", root=str(voc_root))
    assert ds.classes[:3] == ["aeroplane", "bicycle", "bird"] and len(ds.classes) == 20
    assert ds.classes[11] == "dog" and ds.classes[14] == "person" and ds.classes[19] == "tvmonitor"
    assert [(s.image_id, s.label, s.difficult) for s in ds] == [
        ("000001-dog", 11, False), ("000001-person", 14, False), ("000004-chair", 8, True),
        ("000010-tvmonitor", 19, False)]
    s = by_id(ds)
    dog = s["000001-dog"]
    assert dog.boxes.tolist() == [[10, 10, 30, 30], [20, 20, 40, 40]]
    assert int(dog.mask.sum()) == 400 + 400 - 100
    assert dog.meta["image"] == "000001" and dog.meta["box_difficult"] == [False, True]
    assert s["000001-person"].image.shape == (3, 60, 80)
    assert int(s["000004-chair"].mask.sum()) == 2 * 100


def test_voc07_skip_difficult_n_images_split_and_root_variants(voc_root: Path) -> None:
    ids = [s.image_id for s in get_dataset("voc07", root=str(voc_root), skip_difficult=True)]
    assert ids == ["000001-dog", "000001-person", "000010-tvmonitor"]
    assert [s.image_id for s in get_dataset("voc07", root=str(voc_root / "VOC2007"), n_images=2)] == [
        "000001-dog", "000001-person", "000004-chair"]
    assert [(s.image_id, s.label) for s in get_dataset("voc07", root=str(voc_root), split="train")] == [
        ("000002-cat", 7)]
    with pytest.raises(SaliencyBenchError, match=r"val\.txt does not exist; splits found: \['test', 'train'\]"):
        get_dataset("voc07", root=str(voc_root), split="val")


def test_voc07_missing_paths_and_unknown_class(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SaliencyBenchError, match=r"nowhere.*not a directory.*VOCdevkit"):
        get_dataset("voc07", root=str(tmp_path / "nowhere"))
    with pytest.raises(SaliencyBenchError, match="'root' is required"):
        get_dataset("voc07")
    with pytest.raises(SaliencyBenchError, match=r"ImageSets.Main is not a directory"):
        get_dataset("voc07", root=str(tmp_path))
    ann = voc_root / "VOC2007" / "Annotations"
    write_voc_xml(ann / "000004.xml", "000004.jpg", [("kitten", 1, 1, 5, 5, 0)])
    with pytest.raises(SaliencyBenchError, match=r"000004\.xml.*'kitten'"):
        get_dataset("voc07", root=str(voc_root))
    (ann / "000004.xml").unlink()
    with pytest.raises(SaliencyBenchError, match=r"000004\.xml.*does not exist"):
        get_dataset("voc07", root=str(voc_root))
    (ann / "000004.xml").write_text("<annotation><object>")
    with pytest.raises(SaliencyBenchError, match=r"cannot parse annotation .*000004\.xml"):
        get_dataset("voc07", root=str(voc_root))


# ---- imagenet-val -------------------------------------------------------------------------

@pytest.fixture()
def imagenet_tree(tmp_path: Path) -> Path:
    """val/ with 3 images, bbox/ with their XML, LOC_synset_mapping.txt with 4 synsets."""
    val, bbox = tmp_path / "val", tmp_path / "bbox"
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01751748 sea snake\nn09999999\n")
    objs = {1: [("n01751748", 111, 108, 441, 193, 0)], 2: [("n01440764", 5, 5, 20, 30, 0),
                                                         ("n01440764", 30, 5, 40, 10, 0)],
            3: [("n09999999", 1, 1, 10, 10, 0)]}
    for i, o in objs.items():
        stem = f"ILSVRC2012_val_{i:08d}"
        write_jpeg(val / f"{stem}.JPEG", width=500, height=375, seed=i)
        write_voc_xml(bbox / f"{stem}.xml", stem, o, width=500, height=375, folder="val")
    return tmp_path


def test_imagenet_val_labels_boxes_and_names(imagenet_tree: Path) -> None:
    t = imagenet_tree
    ds = get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "bbox"),
                     synsets=str(t / "LOC_synset_mapping.txt"))
    assert not ds.multi_label and len(ds) == 3
    assert ds.classes == ["tench, Tinca tinca", "goldfish, Carassius auratus", "sea snake", "n09999999"]
    assert ds.synsets[2] == "n01751748"
    samples = list(ds)
    assert [(s.image_id, s.label) for s in samples] == [
        ("ILSVRC2012_val_00000001", 2), ("ILSVRC2012_val_00000002", 0), ("ILSVRC2012_val_00000003", 3)]
    assert samples[0].boxes.tolist() == [[110, 107, 441, 193]] and samples[0].meta["synset"] == "n01751748"
    assert samples[0].image.shape == (3, 375, 500)
    assert samples[1].boxes.tolist() == [[4, 4, 20, 30], [29, 4, 40, 10]]
    assert int(samples[1].mask.sum()) == 16 * 26 + 11 * 6
    assert len(get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "bbox"),
                           synsets=str(t / "LOC_synset_mapping.txt"), n_images=1)) == 1


def test_imagenet_val_synset_folders_and_errors(imagenet_tree: Path) -> None:
    t = imagenet_tree
    nested = t / "nested" / "n01751748"
    nested.mkdir(parents=True)
    (t / "val" / "ILSVRC2012_val_00000001.JPEG").rename(nested / "ILSVRC2012_val_00000001.JPEG")
    kw = {"annotations": str(t / "bbox"), "synsets": str(t / "LOC_synset_mapping.txt")}
    assert [s.label for s in get_dataset("imagenet-val", root=str(t / "nested"), **kw)] == [2]
    with pytest.raises(SaliencyBenchError, match=r"synsets='.*missing\.txt' is not a file; expected a text file"):
        get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "bbox"), synsets=str(t / "missing.txt"))
    with pytest.raises(SaliencyBenchError, match="'synsets' is required"):
        get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "bbox"))
    with pytest.raises(SaliencyBenchError, match=r"annotations='.*nobbox' is not a directory"):
        get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "nobbox"), synsets=kw["synsets"])
    (t / "small.txt").write_text("n01440764 tench\n")
    with pytest.raises(SaliencyBenchError, match=r"ILSVRC2012_val_00000003\.xml names synset 'n09999999', "
                                                 r"which is not in the synset file"):
        get_dataset("imagenet-val", root=str(t / "val"), annotations=str(t / "bbox"), synsets=str(t / "small.txt"))
    (t / "bbox" / "ILSVRC2012_val_00000003.xml").unlink()
    with pytest.raises(SaliencyBenchError, match=r"1 image\(s\) have no annotation.*ILSVRC2012_val_00000003"):
        get_dataset("imagenet-val", root=str(t / "val"), **kw)


# ---- coco ---------------------------------------------------------------------------------

def write_coco(tmp_path: Path) -> tuple[Path, Path]:
    """val2017/ with 3 images and an instances JSON: polygons, a crowd RLE, categories out of id order."""
    images = tmp_path / "val2017"
    write_jpeg(images / "000000000139.jpg", width=64, height=48, seed=1)
    write_jpeg(images / "000000000285.jpg", width=40, height=30, seed=2)
    write_jpeg(images / "000000000632.jpg", width=40, height=30, seed=3)

    def square(x: float, y: float, s: float) -> list[list[float]]:
        return [[x, y, x + s, y, x + s, y + s, x, y + s]]

    crowd = np.zeros((48, 64), dtype=np.uint8)
    crowd[30:40, 40:60] = 1
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(crowd))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {
        "info": {"description": "fixture"}, "licenses": [],
        "images": [{"id": 285, "file_name": "000000000285.jpg", "width": 40, "height": 30},
                   {"id": 139, "file_name": "000000000139.jpg", "width": 64, "height": 48},
                   {"id": 632, "file_name": "000000000632.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 10, "name": "traffic light", "supercategory": "outdoor"}],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 100.0,
             "bbox": [10.0, 10.0, 10.0, 10.0], "segmentation": square(10, 10, 10)},
            {"id": 2, "image_id": 139, "category_id": 1, "iscrowd": 0, "area": 36.0,
             "bbox": [0.5, 30.25, 6.0, 6.0], "segmentation": square(0.5, 30.25, 6)},
            {"id": 3, "image_id": 139, "category_id": 18, "iscrowd": 0, "area": 50.0,
             "bbox": [30.0, 5.0, 10.0, 10.0], "segmentation": [[30, 5, 40, 5, 30, 15]]},
            {"id": 4, "image_id": 139, "category_id": 1, "iscrowd": 1, "area": 200.0,
             "bbox": [40.0, 30.0, 20.0, 10.0], "segmentation": rle},
            {"id": 5, "image_id": 285, "category_id": 10, "iscrowd": 0, "area": 50.0,
             "bbox": [30.0, 20.0, 15.0, 5.0], "segmentation": square(30, 20, 5)},
            {"id": 6, "image_id": 632, "category_id": 18, "iscrowd": 1, "area": 200.0,
             "bbox": [40.0, 30.0, 20.0, 10.0], "segmentation": rle},
        ],
    }
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(data))
    return images, ann


def test_coco_samples_boxes_masks_and_crowd(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    images, ann = write_coco(tmp_path)
    ds = get_dataset("coco", root=str(images), annotations=str(ann))
    assert ds.classes == ["person", "traffic light", "dog"] and ds.multi_label
    with pytest.warns(BoxClippedWarning, match="000000000285"):
        samples = list(ds)
    assert [(s.image_id, s.label) for s in samples] == [
        ("000000000139-person", 0), ("000000000139-dog", 2), ("000000000285-traffic_light", 1)]
    person, dog, light = samples
    assert person.meta["image"] == "000000000139" and person.meta["ann_ids"] == [1, 2]
    assert person.boxes.tolist() == [[10, 10, 20, 20], [0.5, 30.25, 6.5, 36.25]]
    assert person.mask.dtype == torch.bool and person.mask.shape == (48, 64)
    assert bool(person.mask[10:20, 10:20].all()) and not bool(person.mask[30:40, 40:60].any())
    expected = np.zeros((48, 64), dtype=bool)
    for a in (1, 2):
        expected |= ds.coco.annToMask(ds.coco.anns[a]).astype(bool)
    assert torch.equal(person.mask, torch.from_numpy(expected))
    assert dog.boxes.tolist() == [[30, 5, 40, 15]] and 0 < int(dog.mask.sum()) < 100
    assert bool(dog.mask[6, 31]) and not bool(dog.mask[13, 38])
    assert light.boxes.tolist() == [[30, 20, 40, 25]] and light.image.shape == (3, 30, 40)
    assert len(get_dataset("coco", root=str(images), annotations=str(ann), n_images=1)) == 2


def test_coco_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocotools")
    images, ann = write_coco(tmp_path)
    with pytest.raises(SaliencyBenchError, match=r"annotations='.*nope\.json' is not a file; expected a COCO"):
        get_dataset("coco", root=str(images), annotations=str(tmp_path / "nope.json"))
    with pytest.raises(SaliencyBenchError, match=r"root='.*val2014' is not a directory"):
        get_dataset("coco", root=str(tmp_path / "val2014"), annotations=str(ann))
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [10.0, 10.0, 0.0, 10.0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SaliencyBenchError, match=r"bad\.json: annotation 1 .*degenerate"):
        get_dataset("coco", root=str(images), annotations=str(bad))
    bad.write_text("{not json")
    with pytest.raises(SaliencyBenchError, match=r"cannot read COCO annotation file .*bad\.json"):
        get_dataset("coco", root=str(images), annotations=str(bad))
    (images / "000000000139.jpg").write_bytes(b"garbage")
    ds = get_dataset("coco", root=str(images), annotations=str(ann))
    with pytest.raises(UnreadableImageError, match=r"000000000139\.jpg"):
        ds[0]
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(SaliencyBenchError, match="pip install pycocotools"):
        get_dataset("coco", root=str(images), annotations=str(ann))


# ---- registry -----------------------------------------------------------------------------

def test_registered_with_summaries_and_common_errors(tmp_path: Path) -> None:
    for name in ("folder", "voc07", "imagenet-val", "coco"):
        spec = DATASETS.get(name)
        assert spec.summary and "n_images" in spec.params and "root" in spec.params
    with pytest.raises(SaliencyBenchError, match=r"root='.*missing' is not a directory; expected a directory"):
        get_dataset("folder", root=str(tmp_path / "missing"))
    with pytest.raises(SaliencyBenchError, match="n_images must be >= 1"):
        get_dataset("folder", root=str(tmp_path), n_images=0)
