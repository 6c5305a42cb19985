"""The method contract: shapes, model left untouched, CAM structure, errors, registries."""

from __future__ import annotations

import pytest
import torch

import saliencybench as sb
from saliencybench.errors import InvalidInputError, NotApplicableError, UnknownNameError
from saliencybench.methods.cam import cam_maps, gradcam_maps

from conftest import assert_same_state, make_images, make_model, snapshot

FAST = {"rise": {"n_masks": 16}, "smoothgrad": {"n_samples": 3}, "smoothgrad_sq": {"n_samples": 3},
        "vargrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 4},
        "occlusion": {"window": 16, "stride": 16}}


@pytest.mark.parametrize("method", sb.list_methods())
def test_every_method_shape_dtype_model_untouched(method):
    if sb.get_method(method).family == "attention":  # ViT-only methods: a tiny ViT (3x3 patch grid at 48 px)
        model = make_model("vit_tiny_patch16_224", img_size=48, depth=2, dtype=torch.float32)
        frozen = model.blocks[0]
    else:
        model = make_model("resnet10t", dtype=torch.float32)
        frozen = model.layer1
    model.train()  # a model handed over in training mode must come back in training mode
    frozen.requires_grad_(False)  # and with its own requires_grad flags
    before = snapshot(model)
    x = make_images(3, 48, dtype=torch.float32)
    heat = sb.explain(model, x, torch.tensor([0, 1, 9]), method, **FAST.get(method, {}))
    assert heat.shape == (3, 48, 48) and heat.dtype == torch.float32 and heat.device == x.device
    assert torch.isfinite(heat).all()
    assert_same_state(before, snapshot(model))
    again = sb.explain(model, x, torch.tensor([0, 1, 9]), method, **FAST.get(method, {}))
    assert torch.equal(heat, again), "deterministic for a given seed"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["guided_backprop", "gradcam", "scorecam", "occlusion", "guided_gradcam"])
def test_model_restored_after_exception_midway(method):
    model = make_model("resnet10t", dtype=torch.float32).train()
    before = snapshot(model)
    calls = {"n": 0}

    def explode(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise Boom("midway")

    handle = model.layer3.register_forward_hook(explode)
    params = {"layer": "layer4"} if method in ("gradcam", "scorecam", "guided_gradcam") else {}
    with pytest.raises(Boom):
        sb.explain(model, make_images(2, 48, dtype=torch.float32), torch.tensor([0, 1]), method, batch_size=1,
                   **params)
    handle.remove()
    after = snapshot(model)
    before["hooks"] = after["hooks"] = None  # compared below without our test hook
    assert_same_state(before, after)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert model.training


def test_gradcam_is_relu_cam_over_hw_on_gap_linear_models(resnet, effnet):
    for model in (resnet, effnet):
        x = make_images(2, 128, seed=11)
        t = torch.tensor([2, 6])
        c = cam_maps(model, x, t)
        g = gradcam_maps(model, x, t)
        h, w = c.shape[-2:]
        assert (h, w) == (4, 4)
        assert torch.allclose(g, torch.relu(c) / (h * w), rtol=1e-6, atol=1e-9)
        assert (c < 0).any(), "CAM keeps negative evidence (no ReLU)"


def test_cam_not_applicable_on_mobilenetv3_and_vgg(mobilenet):
    x = make_images(1, 64)
    with pytest.raises(NotApplicableError, match="gradcam"):
        sb.explain(mobilenet, x, torch.tensor([1]), "cam")
    assert not sb.get_method("cam").check(mobilenet).applicable
    vgg = make_model("vgg11", mlp_ratio=0.0625)
    with pytest.raises(NotApplicableError, match="GAP|average pool|classifier"):
        sb.explain(vgg, make_images(1, 64), torch.tensor([1]), "cam")
    assert not sb.get_method("cam").check(vgg).applicable
    assert sb.get_method("cam").check(make_model("resnet10t")).applicable
    # Grad-CAM needs no such structure
    assert sb.explain(vgg, make_images(1, 64), torch.tensor([1]), "gradcam").shape == (1, 64, 64)


def test_unknown_names_list_valid_ones_and_suggest():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'gradcam'") as e:
        sb.get_method("gradcamm")
    assert "occlusion" in str(e.value)
    with pytest.raises(UnknownNameError, match="deletion"):
        sb.get_metric("deletoin")
    model = make_model("resnet10t")
    with pytest.raises(UnknownNameError, match="layer4"):
        sb.explain(model, make_images(1, 32), torch.tensor([0]), "gradcam", layer="layer5")
    with pytest.raises(InvalidInputError, match="no parameter"):
        sb.explain(model, make_images(1, 32), torch.tensor([0]), "gradcam", windw=3)


def test_bad_images_and_targets():
    model = make_model("resnet10t")
    with pytest.raises(InvalidInputError, match=r"\[B,3,H,W\].*unsqueeze"):
        sb.explain(model, torch.rand(3, 32, 32), torch.tensor([0]), "saliency")
    with pytest.raises(InvalidInputError, match="floating"):
        sb.explain(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([0]), "saliency")
    with pytest.raises(InvalidInputError, match="one class per image"):
        sb.explain(model, make_images(2, 32), torch.tensor([0]), "saliency")
    with pytest.raises(InvalidInputError, match=r"out of range \[0, 10\).*samples \[1\]"):
        sb.explain(model, make_images(2, 32), torch.tensor([0, 10]), "saliency")
    bad = make_images(2, 32)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"samples \[1\]"):
        sb.explain(model, bad, torch.tensor([0, 1]), "saliency")


def test_bad_heatmaps_and_masks():
    model = make_model("resnet10t")
    x, t = make_images(2, 16), torch.tensor([0, 1])
    with pytest.raises(InvalidInputError, match="upsample"):
        sb.metrics.deletion(model, x, t, torch.rand(2, 8, 8))
    heat = torch.rand(2, 16, 16)
    heat[0, 3, 3] = float("inf")
    with pytest.raises(InvalidInputError, match=r"NaN or infinite values in samples \[0\]"):
        sb.metrics.insertion(model, x, t, heat)
    with pytest.raises(InvalidInputError, match="masks must have"):
        sb.metrics.pointing_game(torch.rand(2, 16, 16), torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="empty"):
        sb.metrics.pointing_game(torch.rand(1, 16, 16), torch.zeros(1, 16, 16, dtype=torch.bool))


def test_registries_declare_papers_params_and_direction():
    for name in sb.list_methods():
        spec = sb.get_method(name)
        assert spec.paper and spec.summary and spec.family in {"gradient", "cam", "perturbation", "baseline",
                                                                "attention"}
    assert sb.get_method("integrated_gradients").params["n_steps"] == 50
    assert sb.get_method("smoothgrad").params["noise_level"] == 0.15
    assert sb.get_method("smoothgrad").params["n_samples"] == 50
    assert sb.get_metric("deletion").higher_is_better is False
    assert sb.get_metric("insertion").higher_is_better is True
    assert sb.get_metric("pointing_game").params == {"tolerance": None, "ties": "first", "smooth": False,
                                                     "class_average": "present"}
    assert sb.get_metric("pointing_game").scaled(224, 224) == {"tolerance": 15.0}
    assert sb.get_metric("box_iou").params["threshold"] == 0.15
    assert set(sb.list_metrics()) >= {"deletion", "insertion", "pointing_game", "energy_pointing_game", "box_iou",
                                      "sanity_randomization"}
