"""Methods that share a forward and backward pass give exactly what they give alone."""

from __future__ import annotations

import warnings

import pytest
import torch

import saliencybench as sb
from saliencybench.methods import shared
from saliencybench.methods.shared import PassNeeds, SharedPasses, pass_requests

from conftest import assert_same_state, snapshot

SHARING = ["saliency", "gradcam", "gradcam_pp", "cam", "guided_gradcam"]


@pytest.mark.parametrize("fixture", ["resnet", "effnet"])
def test_explain_many_equals_each_method_alone(fixture, request, images, targets):
    model = request.getfixturevalue(fixture)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        many = sb.explain_many(model, images, targets, SHARING + ["random"])
        for name in SHARING + ["random"]:
            alone = sb.explain(model, images, targets, name)
            assert torch.allclose(many[name], alone, rtol=1e-6, atol=1e-9 * float(alone.abs().max())), name
    assert_same_state(before, snapshot(model))


def test_one_pass_serves_saliency_cam_gradcam_and_gradcam_pp(resnet, images, targets, monkeypatch):
    calls = []
    real = shared.gradient_pass
    monkeypatch.setattr(shared, "gradient_pass", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    sb.explain_many(resnet, images, targets, ["saliency", "gradcam", "gradcam_pp", "cam"])
    assert calls == [PassNeeds(layer=None, score="logit", acts=True, layer_grads=True, input_grads=True)]


def test_passes_are_split_only_where_layer_or_score_differ(resnet, images, targets):
    methods = {"gradcam": {"layer": "layer3"}, "gradcam_pp": {}, "saliency": {"score": "probability"}, "cam": {}}
    sp = SharedPasses(resnet, images, targets, pass_requests(methods))
    # saliency's probability score joins neither pass of logit gradients: it gets its own
    assert sorted((p.layer or "", p.score) for p in sp.plan) == [("", "logit"), ("", "probability"),
                                                                  ("layer3", "logit")]
    for name, p in methods.items():
        sb.explain(resnet, images, targets, name, shared=sp, **p)
    assert sp.passes_computed == 3
    ref = sb.explain(resnet, images, targets, "saliency", score="probability")
    assert torch.allclose(sb.explain(resnet, images, targets, "saliency", shared=sp, score="probability"), ref)


def test_cam_not_applicable_through_a_shared_pass(mobilenet, images, targets):
    with pytest.raises(sb.NotApplicableError, match="CAM"):
        sb.explain_many(mobilenet, images, targets, ["gradcam", "cam"])
    # gradcam alone from the same kind of pass still works
    out = sb.explain_many(mobilenet, images, targets, ["gradcam", "saliency"])
    assert out["gradcam"].shape == images.shape[:1] + images.shape[2:]
