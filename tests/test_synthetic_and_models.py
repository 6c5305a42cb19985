"""The synthetic data set's ground truth, and model loading (cache, checkpoints, errors)."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from saliencybench.benchmark.datasets import SHAPES, get_dataset, mask_box
from saliencybench.benchmark.models import (
    DEFAULT_ARCHS, DEFAULT_RECIPES, ModelLoadError, Recipe, architecture_key, default_model, load_model, read_state_dict,
    timm_model,
)
from saliencybench.errors import NotApplicableError, SaliencyBenchError, UnknownNameError
from saliencybench.modelutil import gap_linear_head


def test_synthetic_is_deterministic_exact_and_split_by_seed():
    a = get_dataset("synthetic", n_images=12, split="test")
    b = get_dataset("synthetic", n_images=12, split="test")
    tr = get_dataset("synthetic", n_images=12, split="train")
    assert len(SHAPES) >= 6 and len(a) == 12
    for i in range(12):
        s, t = a[i], b[i]
        assert torch.equal(s.image, t.image) and s.label == t.label
        assert s.image.shape == (3, 64, 64) and 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        assert s.mask.any() and torch.equal(s.boxes[0], mask_box(s.mask))
        x1, y1, x2, y2 = s.boxes[0].long().tolist()
        assert s.mask[y1:y2, x1:x2].sum() == s.mask.sum()  # the box holds the whole mask, tightly
        assert s.mask[y1, x1:x2].any() and s.mask[y2 - 1, x1:x2].any()
        assert not torch.equal(s.image, tr[i].image)
    assert len({a[i].label for i in range(12)}) >= 4


def test_synthetic_multi_label_two_disjoint_classes():
    ds = get_dataset("synthetic", n_images=6, multi_label=True, size=96)
    assert len(ds) == 12
    for i in range(0, 12, 2):
        s, t = ds[i], ds[i + 1]
        assert s.meta["image"] == t.meta["image"] and s.label != t.label
        assert torch.equal(s.image, t.image) and not (s.mask & t.mask).any()


def test_synthetic_bad_parameters():
    with pytest.raises(SaliencyBenchError, match="size"):
        get_dataset("synthetic", size=8)
    with pytest.raises(SaliencyBenchError, match="no parameter"):
        get_dataset("synthetic", colour="red")
    with pytest.raises(UnknownNameError, match="synthetic"):
        get_dataset("synthetc")


def test_default_model_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path))
    recipe = Recipe(arch="synthetic-resnet", n_train=64, n_val=32, epochs=1, batch_size=32)
    first = default_model("synthetic-resnet", recipe, progress=False)
    files = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    second = default_model("synthetic-resnet", recipe, progress=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
    assert 0 <= second.info["val_accuracy"] <= 1 and second.info["recipe_key"] == recipe.key()
    assert second.model.forward_features(x).shape[-1] >= 7  # CAM-family maps of at least 7x7
    assert Recipe(arch="synthetic-resnet", epochs=2).key() != recipe.key()


def test_an_edited_architecture_does_not_load_cached_weights(tmp_path, monkeypatch):
    """The cache key covers the architecture: with the same recipe, a changed layer (same
    parameter shapes) or a changed width gives a new key and a fresh model, never stale weights."""
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path))
    recipe = Recipe(arch="synthetic-resnet", n_train=64, n_val=32, epochs=1, batch_size=32)
    default_model("synthetic-resnet", recipe, progress=False)
    original = DEFAULT_ARCHS["synthetic-resnet"]

    def relu6(n_classes):  # same parameter shapes, another activation
        model = original(n_classes)
        model.act1 = torch.nn.ReLU6()
        return model

    def wider(n_classes):
        return timm.create_model("resnet10t", num_classes=n_classes)

    keys = {architecture_key(original(3))}
    for edited in (relu6, wider):
        monkeypatch.setitem(DEFAULT_ARCHS, "synthetic-resnet", edited)
        keys.add(architecture_key(edited(3)))
        bundle = default_model("synthetic-resnet", recipe, progress=False)
        assert architecture_key(bundle.model) in bundle.info["weights"]
    assert len(keys) == 3 and len(list((tmp_path / "models").glob("*.safetensors"))) == 3


def test_default_architectures_fit_the_benchmark():
    """Three timm families, >= 7x7 final maps and <= 192 channels at 64 px; only VGG's head is not GAP + linear."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG
    from timm.models.vision_transformer import VisionTransformer

    from saliencybench.methods.tokens import feature_map

    x = torch.rand(2, 3, 64, 64)
    families = {"synthetic-resnet": ResNet, "synthetic-mobilenetv2": EfficientNet, "synthetic-vgg": VGG,
                "synthetic-vit": VisionTransformer}
    assert set(DEFAULT_ARCHS) == set(families) == set(DEFAULT_RECIPES)
    for name, build in DEFAULT_ARCHS.items():
        torch.manual_seed(0)
        model = build(len(SHAPES)).eval()
        assert isinstance(model, families[name]) and DEFAULT_RECIPES[name].arch == name
        with torch.no_grad():
            feats, logits = model.forward_features(x), model(x)
        if name == "synthetic-vit":  # class token + 8x8 patch tokens, read as a map [2,96,8,8]
            assert feats.shape == (2, 1 + 8 * 8, 96)
            feats, _ = feature_map(model, feats, (64, 64))
        assert feats.shape[0] == 2 and feats.shape[1] <= 192 and min(feats.shape[-2:]) >= 7
        assert logits.shape == (2, len(SHAPES))
        assert sum(p.numel() for p in model.parameters()) < 2_000_000
        if name in ("synthetic-vgg", "synthetic-vit"):
            with pytest.raises(NotApplicableError):
                gap_linear_head(model, feats, logits)
        else:
            gap_linear_head(model, feats, logits)
    mobilenet = DEFAULT_ARCHS["synthetic-mobilenetv2"](len(SHAPES))
    assert any(type(m).__name__ == "InvertedResidual" for m in mobilenet.modules())
    recipe = DEFAULT_RECIPES["synthetic-vgg"]
    assert Recipe(arch=recipe.arch, head_lr_scale=1.0).key() != Recipe(arch=recipe.arch, head_lr_scale=0.5).key()


def test_checkpoints_load_safely_and_fail_clearly(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=3)
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": m.state_dict()}, pt)
    bundle = load_model("resnet10t", checkpoint=pt)
    assert bundle.model.num_classes == 3 and bundle.input_size == 176  # timm's data config for resnet10t
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(print))  # a pickle that is not plain tensors
    with pytest.raises(ModelLoadError, match="weights_only"):
        read_state_dict(evil)
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="unknown model"):
        timm_model("resnet-9000")
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), other)
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model("resnet10t", checkpoint=other)


def test_pretrained_offline_names_checkpoint(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no internet")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelLoadError, match="--checkpoint"):
        timm_model("resnet10t")
