"""The cue and contrast data sets, their models' verification and the model contrast score."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from saliencybench.benchmark.cue import (
    CONTRAST_TEXTURES,
    CUE_TEXTURES,
    background_removed,
    classes_of,
    cue_removed,
    object_removed,
    render_contrast,
    render_cue,
    shape_removed,
    texture,
)
from saliencybench.benchmark.cue_models import (
    CUE_RECIPES,
    TRAIN_IMAGES,
    ROLES,
    judge,
    verify_contrast_model,
    verify_contrast_models,
    verify_cue_model,
)
from saliencybench.benchmark.datasets import SHAPES, get_dataset
from saliencybench.benchmark.models import (
    DEFAULT_ARCHS,
    DEFAULT_RECIPES,
    MODELS,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    ModelBundle,
    Recipe,
    _training_data,
    train_default_model,
)
from saliencybench.errors import ConstantHeatmapWarning, InvalidInputError, NotApplicableError
from saliencybench.methods.baselines import edge
from saliencybench.metrics.base import ScoreBatch, get_metric
from saliencybench.metrics.contrast import bam_object_attribution, model_contrast, model_contrast_score

# ---- a hand-made oracle that reads the textures ---------------------------------------------------

class TextureOracle(nn.Module):
    """Fixed-weight texture reader: on the grey image minus its mean over one period (which keeps
    the texture and drops the clutter's slow gratings), for shifts by half a period down, right and diagonally, a pixel
    responds when four samples along the shift alternate (p-d, p+d equal; p, p+2d equal; neighbours
    differ), which a single edge or bar does not; pooled 3x3, then the max over the image.
    Stripes respond along one axis and the diagonal, the checker along both axes and not the
    diagonal, dots along all three: the logits are minus the distances of the normalised responses to
    those templates (classes in CUE_TEXTURES order). Reads only the texture, never the shape."""

    def __init__(self, half: int = 2):
        super().__init__()
        self.half = half
        self.register_buffer("templates", torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 0.75]]))
        self.probe = nn.Parameter(torch.zeros(1), requires_grad=False)  # so the model has a device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        d = x.mean(1, keepdim=True)
        h, (height, width) = self.half, x.shape[-2:]
        d = d - F.avg_pool2d(F.pad(d, (h, h - 1, h, h - 1), mode="replicate"), 2 * h, 1)  # drop slow clutter
        p = 3 * h
        padded = F.pad(d, (p, p, p, p), mode="replicate")

        def at(k: int, dy: int, dx: int) -> torch.Tensor:
            return padded[..., p + k * dy: p + k * dy + height, p + k * dx: p + k * dx + width]

        feats = []
        for dy, dx in ((h, 0), (0, h), (h, h)):
            a, b, c, e = (at(k, dy, dx) for k in (-1, 0, 1, 2))
            alternating = torch.minimum(torch.minimum((a - b).abs(), (b - c).abs()), (c - e).abs())
            f = F.avg_pool2d((alternating - (b - e).abs() - (a - c).abs()).clamp(min=0), 3, 1, 1)
            feats.append(f.amax((-2, -1)))
        return torch.cat(feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        r = f / (f.amax(1, keepdim=True) + 0.05)
        return -((r[:, None, :] - self.templates[None]) ** 2).sum(-1)


class BackgroundOracle(nn.Module):
    """Fixed-weight matched filter for the contrast set's background: the grey image minus its mean
    over one period, correlated with every texture (zero-mean, unit norm) at every phase; the logit
    of a class is its best |correlation|. Reads only the background texture."""

    def __init__(self, size: int = 64, period: int = 6):
        super().__init__()
        self.half = period // 2
        t = torch.stack([texture(k, size, size, period, py, px).float() for k in CONTRAST_TEXTURES
                         for py in range(period) for px in range(period)])
        t = t - t.mean((1, 2), keepdim=True)
        t = t / t.flatten(1).norm(dim=1).view(-1, 1, 1)
        self.register_buffer("templates", t.view(len(CONTRAST_TEXTURES), period * period, size, size))
        self.probe = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, d = self.half, x.mean(1, keepdim=True)
        z = (d - F.avg_pool2d(F.pad(d, (h, h - 1, h, h - 1), mode="replicate"), 2 * h, 1))[:, 0]
        return torch.einsum("bhw,kphw->bkp", z, self.templates).abs().amax(-1)


def bundle_of(model: nn.Module, classes: list[str], name: str = "oracle") -> ModelBundle:
    return ModelBundle(name, model.eval(), classes, 64, SYNTHETIC_MEAN, SYNTHETIC_STD)


# ---- the data sets ------------------------------------------------------------------------------

def test_textures_by_hand():
    """Pixel patterns and counts of each texture on small grids, with phases."""
    h = texture("hstripes", 4, 4, 4)
    assert h.tolist() == [[True] * 4, [True] * 4, [False] * 4, [False] * 4] and int(h.sum()) == 8
    assert texture("vstripes", 4, 4, 4).T.tolist() == h.tolist()
    assert texture("hstripes", 4, 4, 4, phase_y=1)[:, 0].tolist() == [True, False, False, True]
    c = texture("checker", 4, 4, 4)
    assert c.long().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    d = texture("dots", 8, 8, 4)
    assert int(d.sum()) == 16 and d[:2, :2].all() and not d[2:4].any() and not d[:, 2:4].any()
    assert int(texture("dots", 6, 6, 6).sum()) == 9
    for kind in CUE_TEXTURES:  # each texture's mirror image is itself up to a phase (flip augmentation)
        t = texture(kind, 12, 12, 4)
        assert any(torch.equal(t.flip(-1), texture(kind, 12, 12, 4, 0, px)) for px in range(4)), kind
    with pytest.raises(InvalidInputError, match="unknown texture"):
        texture("zigzag", 4, 4, 4)
    with pytest.raises(InvalidInputError, match="even"):
        texture("dots", 4, 4, 3)


def test_generation_is_deterministic():
    a, ta = render_cue(5, 3, "test")
    b, tb = render_cue(5, 3, "test")
    assert torch.equal(a, b) and torch.equal(ta["cue_mask"], tb["cue_mask"])
    assert not torch.equal(a, render_cue(5, 4, "test")[0]) and not torch.equal(a, render_cue(5, 3, "val")[0])
    c, _ = render_contrast(5, 3, "test")
    assert torch.equal(c, render_contrast(5, 3, "test")[0]) and not torch.equal(c, render_contrast(6, 3, "test")[0])
    ds = get_dataset("synthetic-cue", n_images=3, seed=3)
    assert torch.equal(ds[2].image, render_cue(2, 3, "test")[0]) and ds[2].image.shape == (3, 64, 64)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_cue_mask_and_box_exact():
    """A 4x4 cue: 16 mask pixels, its exact box, the texture drawn in two contrasting colours inside it."""
    ds = get_dataset("synthetic-cue", n_images=8, cue_min=4, cue_max=4)
    for i in range(8):
        s = ds[i]
        assert int(s.mask.sum()) == 16
        ys, xs = s.mask.nonzero().T
        y0, x0 = int(ys.min()), int(xs.min())
        assert s.mask[y0:y0 + 4, x0:x0 + 4].all()
        assert s.boxes.tolist() == [[x0, y0, x0 + 4, y0 + 4]]
        assert s.label == i % 4 and s.meta["texture"] == CUE_TEXTURES[s.label]
        gray = s.image.mean(0)[y0:y0 + 4, x0:x0 + 4]
        for phase in [(py, px) for py in range(4) for px in range(4)]:
            t = texture(CUE_TEXTURES[s.label], 4, 4, 4, *phase)
            if (gray[t].mean() - gray[~t].mean()).abs() > 0.2 and (gray[t].amax() < gray[~t].amin()
                                                                    or gray[t].amin() > gray[~t].amax()):
                break
        else:
            raise AssertionError(f"image {i}: the cue square does not show texture {CUE_TEXTURES[s.label]}")
        assert not (s.mask & s.meta["shape_mask"]).any() and s.meta["shape_mask"].sum() > 20


def test_classes_balanced_and_independent():
    pairs = [classes_of(i, 4, 6) for i in range(48)]
    assert sorted(set(pairs[:24])) == [(a, b) for a in range(4) for b in range(6)] and pairs[24:] == pairs[:24]
    ds = get_dataset("synthetic-cue", n_images=24)
    assert sorted((s.label, s.meta["shape_label"]) for s in ds) == [(a, b) for a in range(4) for b in range(6)]
    obj = get_dataset("synthetic-contrast", n_images=24)
    assert sorted((s.label, s.meta["background_label"]) for s in obj) == [(a, b) for a in range(6) for b in range(4)]
    bg = get_dataset("synthetic-contrast", n_images=24, label="background")
    for d in (ds, obj, bg):
        assert d.labels().tolist() == [s.label for s in d]


def test_cue_interventions_change_only_the_part():
    for i in range(6):
        clean, t = render_cue(i, 0, "test")
        changed = (clean != cue_removed(i, 0, "test")).any(0)
        assert not (changed & ~t["cue_mask"]).any() and changed.sum() >= 0.9 * t["cue_mask"].sum()
        changed = (clean != shape_removed(i, 0, "test")).any(0)
        assert not (changed & ~t["shape_mask"]).any() and changed.sum() >= 0.9 * t["shape_mask"].sum()
        both, _ = render_cue(i, 0, "test", cue=False, shape=False)
        assert torch.equal(both[:, ~(t["cue_mask"] | t["shape_mask"])], clean[:, ~(t["cue_mask"] | t["shape_mask"])])


def test_contrast_sets_and_interventions():
    obj = get_dataset("synthetic-contrast", n_images=6, seed=2)
    bg = get_dataset("synthetic-contrast", n_images=6, seed=2, label="background")
    assert obj.classes == list(SHAPES) and bg.classes == list(CONTRAST_TEXTURES)
    for i in range(6):
        a, b = obj[i], bg[i]
        assert a.image_id == b.image_id and torch.equal(a.image, b.image)
        assert a.label == a.meta["object_label"] and b.label == a.meta["background_label"]
        assert torch.equal(b.mask, ~a.mask) and torch.equal(a.meta["background_mask"], b.mask)
        assert b.boxes.tolist() == [[0, 0, 64, 64]] and a.boxes.shape == (1, 4)
        changed = (a.image != object_removed(i, 2, "test")).any(0)
        assert not (changed & ~a.mask).any() and changed.sum() >= 0.9 * a.mask.sum()
        plain = background_removed(i, 2, "test")
        diff = (a.image - plain).mean(0)
        changed = (a.image != plain).any(0)
        assert not (changed & a.mask).any() and changed.sum() >= 0.5 * b.mask.sum()
        # what the removal takes away is the texture itself: brighter exactly where it is on
        kind = CONTRAST_TEXTURES[a.meta["background_label"]]
        assert any(torch.equal((diff > 0)[changed], texture(kind, 64, 64, 6, py, px)[changed])
                   for py in range(6) for px in range(6))


def test_bad_parameters():
    for name, params, match in [
        ("synthetic-cue", {"size": 16}, "size"), ("synthetic-cue", {"split": "dev"}, "split"),
        ("synthetic-cue", {"cue_min": 9, "cue_max": 8}, "cue sides"), ("synthetic-cue", {"period": 3}, "even"),
        ("synthetic-cue", {"n_images": 0}, "n_images"), ("synthetic-contrast", {"label": "scene"}, "label"),
        ("synthetic-contrast", {"period": 5}, "even"), ("synthetic-contrast", {"n_distractors": -1}, "n_distractors"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            get_dataset(name, **params)
    with pytest.raises(InvalidInputError, match="split"):
        cue_removed(0, 0, "dev")


# ---- recipes and registration ----------------------------------------------------------------------

def test_default_recipe_keys_unchanged():
    """The synthetic models' cache keys are those of the recipe without the data-set fields (the
    training thread count enters it: it changes the weights)."""
    old_fields = ("arch", "size", "n_train", "n_val", "epochs", "batch_size", "lr", "head_lr_scale", "weight_decay",
                  "seed", "threads")
    for recipe in [*DEFAULT_RECIPES.values(), Recipe(arch="synthetic-resnet", epochs=7)]:
        blob = json.dumps({**{k: getattr(recipe, k) for k in old_fields}, "v": 2,
                           "timm": timm.__version__.split(".")[0]}, sort_keys=True)
        assert recipe.key() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    base = Recipe(arch="synthetic-resnet")
    assert base.threads == 1 and Recipe(arch="synthetic-resnet", threads=2).key() != base.key()
    cue_key = Recipe(arch="synthetic-resnet", dataset="synthetic-cue").key()
    assert len({base.key(), cue_key, CUE_RECIPES["contrast-object-resnet"].key(),
                CUE_RECIPES["contrast-background-resnet"].key()}) == 4


def test_cue_models_registered():
    for name, recipe in CUE_RECIPES.items():
        assert name in MODELS and recipe.arch in DEFAULT_ARCHS and ROLES[name] in ("cue", "object", "background")
        default = DEFAULT_RECIPES[recipe.arch]
        assert {k: v for k, v in recipe.__dict__.items() if not k.startswith("dataset") and k != "n_train"} == \
               {k: v for k, v in default.__dict__.items() if not k.startswith("dataset") and k != "n_train"}
        assert recipe.n_train == TRAIN_IMAGES[ROLES[name]]
    assert CUE_RECIPES["cue-vgg"].classes() == list(CUE_TEXTURES)
    assert CUE_RECIPES["contrast-background-resnet"].classes() == list(CONTRAST_TEXTURES)
    assert CUE_RECIPES["contrast-object-resnet"].classes() == list(SHAPES)


def test_loader_keeps_the_verification_with_the_weights(tmp_path, monkeypatch):
    """load_model("cue-resnet") loads cached weights, verifies once and keeps the record in the cache metadata."""
    from safetensors.torch import save_file

    from saliencybench.benchmark import cue_models, models

    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(cue_models, "VERIFY_IMAGES", 24)
    recipe = CUE_RECIPES["cue-resnet"]
    model = DEFAULT_ARCHS[recipe.arch](4)
    stem = models.cache_dir() / f"cue-resnet-{recipe.key()}-{models.architecture_key(model)}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps({"val_accuracy": 0.25}))
    bundle = models.load_model("cue-resnet")
    record = bundle.info["verification"]
    assert bundle.classes == list(CUE_TEXTURES) and bundle.info["source"] == "trained on synthetic-cue"
    assert record["n_images"] == 24 and record["check"] == "cue" and not record["valid"]  # random weights
    assert json.loads(stem.with_suffix(".json").read_text())["verification"] == record
    monkeypatch.setattr(cue_models, "verify", lambda *a, **k: pytest.fail("verified twice"))
    assert models.load_model("cue-resnet").info["verification"] == record


def test_training_data_follows_the_recipe():
    recipe = Recipe(arch="synthetic-resnet", n_train=8, n_val=4, dataset="synthetic-contrast",
                    dataset_params=(("label", "background"),))
    xtr, ytr, xva, _ = _training_data(recipe)
    ds = get_dataset("synthetic-contrast", n_images=8, split="train", label="background")
    assert torch.equal(xtr, ds.images()) and ytr.tolist() == [s.label for s in ds] and xva.shape == (4, 3, 64, 64)


# ---- verification ------------------------------------------------------------------------------------

def test_judge_by_hand():
    ok = judge(0.99, 0.26, 0.985, 4)
    assert ok["passed"] and ok["reasons"] == [] and ok["chance"] == 0.25
    assert ok["thresholds"]["cue_removed"] == [0.2, 0.3]
    assert judge(0.94, 0.25, 0.94, 4)["reasons"][0].startswith("clean accuracy 0.940 < 0.95")
    assert "chance" in judge(0.99, 0.31, 0.99, 4)["reasons"][0]
    assert "depends on the shape" in judge(0.99, 0.25, 0.96, 4)["reasons"][0]
    assert judge(0.99, 0.25, 1.0, 4)["passed"]  # within 2 points either way


def test_verification_passes_on_the_oracle():
    record = verify_cue_model(bundle_of(TextureOracle(), list(CUE_TEXTURES)), n_images=240)
    acc = record["accuracy"]
    assert record["passed"] and record["valid"] and record["reason"] == "all checks passed", record
    assert acc["clean"] >= 0.97 and abs(acc["cue_removed"] - 0.25) <= 0.05 and acc["shape_removed"] == acc["clean"]
    assert record["dataset"] == "synthetic-cue" and record["n_images"] == 240 and record["split"] == "test"


def test_verification_fails_on_a_model_trained_on_shapes():
    """A ResNet trained on the plain synthetic set (a few steps) does not read the cue: the check fails."""
    torch.manual_seed(0)
    model, _ = train_default_model(Recipe(arch="synthetic-resnet", n_train=96, n_val=24, epochs=1), progress=False)
    assert model.get_classifier().out_features == len(SHAPES)
    record = verify_cue_model(bundle_of(model, list(SHAPES), "shapes"), n_images=96)
    assert not record["passed"] and not record["valid"]
    assert record["reasons"][0].startswith("the model has 6 classes, synthetic-cue 4")
    assert record["reasons"][1].startswith("clean accuracy") and record["accuracy"]["clean"] < 0.6
    assert record["model_classes"] == 6 and record["dataset_classes"] == 4
    # four classes, but reads period-6 background textures, not the cue: fails on clean accuracy alone
    record = verify_cue_model(bundle_of(BackgroundOracle(), list(CUE_TEXTURES), "bg-oracle"), n_images=96)
    assert not record["passed"] and record["reasons"][0].startswith("clean accuracy")
    assert record["accuracy"]["clean"] < 0.5


def test_contrast_verification():
    """The texture oracle is a valid background model and an invalid object model."""
    oracle = bundle_of(BackgroundOracle(), list(CONTRAST_TEXTURES), "texture-oracle")
    rb = verify_contrast_model(oracle, "background", n_images=240)
    assert rb["passed"], rb
    assert abs(rb["accuracy"]["background_removed"] - 0.25) <= 0.05
    pair = verify_contrast_models(oracle, oracle, n_images=240)
    assert not pair["passed"] and pair["background_model"]["passed"] and not pair["object_model"]["passed"]
    assert pair["reason"].startswith("texture-oracle: the model has 4 classes, synthetic-contrast 6")
    assert "texture-oracle: clean accuracy" in pair["reason"]
    with pytest.raises(InvalidInputError, match="role"):
        verify_contrast_model(oracle, "scene")
    with pytest.raises(InvalidInputError, match="thresholds"):
        verify_cue_model(oracle, min_accuracy=95)


# ---- model contrast -----------------------------------------------------------------------------------

def _contrast_case(n: int = 4):
    ds = get_dataset("synthetic-contrast", n_images=n)
    images = torch.stack([s.image for s in ds])
    obj = torch.stack([s.mask for s in ds])
    return images, obj


def test_model_contrast_oracle_and_edge():
    images, obj = _contrast_case()
    assert torch.equal(model_contrast(obj.float(), (~obj).float(), obj), torch.ones(4))
    assert torch.equal(model_contrast(obj.float(), (~obj).float(), obj, measure="bam"), torch.ones(4))
    e = edge(None, images, torch.zeros(4, dtype=torch.long))  # ignores the model: the same map for A and B
    assert torch.equal(model_contrast(e, e, obj), torch.zeros(4))
    assert model_contrast_score(e, e, obj)["model_contrast"] == 0.0


def test_model_contrast_by_hand_and_bam_reference():
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    a = torch.tensor([[[3.0, 1.0], [-5.0, 0.0]]])  # share 3/4
    b = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # share 1/4
    assert torch.allclose(model_contrast(a, b, mask), torch.tensor([0.5]))
    g = torch.Generator().manual_seed(0)
    heat_a, heat_b = torch.randn(3, 9, 7, generator=g), torch.randn(3, 9, 7, generator=g)
    masks = torch.rand(3, 9, 7, generator=g) > 0.6

    def bam_reference(h: np.ndarray, m: np.ndarray) -> float:  # BAM's visualize_pos_attr + single_attr, slowly
        p = np.clip(h, 0, None)
        vmax, vmin = np.percentile(p, 99), p.min()
        s = np.clip((p - vmin) / (vmax - vmin), 0, 1)
        return sum(s[i, j] for i in range(h.shape[0]) for j in range(h.shape[1]) if m[i, j]) / m.sum()

    want = [bam_reference(heat_a[i].numpy(), masks[i].numpy()) - bam_reference(heat_b[i].numpy(), masks[i].numpy())
            for i in range(3)]
    assert np.allclose(model_contrast(heat_a, heat_b, masks, measure="bam").numpy(), want, atol=1e-6)
    assert np.allclose(bam_object_attribution(heat_a, masks).numpy(),
                       [bam_reference(heat_a[i].numpy(), masks[i].numpy()) for i in range(3)], atol=1e-6)
    score = model_contrast_score(heat_a, heat_b, masks, correct=torch.tensor([True, False, True]))
    assert score["n_images"] == 2
    assert np.isclose(score["model_contrast"], model_contrast(heat_a, heat_b, masks)[[0, 2]].double().mean().item())
    assert np.isnan(model_contrast_score(heat_a, heat_b, masks, correct=torch.zeros(3, dtype=torch.bool))
                    ["model_contrast"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert bam_object_attribution(torch.zeros(1, 2, 2), mask).item() == 0.0
    assert any(issubclass(x.category, ConstantHeatmapWarning) for x in w)


def test_model_contrast_bad_inputs():
    _, obj = _contrast_case(2)
    with pytest.raises(InvalidInputError, match="same shape"):
        model_contrast(torch.zeros(2, 64, 64), torch.zeros(1, 64, 64), obj)
    with pytest.raises(InvalidInputError, match="measure"):
        model_contrast(obj.float(), obj.float(), obj, measure="mean")
    with pytest.raises(InvalidInputError, match="empty"):
        model_contrast(obj.float(), obj.float(), torch.zeros_like(obj))
    with pytest.raises(InvalidInputError, match="correct"):
        model_contrast_score(obj.float(), obj.float(), obj, correct=torch.ones(3, dtype=torch.bool))


def test_registered_metric_scores_two_batches():
    spec = get_metric("model_contrast")
    assert spec.criterion == "model_use" and spec.higher_is_better and spec.value_range == (-1.0, 1.0)
    images, obj = _contrast_case()
    labels_a, labels_b = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0])
    a = ScoreBatch(None, images, labels_a, obj.float(), masks=list(obj), labels=labels_a,
                   logits=F.one_hot(torch.tensor([0, 1, 2, 0]), 6).float())
    b = ScoreBatch(None, images, labels_b, (~obj).float(), masks=list(~obj), labels=labels_b,
                   logits=F.one_hot(labels_b, 4).float())
    with pytest.raises(NotApplicableError, match="batch.contrast"):
        spec.score(a, {})
    a.contrast = b  # the runner attaches the background model's batch of the same images
    values = spec.score(a, {}).values["model_contrast"]
    assert values[:3].tolist() == [1.0, 1.0, 1.0] and np.isnan(values[3])  # image 3: model A is wrong
    with pytest.raises(InvalidInputError, match="measure"):
        spec.check_params({"measure": "mean"})
