"""Preprocessing protocols: squash (RISE), shorter side (TorchRay), centre crop (timm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saliencybench.benchmark.config import ConfigError, config_from_dict
from saliencybench.benchmark.datasets import Sample, get_dataset
from saliencybench.benchmark.models import load_model
from saliencybench.benchmark.preprocess import preprocess
from saliencybench.benchmark.runner import run
from saliencybench.errors import InvalidInputError
from saliencybench.methods.base import explain, upsample
from saliencybench.metrics.localisation import box_iou

from test_benchmark import tiny_config


def _sample(h: int = 50, w: int = 100, box=(10.0, 5.0, 30.0, 25.0)) -> Sample:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
    return Sample("a", torch.rand(3, h, w), 1, torch.tensor([box]), mask)


def test_squash_scales_boxes_by_hand():
    image, scored = preprocess(_sample(), 64, "squash")
    assert image.shape == (3, 64, 64) and scored.mask.shape == (64, 64)
    assert torch.allclose(scored.boxes, torch.tensor([[6.4, 6.4, 19.2, 32.0]]))


def test_shorter_side_keeps_aspect_and_original_ground_truth():
    s = _sample()
    image, scored = preprocess(s, 64, "shorter_side")
    assert image.shape == (3, 64, 128)
    assert scored is s


def test_center_crop_by_hand():
    # short side 50 -> floor(64 / 0.875) = 73: scale 1.46, resized 73x146, crop offset (top 4, left 41)
    image, scored = preprocess(_sample(), 64, "center_crop", crop_pct=0.875)
    assert image.shape == (3, 64, 64) and scored.mask.shape == (64, 64)
    assert torch.allclose(scored.boxes, torch.tensor([[0.0, 3.3, 2.8, 32.5]]), atol=1e-4)
    with pytest.raises(InvalidInputError, match="cuts every object box out"):
        preprocess(_sample(box=(0.0, 0.0, 10.0, 10.0)), 64, "center_crop")


def test_unknown_preprocessing_is_named():
    with pytest.raises(ConfigError, match="preprocess"):
        config_from_dict({"preprocess": "stretch"})


def test_runner_scores_shorter_side_at_the_original_resolution(tmp_path, checkpoint):  # noqa: F811
    root = tmp_path / "imgs"
    root.mkdir()
    xml = ("<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size><object><name>{c}</name>"
           "<difficult>0</difficult><bndbox><xmin>21</xmin><ymin>11</ymin><xmax>50</xmax><ymax>40</ymax></bndbox>"
           "</object></annotation>")
    shapes = [(48, 96), (96, 64), (48, 96)]  # two aspect ratios in one shard
    for i, ((h, w), c) in enumerate(zip(shapes, ["circle", "square", "ring"])):
        (root / f"im{i}.xml").write_text(xml.format(c=c, w=w, h=h))
        Image.fromarray((np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")).save(root / f"im{i}.png")
    cfg = tiny_config(tmp_path, checkpoint, dataset="folder", preprocess="shorter_side",
                      dataset_params={"root": str(root), "classes": ["circle", "square", "ring"]},
                      methods=["center", "gradcam"], metrics=["box_iou", "deletion"], n_images=3)
    rows = run(cfg, run_id="torchray", progress=False).results
    assert len(rows[(rows.metric == "box_iou") & (rows.method == "gradcam")]) == 3
    bundle = load_model("resnet10t", checkpoint=str(checkpoint))
    ds = get_dataset("folder", root=str(root), classes=["circle", "square", "ring"])
    for i, s in enumerate(ds):
        image, scored = preprocess(s, 64, "shorter_side")
        assert tuple(scored.mask.shape) == shapes[i]
        heat = explain(bundle.model, bundle.normalise(image[None]), [s.label], "gradcam")
        expected = box_iou(upsample(heat, shapes[i]), [s.boxes], threshold=0.15)[0]
        got = rows[(rows.metric == "box_iou") & (rows.method == "gradcam") & (rows.image_id == s.image_id)].value
        assert float(got.iloc[0]) == pytest.approx(float(expected), abs=1e-6)
