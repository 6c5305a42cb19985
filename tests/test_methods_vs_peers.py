"""Each method checked numerically against Captum and pytorch-grad-cam on the same
random-init timm models (in float64) and inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import saliencybench as sb
from saliencybench.methods import cam as cam_mod


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    ref = ref.to(ours)
    scale = ref.abs().max().clamp(min=1e-12)
    assert ours.shape == ref.shape
    err = float((ours - ref).abs().max().detach() / scale)
    assert err < rtol, f"max relative error {err:.3g}"


def last_stage(model):
    return model.layer4 if hasattr(model, "layer4") else model.bn2


@pytest.mark.parametrize("name", ["resnet", "effnet"])
def test_saliency_equals_captum(name, request, images, targets):
    model = request.getfixturevalue(name)
    ours = sb.explain(model, images, targets, "saliency")
    ref = Saliency(model).attribute(images.clone().requires_grad_(), target=targets, abs=True).amax(1)
    close(ours, ref)
    assert ours.abs().sum() > 0


def test_guided_backprop_equals_captum_with_inplace_relu(resnet, images, targets):
    assert any(getattr(m, "inplace", False) for m in resnet.modules())
    ours = sb.explain(resnet, images, targets, "guided_backprop", reduce="sum")
    # Captum's hooks need out-of-place ReLUs; the guided rule is the same.
    plain = copy.deepcopy(resnet)
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    ref = GuidedBackprop(plain).attribute(images.clone().requires_grad_(), target=targets).sum(1)
    close(ours, ref)
    # and the guided rule really differs from the plain gradient
    grad = sb.explain(resnet, images, targets, "saliency", reduce="sum")
    assert not torch.allclose(ours, grad)


def test_guided_backprop_on_silu_model_warns_and_flags(effnet, images, targets):
    assert not sb.get_method("guided_backprop").check(effnet).applicable
    with pytest.warns(sb.errors.NotGuidedRuleWarning, match="SiLU"):
        ours = sb.explain(effnet, images, targets, "guided_backprop")
    ref = GuidedBackprop(effnet).attribute(images.clone().requires_grad_(), target=targets).abs().amax(1)
    close(ours, ref)


@pytest.mark.parametrize("name", ["resnet", "effnet"])
@pytest.mark.parametrize("window,stride,baseline", [(8, 4, 0.0), (12, 5, 0.3)])
def test_occlusion_equals_captum(name, window, stride, baseline, request, targets):
    model = request.getfixturevalue(name)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = sb.explain(model, x, targets, "occlusion", window=window, stride=stride, baseline=baseline, batch_size=37)
    ref = Occlusion(model).attribute(
        x, target=targets, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
        baselines=baseline, perturbations_per_eval=16,
    )
    for c in range(3):
        close(ours, ref[:, c])


@pytest.mark.parametrize("name", ["resnet", "effnet"])
def test_gradcam_equals_captum_layergradcam(name, request, targets):
    model = request.getfixturevalue(name)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sb.explain(model, x, targets, "gradcam")
    lgc = LayerGradCam(model, last_stage(model)).attribute(x, target=targets, relu_attributions=True)
    ref = LayerAttribution.interpolate(lgc, (96, 96), "bilinear")[:, 0]
    close(ours, ref)
    assert ours.max() > 0


@pytest.mark.parametrize("name", ["resnet", "effnet"])
def test_gradcam_named_layer_equals_captum(name, request, targets):
    model = request.getfixturevalue(name)
    layer = "layer3" if name == "resnet" else "blocks.5"
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sb.explain(model, x, targets, "gradcam", layer=layer)
    module = model.get_submodule(layer)
    lgc = LayerGradCam(model, module).attribute(x, target=targets, relu_attributions=True)
    close(ours, LayerAttribution.interpolate(lgc, (96, 96), "bilinear")[:, 0])


def _pgc(cls, model, x, targets, layer, **attrs):
    """pytorch-grad-cam's final output [B,H,W] and its layer-resolution map ReLU(sum w A) [B,h,w]."""
    tg = [ClassifierOutputTarget(int(t)) for t in targets]
    with cls(model=model, target_layers=[layer]) as cam:
        for k, v in attrs.items():
            setattr(cam, k, v)
        out = cam(input_tensor=x, targets=tg)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy() if cam.activations_and_grads.gradients else None
        layer_map = np.maximum(cam.get_cam_image(x, layer, tg, acts, grads, False), 0)
    return torch.from_numpy(np.asarray(out)).double(), torch.from_numpy(np.asarray(layer_map)).double()


def _unscale(scaled: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Undo pytorch-grad-cam's per-image min-max scaling, done at layer resolution before resizing."""
    lo = small.flatten(1).amin(1).view(-1, 1, 1)
    hi = small.flatten(1).amax(1).view(-1, 1, 1)
    return scaled * (1e-7 + hi - lo) + lo


CAM_CASES = [
    ("gradcam", GradCAM, cam_mod.gradcam_maps, {}, {}),
    ("gradcam_pp", GradCAMPlusPlus, cam_mod.gradcam_pp_maps, {}, {}),
    ("scorecam", ScoreCAM, cam_mod.scorecam_maps,
     {"weights": "channel_softmax", "align_corners": True, "layer": "layer3"}, {"batch_size": 256}),
]


# Score-CAM costs one forward per channel: EfficientNet's 1280 channels are left to the ResNet's 512.
CAM_MODELS = [(case, name) for case in CAM_CASES for name in ("resnet", "effnet")
              if not (case[0] == "scorecam" and name == "effnet")]


@pytest.mark.parametrize("case,name", CAM_MODELS, ids=[f"{c[0]}-{n}" for c, n in CAM_MODELS])
def test_cam_family_equals_pytorch_grad_cam(case, name, request, targets):
    """Layer-resolution maps equal pytorch-grad-cam's to 1e-6; its final (min-max scaled,
    OpenCV-resized) output, unscaled, equals our upsampled map up to the difference of
    OpenCV's resize and torch's bilinear align_corners=False (about 1% of the maximum)."""
    method, cls, maps_fn, params, attrs = case
    model = request.getfixturevalue(name)
    b, size = (1, 48) if method == "scorecam" else (2, 96)  # Score-CAM: one forward per channel
    x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = targets[:b]
    layer = model.get_submodule(params["layer"]) if "layer" in params else last_stage(model)
    ref_up, ref_small = _pgc(cls, model, x, targets, layer, **attrs)
    small = maps_fn(model, x, targets, **params)
    close(small, ref_small, rtol=1e-6)
    assert small.max() > 0
    ours = sb.explain(model, x, targets, method, **params)
    close(ours, _unscale(ref_up, small), rtol=1e-2)


@pytest.mark.parametrize("name", ["resnet", "effnet"])
def test_integrated_gradients_equals_captum(name, request, images, targets):
    model = request.getfixturevalue(name)
    ours = sb.explain(model, images, targets, "integrated_gradients", n_steps=20, reduce="sum", batch_size=16)
    ref = IntegratedGradients(model).attribute(images, target=targets, n_steps=20, baselines=0.0,
                                               method="gausslegendre").sum(1)
    close(ours, ref)
    # Captum's trapezoid weights are 1/n (ends halved), summing to (n-1)/n rather than 1;
    # ours are the trapezoid rule's 1/(n-1), so the two differ by exactly that factor.
    ours_t = sb.explain(model, images, targets, "integrated_gradients", n_steps=20, rule="riemann_trapezoid")
    ref_t = IntegratedGradients(model).attribute(images, target=targets, n_steps=20, baselines=0.0,
                                                 method="riemann_trapezoid").abs().amax(1)
    close(ours_t * 19 / 20, ref_t)


def test_integrated_gradients_completeness(resnet, images, targets):
    """IG's attributions sum to score(x) - score(baseline) (Sundararajan et al.'s completeness)."""
    ig = sb.explain(resnet, images, targets, "integrated_gradients", n_steps=64, reduce="sum")
    with torch.no_grad():
        diff = resnet(images)[torch.arange(2), targets] - resnet(torch.zeros_like(images))[torch.arange(2), targets]
    assert torch.allclose(ig.double().flatten(1).sum(1), diff, rtol=2e-2, atol=1e-3)


def test_smoothgrad_is_mean_saliency_over_seeded_noise(resnet, images, targets):
    n, level = 4, 0.15
    ours = sb.explain(resnet, images, targets, "smoothgrad", n_samples=n, noise_level=level, seed=3, batch_size=3)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((n, *images.shape), generator=g, dtype=images.dtype)
    sigma = level * (images.flatten(1).amax(1) - images.flatten(1).amin(1))
    ref = torch.stack([sb.explain(resnet, images + sigma.view(-1, 1, 1, 1) * noise[i], targets, "saliency")
                       for i in range(n)]).mean(0)
    close(ours, ref)
    again = sb.explain(resnet, images, targets, "smoothgrad", n_samples=n, seed=3)
    assert torch.equal(ours, again)


def test_rise_equals_slow_reference(resnet, targets):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    from saliencybench.methods.perturbation import rise_mask_batch, rise_masks

    n, s, p = 30, 4, 0.5
    ours = sb.explain(resnet, x, targets, "rise", n_masks=n, grid_size=s, keep_prob=p, seed=2, batch_size=7)
    grids, shifts = rise_masks(n, 32, 32, s, p, seed=2)
    ref = torch.zeros(2, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            m = rise_mask_batch(grids[i : i + 1], shifts[i : i + 1], 32, 32)[0].double()
            # each mask is bilinear-smooth, in [0,1], of the image size
            assert 0 <= float(m.min()) and float(m.max()) <= 1 + 1e-6
            for b in range(2):
                prob = resnet(x[b : b + 1] * m).softmax(1)[0, targets[b]]
                ref[b] += prob * m
    close(ours, ref / (n * p))
    kw = dict(n_masks=n, grid_size=s, keep_prob=p)
    assert torch.equal(ours, sb.explain(resnet, x, targets, "rise", seed=2, batch_size=7, **kw))
    close(sb.explain(resnet, x, targets, "rise", seed=2, batch_size=64, **kw), ours)  # same masks, any batching
    assert not torch.allclose(ours, sb.explain(resnet, x, targets, "rise", seed=3, batch_size=7, **kw))


def test_guided_gradcam_equals_captum(resnet, targets):
    from captum.attr import GuidedGradCam

    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ours = sb.explain(resnet, x, targets, "guided_gradcam", reduce="sum")
    plain = copy.deepcopy(resnet)
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    ref = GuidedGradCam(plain, plain.layer4).attribute(x, target=targets, interpolate_mode="bilinear").sum(1)
    close(ours, ref)


def test_baselines_by_hand():
    x = torch.zeros(1, 3, 9, 12)
    x[..., 6:] = 1.0  # a vertical step edge between columns 5 and 6
    edge = sb.explain(torch.nn.Identity(), x, torch.tensor([0]), "edge")
    assert edge[0, 4, 5] == pytest.approx(4.0) and edge[0, 4, 6] == pytest.approx(4.0)
    assert edge[0, 4, 0] == 0 and edge[0, 4, 11] == 0
    center = sb.explain(torch.nn.Identity(), x, torch.tensor([0]), "center")
    assert int(center[0].flatten().argmax()) == 4 * 12 + 6 and (center[0] == center[0].max()).sum() == 1
    r1 = sb.explain(torch.nn.Identity(), x, torch.tensor([0]), "random", seed=1)
    assert torch.equal(r1, sb.explain(torch.nn.Identity(), x, torch.tensor([0]), "random", seed=1))
    assert not torch.equal(r1, sb.explain(torch.nn.Identity(), x, torch.tensor([0]), "random", seed=2))
