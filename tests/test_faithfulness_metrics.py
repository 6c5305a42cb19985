"""ROAD, faithfulness correlation, average drop / increase in confidence and infidelity:
each against a peer on the same inputs (the ROAD authors' imputer re-implemented
here from its definition, Quantus, Captum, pytorch-grad-cam), an analytic case, bad
input, and the runner's path (``get_metric(name).score``) against the direct call."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from captum.metrics import infidelity as captum_infidelity
from conftest import assert_same_state, make_images, make_model, snapshot
from torch import nn

from saliencybench.errors import InvalidInputError

fm = importlib.import_module("saliencybench.metrics.faithfulness")
rd = importlib.import_module("saliencybench.metrics.road")  # the package attribute `road` is the function
from saliencybench.metrics.base import GROUPS, ScoreBatch, get_metric

SIZE = 32


class Linear(nn.Module):
    """logits = W x + b on the flattened image: every drop is known in closed form.
    ``same_channels``: W equal over the three channels (then a map-level heatmap can be exact)."""

    def __init__(self, size: int = SIZE, n_classes: int = 10, seed: int = 0, same_channels: bool = False,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n_classes, 1 if same_channels else 3, size, size, generator=g, dtype=dtype)
        self.weight = nn.Parameter(w.expand(n_classes, 3, size, size).clone() / size)
        self.bias = nn.Parameter(torch.randn(n_classes, generator=g, dtype=dtype))
        self.num_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.flatten(1).T + self.bias


class SmallNet(nn.Module):
    """A float32 conv net without batch norm (fast paths change nothing but the layout)."""

    def __init__(self, n_classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, n_classes))
        self.num_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 4


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return make_model("resnet18")


@pytest.fixture(scope="module")
def data():
    x = make_images(2, SIZE)
    g = torch.Generator().manual_seed(5)
    heat = torch.randperm(2 * SIZE * SIZE, generator=g).view(2, SIZE, SIZE).double() / (2 * SIZE * SIZE)
    return x, torch.tensor([3, 7]), heat  # tie-free heatmaps: every library orders them alike


# ---- ROAD: the authors' imputer, from its definition -------------------------------------------

AUTHORS_WEIGHTS = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                   ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]


def authors_imputer(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NoisyLinearImputer (noise 0) the slow way: img [C,H,W], mask [H,W] (1 kept, 0 removed).
    Per removed pixel i: A[i,i] = -(1 - weights of neighbours outside the image), A[i,j] = w for a
    removed neighbour j, b[i] = -sum of w * value over kept neighbours; A y = b, one dense solve."""
    c, h, w = img.shape
    removed = [(r, q) for r in range(h) for q in range(w) if mask[r, q] == 0]
    var = {p: i for i, p in enumerate(removed)}
    a, b = np.zeros((len(removed), len(removed))), np.zeros((len(removed), c))
    for i, (r, q) in enumerate(removed):
        total = 1.0
        for (dr, dq), wt in AUTHORS_WEIGHTS:
            rr, qq = r + dr, q + dq
            if not (0 <= rr < h and 0 <= qq < w):
                total -= wt
            elif mask[rr, qq] == 1:
                b[i] -= wt * img[:, rr, qq]
            else:
                a[i, var[(rr, qq)]] = wt
        a[i, i] = -total
    out = img.copy()
    y = np.linalg.solve(a, b)
    for i, (r, q) in enumerate(removed):
        out[:, r, q] = y[i]
    return out


@pytest.mark.parametrize("shape", [(9, 11), (16, 16)])
def test_imputer_equals_the_authors_definition(shape):
    h, w = shape
    g = torch.Generator().manual_seed(0)
    img = torch.randn(4, 3, h, w, generator=g, dtype=torch.float64)
    removed = torch.rand(4, h, w, generator=g) < torch.tensor([0.1, 0.5, 0.9, 0.97])[:, None, None]
    removed[1, :4, :5] = True  # a blob touching two borders
    removed[2, 0, 0] = removed[2, -1, -1] = True  # corners
    removed[:, h // 2, w // 2] = False  # at least one kept pixel
    ours = rd.noisy_linear_impute(img, removed, noise=0.0)
    for i in range(4):
        ref = authors_imputer(img[i].numpy(), (~removed[i]).numpy().astype(np.uint8))
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-12)
    assert torch.equal(ours[~removed[:, None].expand_as(img)], img[~removed[:, None].expand_as(img)])


def test_imputer_equals_quantus_and_adds_seeded_noise():
    from quantus.functions.perturb_func import noisy_linear_imputation

    img = make_images(1, 24)
    removed = torch.zeros(1, 24, 24, dtype=torch.bool)
    removed[0, 3:15, 5:20] = True
    ref = noisy_linear_imputation(img[0].numpy(), np.flatnonzero(removed[0].numpy()), noise=0.0)
    np.testing.assert_allclose(rd.noisy_linear_impute(img, removed, noise=0.0)[0].numpy(), ref, atol=1e-12)
    a, b = (rd.noisy_linear_impute(img, removed, noise=0.01, seed=s) for s in (0, 1))
    noise = (a - torch.from_numpy(ref)[None])[removed[:, None].expand_as(img)]
    assert abs(float(noise.std()) - 0.01) < 0.001 and torch.equal(a, rd.noisy_linear_impute(img, removed, seed=0))
    assert not torch.equal(a, b)


def test_road_removes_the_ranked_pixels_as_the_authors_order_them(data):
    """MoRF at f: the int(H*W*f) highest pixels (their ImputedDataset(remove=True, th_p=f)); LeRF at f:
    the same count of lowest (their remove=False, th_p=1-f), imputed as their imputer does."""
    x, _, heat = data
    x, heat = x[:, :, :10, :10], heat[:, :10, :10]
    fractions = (0.2, 0.5, 0.8)
    per = rd.road_perturbations(x, heat, fractions=fractions, order="both", noise=0.0)
    for i in range(2):
        salient = torch.argsort(heat[i].flatten(), descending=True)
        for j, f in enumerate(fractions):
            th_p = round(1 - f, 6)  # their LeRF parameter, written as a user would (1 - 0.8 is 0.19999...)
            for order, coords in (("morf", salient[:int(100 * f)]), ("lerf", salient[int(100 * th_p):])):
                mask = np.ones(100, dtype=np.uint8)
                mask[coords.numpy()] = 0
                ref = authors_imputer(x[i].numpy(), mask.reshape(10, 10))
                np.testing.assert_allclose(per[order][i, j].numpy(), ref, atol=1e-12)
    noisy = rd.road_perturbations(x, heat, fractions=fractions, noise=0.01)["morf"]
    changed = (noisy != x[:, None]).any(2)  # every removed pixel changes, none other
    for j, f in enumerate(fractions):
        top = heat.flatten(1).argsort(1, descending=True)[:, :int(100 * f)]
        expect = torch.zeros(2, 100, dtype=torch.bool).scatter_(1, top, True).view(2, 10, 10)
        assert torch.equal(changed[:, j], expect)


class _NoChannelBroadcast:
    """numpy, except ``broadcast_to``: Quantus 0.6 ROAD broadcasts a [B,1,H,W] map to the images'
    3 channels before ranking, so its indices run over 3*H*W values while its imputer indexes H*W
    pixels, an IndexError on any RGB input (its tests use MNIST). Without that one broadcast it ranks
    pixels, as its ``a_size`` (H*W) and its imputer assume."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def broadcast_to(a, shape):
        return a


def test_road_equals_quantus_road(monkeypatch):
    import quantus
    from quantus.functions.perturb_func import noisy_linear_imputation

    model = Linear(dtype=torch.float32).eval()
    x = make_images(3, SIZE, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    heat = torch.rand(3, SIZE, SIZE, generator=g)
    heat[:, 8:24, 8:24] += 1  # a blob: removing it changes the predictions
    with torch.no_grad():
        t = model(x).argmax(1)  # clean accuracy 1
    monkeypatch.setattr(importlib.import_module("quantus.metrics.faithfulness.road"), "np", _NoChannelBroadcast())
    seen = []

    def recording(arr, indices, **kw):
        out = noisy_linear_imputation(arr, indices, **kw)
        seen.append(out)
        return out

    percentages = [10, 30, 50, 70, 90]
    ref = quantus.ROAD(percentages=percentages, noise=0.0, perturb_func=recording, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=heat[:, None].numpy(), channel_first=True,
        device="cpu")
    fractions = [p / 100 for p in percentages]
    per = rd.road_perturbations(x, heat, fractions=fractions, noise=0.0)["morf"]
    theirs = torch.from_numpy(np.stack(seen)).view(len(percentages), 3, 3, SIZE, SIZE).transpose(0, 1)
    assert torch.allclose(per, theirs, atol=1e-6)
    ours = rd.road(model, x, t, heat, fractions=fractions, noise=0.0, score="accuracy")["morf"][1]
    assert np.allclose(ours.mean(0).numpy(), [ref[p] for p in percentages])
    assert 0 < ours.mean() < 1  # the comparison is not trivial


def test_road_analytic_cases_and_orders():
    model = Linear()
    const = torch.ones(2, 3, SIZE, SIZE, dtype=torch.float64) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    heat = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 4])
    res = rd.road(model, const, t, heat, order="both", noise=0.0)
    clean = model(const).softmax(1).gather(1, t[:, None]).detach()
    for o in ("morf", "lerf"):  # a constant image imputes to itself: the curve is the clean score
        summary, curve = res[o]
        assert curve.shape == (2, 9) and torch.allclose(curve, clean.expand(2, 9), atol=1e-12)
        assert torch.allclose(summary, curve.mean(1))
    # class 0 reads only the centre; the image is bright there: MoRF loses it first, LeRF last
    model = Linear(same_channels=True)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, :, 8:24, 8:24] = 1.0
        model.bias.zero_()
    x = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64)
    x[:, :, 8:24, 8:24] = 1.0
    heat = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    heat[:, 8:24, 8:24] += 1
    out = rd.road(model, x, torch.tensor([0]), heat, order="both", score="logit", noise=0.0)
    logit = rd.road_perturbations(x, heat, order="both", noise=0.0)
    for o in ("morf", "lerf"):  # logit of a linear model = its weights . the ROAD image
        expect = (logit[o][0].flatten(1) @ model.weight[0].flatten()).detach()
        assert torch.allclose(out[o][1][0], expect, atol=1e-9)
    assert (out["morf"][1] < out["lerf"][1] - 1).all()


def test_road_batches_seeds_and_leaves_the_model(net, data):
    x, t, heat = data
    before = snapshot(net)
    a = rd.road(net, x, t, heat, order="both", fractions=(0.25, 0.75), batch_size=3)
    b = rd.road(net, x, t, heat, order="both", fractions=(0.25, 0.75), batch_size=64)
    c = rd.road(net, x, t, heat, order="both", fractions=(0.25, 0.75), seed=1)
    assert_same_state(before, snapshot(net))
    for o in ("morf", "lerf"):
        assert torch.allclose(a[o][1], b[o][1], atol=1e-12)
        assert not torch.equal(a[o][1], c[o][1])
    morf = rd.road_morf(net, x, t, heat, fractions=(0.25, 0.75))
    assert torch.allclose(morf, a["morf"][0], atol=1e-12)
    pred = rd.road(net, x, t, heat, fractions=(0.5,), score="accuracy", target="predicted", noise=0.0)["morf"][1]
    assert pred.shape == (2, 1) and set(pred.flatten().tolist()) <= {0.0, 1.0}


def test_road_images_are_the_same_on_one_thread_or_several(data):
    """The systems are solved on torch's thread count (a fast path): the images are bit-identical."""
    x, _, heat = data
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rd.road_perturbations(x, heat, order="both", fractions=(0.1, 0.5, 0.9), noise=0.01, seed=3)
        torch.set_num_threads(2)
        two = rd.road_perturbations(x, heat, order="both", fractions=(0.1, 0.5, 0.9), noise=0.01, seed=3)
    finally:
        torch.set_num_threads(before)
    for o in ("morf", "lerf"):
        assert torch.equal(one[o], two[o])
    img = x[0].double().numpy()
    removed = np.flatnonzero(np.arange(img.shape[1] * img.shape[2]) % 3 == 0)
    serial = rd._impute_into(img, removed, 0.01, np.random.default_rng(5))
    solved = rd._solutions(img, [removed, removed[:4]])[0]
    assert np.array_equal(serial, rd._fill(img, removed, solved, 0.01, np.random.default_rng(5)))


def test_road_bad_input(net, data):
    x, t, heat = data
    for fractions in ([0.0], [1.0], [0.5, 1.5], [], "0.5", [True]):
        with pytest.raises(InvalidInputError, match="fractions"):
            rd.road(net, x, t, heat, fractions=fractions)
        with pytest.raises(InvalidInputError, match="fractions"):
            get_metric("road_morf").check_params({"fractions": fractions})
    nan = heat.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        rd.road(net, x, t, nan)
    with pytest.raises(InvalidInputError, match="constant"):
        rd.road(net, x, t, torch.zeros_like(heat))
    with pytest.raises(InvalidInputError, match="order"):
        rd.road(net, x, t, heat, order="random")
    with pytest.raises(InvalidInputError, match="noise"):
        rd.road(net, x, t, heat, noise=-0.1)
    with pytest.raises(InvalidInputError, match="score"):
        get_metric("road_lerf").check_params({"score": "auc"})
    with pytest.raises(InvalidInputError, match="kept pixel"):
        rd.noisy_linear_impute(x, torch.ones(2, SIZE, SIZE, dtype=torch.bool))


# ---- faithfulness correlation ------------------------------------------------------------------


def test_faithfulness_correlation_equals_quantus_with_the_same_subsets(monkeypatch):
    """Quantus draws each run's subset per image with np.random.choice (run-major); the test hands it
    our draws in that order, in Quantus' feature space (a [B,1,H,W] map broadcast to 3 channels:
    feature="element"), baseline "black" (the image's minimum), logits (softmax=False)."""
    import quantus

    model = SmallNet().eval()
    x = make_images(2, SIZE, dtype=torch.float32)
    heat = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([2, 5])
    n_runs, k = 20, 60
    subsets = fm.random_subsets(2, 3 * SIZE * SIZE, k, n_runs, seed=4)
    draws = iter([subsets[i, r].numpy() for r in range(n_runs) for i in range(2)])
    calls = []

    def choice(n, size, replace=True):
        calls.append((n, size, replace))
        return next(draws)

    monkeypatch.setattr(np.random, "choice", choice)
    ref = quantus.FaithfulnessCorrelation(nr_runs=n_runs, subset_size=k, return_aggregate=False,
                                          disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=heat[:, None].numpy(), channel_first=True,
        device="cpu")
    monkeypatch.undo()
    assert calls == [(3 * SIZE * SIZE, k, False)] * (2 * n_runs)
    ours = fm.faithfulness_correlation(model, x, t, heat, subset_size=k, n_runs=n_runs, feature="element", seed=4)
    assert np.allclose(ours.numpy(), ref, atol=1e-4), (ours, ref)


@pytest.mark.parametrize("baseline", ["black", "zeros", 0.7])
def test_faithfulness_correlation_is_one_for_the_true_linear_attribution(baseline):
    model = Linear()
    x = make_images(2, SIZE)
    t = torch.tensor([0, 6])
    base = {"black": x.flatten(1).amin(1), "zeros": torch.zeros(2)}.get(baseline, torch.full((2,), 0.7))
    w = model.weight.detach()[t]
    heat = (w * (x - base.view(2, 1, 1, 1))).sum(1)  # the logit drop each pixel causes
    r = fm.faithfulness_correlation(model, x, t, heat, n_runs=12, baseline=baseline)
    assert torch.allclose(r, torch.ones(2, dtype=r.dtype), atol=1e-10)
    assert (fm.faithfulness_correlation(model, x, t, -heat, n_runs=12, baseline=baseline) + 1).abs().max() < 1e-10
    rand = fm.faithfulness_correlation(model, x, t, torch.rand(2, SIZE, SIZE), n_runs=12, baseline=baseline)
    assert (rand.abs() < 0.9).all()


def test_random_subsets_are_subsets():
    s = fm.random_subsets(3, 50, 20, 7, seed=0)
    assert s.shape == (3, 7, 20) and s.min() >= 0 and s.max() < 50
    assert all(len(set(row.tolist())) == 20 for row in s.view(-1, 20))
    assert torch.equal(s, fm.random_subsets(3, 50, 20, 7, seed=0))


def test_faithfulness_correlation_bad_input(net, data):
    x, t, heat = data
    with pytest.raises(InvalidInputError, match="constant"):
        fm.faithfulness_correlation(net, x, t, torch.zeros_like(heat), n_runs=3)
    nan = heat.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        fm.faithfulness_correlation(net, x, t, nan, n_runs=3)
    for kw, word in (({"subset_size": 0}, "subset_size"), ({"subset_size": SIZE * SIZE}, "subset_size"),
                     ({"n_runs": 1}, "n_runs"), ({"baseline": "grey"}, "baseline"), ({"feature": "patch"}, "feature")):
        with pytest.raises(InvalidInputError, match=word):
            fm.faithfulness_correlation(net, x, t, heat, **kw)
    with pytest.raises(InvalidInputError, match="baseline"):
        get_metric("faithfulness_correlation").check_params({"baseline": "grey"})


# ---- average drop and increase in confidence -----------------------------------------------------


class MeanLogit(nn.Module):
    """Two classes: logits (a * mean(x), 0)."""

    def __init__(self, a: float):
        super().__init__()
        self.a, self.num_classes = a, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.a * x.mean((1, 2, 3))
        return torch.stack([m, torch.zeros_like(m)], 1)


def test_confidence_hand_computed():
    x = torch.ones(2, 3, 8, 8, dtype=torch.float64)
    heat = torch.zeros(2, 8, 8, dtype=torch.float64)
    heat[:, :4] = 3.0  # min-max: half the pixels 1, half 0 -> the explanation map's mean is 0.5
    out = fm.confidence_change(MeanLogit(2.0), x, torch.tensor([0, 1]), heat)
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    y0, o0 = s(2.0), s(1.0)  # class 0: confidence falls
    assert torch.allclose(out["average_drop"], torch.tensor([(y0 - o0) / y0, 0.0], dtype=torch.float64))
    assert torch.equal(out["increase_in_confidence"], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_confidence_equals_pytorch_grad_cam(net, data):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, t, heat = data
    heat = heat - 0.3  # signed maps: min-max normalisation matters
    cams = fm.explanation_maps(torch.ones_like(x), heat)[:, 0].numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
    drop = DropInConfidence()(x, cams, targets, net)  # max(0, Y - O), not relative
    inc = IncreaseInConfidence()(x, cams, targets, net)
    ours = fm.confidence_change(net, x, t, heat)
    clean = net(x).softmax(1).gather(1, t[:, None])[:, 0].detach()
    assert np.allclose((ours["average_drop"] * clean).numpy(), drop, atol=1e-6)
    assert np.array_equal(ours["increase_in_confidence"].numpy(), inc)
    assert torch.allclose(fm.average_drop(net, x, t, heat), ours["average_drop"])
    assert torch.equal(fm.increase_in_confidence(net, x, t, heat), ours["increase_in_confidence"])


def test_confidence_bad_input(net, data):
    x, t, heat = data
    with pytest.raises(InvalidInputError, match="constant"):
        fm.average_drop(net, x, t, torch.zeros_like(heat))
    with pytest.raises(InvalidInputError, match="shape"):
        fm.increase_in_confidence(net, x, t, heat[:, :5])


# ---- infidelity --------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_infidelity_equals_captum_with_the_same_perturbations(net, data, normalize):
    x, t, heat = data
    noise = fm.infidelity_perturbations(x, n_perturb=6, sigma=0.05, seed=3)

    def perturb_func(inputs):
        flat = noise.reshape(-1, *x.shape[1:])  # Captum repeats each image n times, image-major
        assert flat.shape == inputs.shape
        return flat, inputs - flat

    ref = captum_infidelity(net, perturb_func, x, heat[:, None].expand_as(x), target=t, n_perturb_samples=6,
                            normalize=normalize)
    ours = fm.infidelity(net, x, t, heat, n_perturb=6, sigma=0.05, seed=3, normalize=normalize, batch_size=5)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-12), (ours, ref)
    zero = fm.infidelity(net, x, t, torch.zeros_like(heat), n_perturb=6, sigma=0.05, seed=3, normalize=normalize)
    ref0 = captum_infidelity(net, perturb_func, x, torch.zeros_like(x), target=t, n_perturb_samples=6,
                             normalize=normalize)
    assert torch.allclose(zero, ref0, rtol=1e-5)  # an all-zero map: E[diff^2], as Captum (beta 0)


def test_infidelity_analytic_linear_model():
    model = Linear(same_channels=True)
    x = make_images(2, SIZE)
    t = torch.tensor([1, 8])
    w = model.weight.detach()[t, 0]  # f(x) - f(x - I) = sum_p w_p * sum_c I_cp exactly
    assert torch.allclose(fm.infidelity(model, x, t, w, normalize=False), torch.zeros(2, dtype=torch.float64),
                          atol=1e-20)
    assert torch.allclose(fm.infidelity(model, x, t, 5 * w), torch.zeros(2, dtype=torch.float64), atol=1e-20)
    noise = fm.infidelity_perturbations(x)
    dot = (noise.sum(2) * w[:, None]).flatten(2).sum(2)
    expect = ((5 * dot - dot) ** 2).mean(1)  # unnormalised, 5x the true map
    assert torch.allclose(fm.infidelity(model, x, t, 5 * w, normalize=False), expect, rtol=1e-10)


def test_infidelity_bad_input(net, data):
    x, t, heat = data
    for sigma in (0.0, -1.0, float("inf"), "0.1"):
        with pytest.raises(InvalidInputError, match="sigma"):
            fm.infidelity(net, x, t, heat, sigma=sigma)
    with pytest.raises(InvalidInputError, match="sigma"):
        get_metric("infidelity").check_params({"sigma": 0.0})
    with pytest.raises(InvalidInputError, match="n_perturb"):
        fm.infidelity(net, x, t, heat, n_perturb=0)
    nan = heat.clone()
    nan[0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        fm.infidelity(net, x, t, nan)


# ---- the runner's path ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, params, direct", [
    ("road_morf", {"fractions": [0.3, 0.6]}, lambda m, x, t, h: rd.road(m, x, t, h, fractions=[0.3, 0.6])["morf"]),
    ("road_lerf", {"fractions": [0.3, 0.6], "score": "logit"},
     lambda m, x, t, h: rd.road(m, x, t, h, fractions=[0.3, 0.6], order="lerf", score="logit")["lerf"]),
    ("faithfulness_correlation", {"n_runs": 8}, lambda m, x, t, h: fm.faithfulness_correlation(
        m, x, t, h, n_runs=8, subset_size=SIZE)),
    ("average_drop", {}, lambda m, x, t, h: fm.average_drop(m, x, t, h)),
    ("increase_in_confidence", {}, lambda m, x, t, h: fm.increase_in_confidence(m, x, t, h)),
    ("infidelity", {"n_perturb": 4}, lambda m, x, t, h: fm.infidelity(m, x, t, h, n_perturb=4)),
])
def test_runner_path_equals_direct_call(net, data, name, params, direct):
    x, t, heat = data
    spec = get_metric(name)
    assert spec.criterion == "faithfulness" and spec.inputs == ("model",)
    spec.check_params(params)
    before = snapshot(net)
    res = spec.score(ScoreBatch(net, x, t, heat), params)
    want = direct(net, x, t, heat)
    assert_same_state(before, snapshot(net))
    if isinstance(want, tuple):
        want, curves = want
        assert [json.loads(c) for c in res.extra["curve"]] == [[round(float(v), 6) for v in r] for r in curves]
    assert torch.allclose(torch.as_tensor(res.values[name]).double(), want.double(), atol=1e-6)
    assert res.params["batch_size"] == 64


def test_groups_share_one_call(net, data):
    x, t, heat = data
    batch = ScoreBatch(net, x, t, heat, logits=net(x).detach())
    p = get_metric("road_morf").resolve_params({"fractions": [0.5]})
    both = GROUPS["road"](batch, {"road_morf": p, "road_lerf": dict(p)})
    for name in ("road_morf", "road_lerf"):
        alone = get_metric(name).score(batch, {"fractions": [0.5]})
        assert torch.allclose(both[name].values[name], alone.values[name], atol=1e-12)
    conf = GROUPS["confidence"](batch, {"average_drop": {"batch_size": 64}, "increase_in_confidence": {}})
    direct = fm.confidence_change(net, x, t, heat)
    for name in ("average_drop", "increase_in_confidence"):
        assert torch.allclose(conf[name].values[name], direct[name], atol=1e-10)
    assert get_metric("average_drop").higher_is_better is False
    assert get_metric("increase_in_confidence").higher_is_better is True
    assert get_metric("road_lerf").higher_is_better and not get_metric("road_morf").higher_is_better
    assert get_metric("faithfulness_correlation").resolve_params({}, (SIZE, 48))["subset_size"] == 48
