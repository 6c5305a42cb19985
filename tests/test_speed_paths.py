"""The fast paths (channels_last layout, shared clean scores) change no result."""

from __future__ import annotations

import torch

import saliencybench as sb
from saliencybench.methods import cam, perturbation
from saliencybench.metrics import perturbation_curves
from saliencybench.modelutil import channels_last

from conftest import make_images, make_model


def test_channels_last_restores_the_model_layout_and_keeps_values():
    model = make_model("efficientnet_b0", dtype=torch.float32)
    weight = model.conv_stem.weight
    x = make_images(dtype=torch.float32)
    with torch.inference_mode():
        ref = model(x)
        with channels_last(model) as fmt:
            assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
            out = model(fmt(x))
    assert model.conv_stem.weight is weight and weight.is_contiguous() and not weight.is_inference()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fast_layout_gives_the_same_perturbation_scores(monkeypatch):
    model = make_model("resnet18", dtype=torch.float32)
    x, t = make_images(dtype=torch.float32), torch.tensor([3, 7])
    heat = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = {
        "rise": sb.explain(model, x, t, "rise", n_masks=40),
        "scorecam": sb.explain(model, x, t, "scorecam", layer="layer3"),
        "curves": sb.metrics.deletion_insertion(model, x, t, heat, n_steps=8)["insertion"][1],
    }
    for module in (cam, perturbation, perturbation_curves):
        monkeypatch.setattr(module, "fast_layout", lambda images: False)
    plain = {
        "rise": sb.explain(model, x, t, "rise", n_masks=40),
        "scorecam": sb.explain(model, x, t, "scorecam", layer="layer3"),
        "curves": sb.metrics.deletion_insertion(model, x, t, heat, n_steps=8)["insertion"][1],
    }
    for k in fast:
        assert torch.allclose(fast[k], plain[k], rtol=1e-4, atol=1e-5 * float(plain[k].abs().max())), k
