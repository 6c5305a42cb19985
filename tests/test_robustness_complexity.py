"""Robustness, complexity, random-logit and grid-pointing-game metrics against Captum and
Quantus on the same inputs and draws, closed-form cases, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quantus
import torch
from captum.metrics import sensitivity_max
from skimage.metrics import structural_similarity
from torch import nn

from saliencybench.errors import ConstantHeatmapWarning, InvalidInputError, NotApplicableError, UnknownNameError
from saliencybench.methods.base import METHODS, explain, register_method
from saliencybench.metrics.base import ScoreBatch, get_metric
from saliencybench.metrics.complexity import complexity, sparseness
from saliencybench.metrics.grid_pointing import grid_pointing_game, make_mosaics, plan_mosaics
from saliencybench.metrics.randomisation import box_ssim, off_classes, random_logit
from saliencybench.metrics.robustness import (
    avg_sensitivity, local_lipschitz, max_sensitivity, perturbations, sensitivities,
)

from conftest import assert_same_state, make_images, make_model, snapshot

QUIET = {"disable_warnings": True, "display_progressbar": False}


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return make_model("resnet18")


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return make_images(2, 32)


T = torch.tensor([3, 7])


def np_explain(method: str, record: list | None = None):
    """A Quantus explain_func calling our explain (float64 inputs); records the targets it is asked for."""

    def fn(model, inputs, targets, **kwargs):
        if record is not None:
            record.append(np.asarray(targets).copy())
        return explain(model, torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets)),
                       method).double().numpy()

    return fn


def step_draws(pert: torch.Tensor, b: int, n: int):
    """A Quantus perturb_func returning our draws: call k gives sample k of every image of the batch."""
    draws = pert.view(b, n, -1).numpy()
    calls = {"k": 0}

    def fn(arr, indices, **kwargs):
        k = calls["k"]
        calls["k"] += 1
        return draws[:, k].copy()

    return fn


# ---- sensitivity ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["saliency", "guided_backprop"])
def test_max_sensitivity_equals_captum_on_the_same_draws(net, x, method):
    n = 4
    pert = perturbations(x, n, scale=0.02, seed=5)
    ours = max_sensitivity(net, x, T, method, n_samples=n, radius=0.02, seed=5)

    def expl(inputs, target):  # Captum passes and expects tuples of tensors
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        return (explain(net, inputs, target, method),)

    ref = sensitivity_max(expl, x, perturb_func=lambda inp, r: pert, perturb_radius=0.02, n_perturb_samples=n,
                          target=T)
    assert torch.allclose(ours.double(), ref.double(), rtol=1e-5, atol=1e-7), (ours, ref)
    assert (ours > 0).all()


def test_max_and_avg_sensitivity_equal_quantus_on_the_same_draws(net, x):
    n = 3
    pert = perturbations(x, n, scale=0.02, seed=2)
    xs, ys = x.numpy(), T.numpy()
    kw = dict(nr_samples=n, lower_bound=0.02, abs=False, normalise=False, **QUIET)
    q_max = quantus.MaxSensitivity(perturb_func=step_draws(pert, 2, n), **kw)(
        model=net, x_batch=xs, y_batch=ys, explain_func=np_explain("saliency"))
    q_avg = quantus.AvgSensitivity(perturb_func=step_draws(pert, 2, n), **kw)(
        model=net, x_batch=xs, y_batch=ys, explain_func=np_explain("saliency"))
    ours_max = max_sensitivity(net, x, T, "saliency", n_samples=n, seed=2)
    ours_avg = avg_sensitivity(net, x, T, "saliency", n_samples=n, seed=2)
    np.testing.assert_allclose(ours_max.numpy(), q_max, rtol=1e-5)
    np.testing.assert_allclose(ours_avg.numpy(), q_avg, rtol=1e-5)
    assert (ours_avg <= ours_max + 1e-7).all()


class Linear(nn.Module):
    """logits = W x: the gradient of a logit is the same at every input."""

    def __init__(self, n_classes: int = 4, size: int = 8, zero_class: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(n_classes, 3 * size * size, generator=g, dtype=torch.float64))
        if zero_class is not None:
            with torch.no_grad():
                self.w[zero_class] = 0
        self.num_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def test_linear_model_saliency_is_perfectly_robust():
    """A constant gradient gives the same map at every input: sensitivities and Lipschitz estimate are 0."""
    model, xx, t = Linear(), make_images(3, 8), torch.tensor([0, 1, 3])
    assert torch.equal(max_sensitivity(model, xx, t, "saliency", n_samples=5), torch.zeros(3))
    assert torch.equal(avg_sensitivity(model, xx, t, "saliency", n_samples=5, radius=0.5), torch.zeros(3))
    assert torch.equal(local_lipschitz(model, xx, t, "saliency", n_samples=5), torch.zeros(3))


class HalfSquare(nn.Module):
    """logit_k = (k + 1) * sum(x^2) / 2: gradient (k + 1) x, so saliency with reduce='sum' is (k + 1) sum_c x_c."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x**2).sum((1, 2, 3)) / 2
        return s[:, None] * torch.arange(1, 4, dtype=x.dtype)


def test_local_lipschitz_closed_form_on_a_known_map():
    """Phi(x) = (k+1) sum_c x_c: ||Phi(x) - Phi(x')|| / ||x - x'|| = (k+1) ||sum_c delta_c|| / ||delta||."""
    model, xx, t = HalfSquare(), make_images(2, 8), torch.tensor([0, 2])
    n = 6
    for noise, scale in (("gaussian", 0.1), ("uniform", 0.3)):
        ours = local_lipschitz(model, xx, t, "saliency", method_params={"reduce": "sum"}, n_samples=n, noise=noise,
                               scale=scale, normalise=False, seed=4)
        delta = (perturbations(xx, n, noise=noise, scale=scale, seed=4) - xx.repeat_interleave(n, 0)).view(2, n, 3, -1)
        ratio = delta.sum(2).norm(dim=2) / (delta.flatten(2).norm(dim=2) + 1e-10)
        expected = (t[:, None] + 1) * ratio
        assert torch.allclose(ours.double(), expected.amax(1), rtol=1e-5), noise
    # relative sensitivity of the same map: ||sum_c delta|| / ||sum_c x||, the (k+1) cancels
    s = sensitivities(model, xx, t, "saliency", method_params={"reduce": "sum"}, n_samples=n, radius=0.05, seed=1)
    delta = (perturbations(xx, n, scale=0.05, seed=1) - xx.repeat_interleave(n, 0)).view(2, n, 3, -1)
    expected = delta.sum(2).norm(dim=2) / xx.view(2, 3, -1).sum(1).norm(dim=1)[:, None]
    assert torch.allclose(s, expected, rtol=1e-5)


def test_local_lipschitz_equals_quantus_on_the_same_draws(net, x):
    """Quantus normalises by the max over its call batch: one image per call is our per-map normalisation."""
    n = 3
    ours = local_lipschitz(net, x, T, "saliency", n_samples=n, seed=8)
    pert = perturbations(x, n, noise="gaussian", scale=0.1, seed=8).view(2, n, *x.shape[1:])
    for i in range(2):
        metric = quantus.LocalLipschitzEstimate(nr_samples=n, perturb_func=step_draws(pert[i].reshape(n, -1), 1, n),
                                                **QUIET)
        ref = metric(model=net, x_batch=x[i:i + 1].numpy(), y_batch=T[i:i + 1].numpy(),
                     explain_func=np_explain("saliency"), batch_size=1)
        np.testing.assert_allclose(float(ours[i]), ref[0], rtol=1e-5)


def test_sensitivity_of_an_all_zero_clean_map_follows_captum():
    """An all-zero Phi(x) is not divided by its norm (Captum's denominator 1), with a warning."""
    model, xx, t = Linear(), make_images(2, 8), torch.tensor([0, 1])
    heat = explain(model, xx, t, "saliency")
    zero = heat.clone()
    zero[1] = 0
    with pytest.warns(ConstantHeatmapWarning, match=r"samples \[1\]"):
        s = sensitivities(model, xx, t, "saliency", zero, n_samples=2)
    assert torch.allclose(s[1].float(), heat[1].double().norm().float().expand(2))
    assert torch.equal(s[0], torch.zeros(2, dtype=s.dtype))


def test_sensitivity_draws_are_seeded_and_image_major(x):
    a, b = perturbations(x, 3, seed=1), perturbations(x, 3, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, perturbations(x, 3, seed=2))
    d = a - x.repeat_interleave(3, 0)
    assert d.abs().max() <= 0.02 and d.abs().max() > 0.019
    g = perturbations(x, 3, noise="gaussian", scale=0.1, seed=1) - x.repeat_interleave(3, 0)
    assert 0.09 < float(g.std()) < 0.11


# ---- complexity -------------------------------------------------------------------------------


def test_sparseness_and_complexity_closed_forms():
    n = 16 * 16
    one_hot = torch.zeros(1, 16, 16)
    one_hot[0, 3, 5] = -2.0  # sign is ignored
    uniform = torch.full((1, 16, 16), 0.7)
    k_ones = torch.zeros(1, 16, 16)
    k_ones.view(-1)[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40]] = 3.0
    maps = torch.cat([one_hot, uniform, k_ones])
    g = sparseness(maps, eps=0.0).double()
    assert torch.allclose(g, torch.tensor([(n - 1) / n, 0.0, (n - 40) / n], dtype=torch.float64), atol=1e-6)
    c = complexity(maps).double()
    assert torch.allclose(c, torch.tensor([0.0, math.log(n), math.log(40)], dtype=torch.float64), atol=1e-5)
    # Quantus' +1e-7 after max-normalisation: G * S / (S + n eps) with S the normalised sum
    g_eps = sparseness(maps).double()
    s = torch.tensor([1.0, n, 40.0], dtype=torch.float64)
    assert torch.allclose(g_eps, g * s / (s + n * 1e-7), atol=1e-7)
    # scale and sign invariance
    h = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(sparseness(h), sparseness(-5 * h), atol=1e-6)
    assert torch.allclose(complexity(h), complexity(0.01 * h.abs()), atol=1e-5)


def test_sparseness_and_complexity_equal_quantus():
    """Quantus normalises by the max of the whole batch it gets: called one map at a time it
    normalises per map, as we do."""
    h = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h[2] = h[2] ** 5  # a sparser map
    xs = np.zeros((1, 3, 32, 32))
    ys = np.zeros(1, dtype=int)
    q_s = [quantus.Sparseness(**QUIET)(model=None, x_batch=xs, y_batch=ys, a_batch=h[i:i + 1, None].numpy())[0]
           for i in range(3)]
    q_c = [quantus.Complexity(**QUIET)(model=None, x_batch=xs, y_batch=ys, a_batch=h[i:i + 1, None].numpy())[0]
           for i in range(3)]
    np.testing.assert_allclose(sparseness(h).numpy(), q_s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(complexity(h).numpy(), q_c, rtol=1e-6)
    assert sparseness(h)[2] > sparseness(h)[0] and complexity(h)[2] < complexity(h)[0]


def test_all_zero_maps_score_as_constant_maps():
    maps = torch.zeros(2, 8, 8)
    maps[0, 1, 1] = 1.0
    with pytest.warns(ConstantHeatmapWarning, match=r"samples \[1\]"):
        g = sparseness(maps, eps=0.0)
    with pytest.warns(ConstantHeatmapWarning, match=r"samples \[1\]"):
        c = complexity(maps)
    assert float(g[1]) == 0.0 and abs(float(g[0]) - 63 / 64) < 1e-6
    assert abs(float(c[1]) - math.log(64)) < 1e-6 and abs(float(c[0])) < 1e-9


def test_complexity_bad_inputs():
    bad = torch.rand(2, 8, 8)
    bad[1, 0, 0] = float("nan")
    for fn in (sparseness, complexity):
        with pytest.raises(InvalidInputError, match=r"samples \[1\].*NaN"):
            fn(bad)
        with pytest.raises(InvalidInputError, match="Tensor\\[B,H,W\\]"):
            fn(torch.rand(8, 8))
    with pytest.raises(InvalidInputError, match="eps"):
        sparseness(torch.rand(1, 4, 4), eps=-1e-3)
    with pytest.raises(InvalidInputError, match="eps"):
        get_metric("sparseness").check_params({"eps": -1.0})


def test_complexity_metrics_through_the_registry_use_only_heatmaps():
    h = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = ScoreBatch(model=None, images=torch.zeros(3, 3, 16, 16), targets=torch.zeros(3, dtype=torch.long),
                       heatmaps=h)
    for name, fn in (("sparseness", sparseness), ("complexity", complexity)):
        spec = get_metric(name)
        assert spec.criterion == "complexity" and spec.heatmap == "abs"
        res = spec.score(batch, {})
        np.testing.assert_allclose(res.values[name], fn(h.abs()).numpy(), rtol=1e-6)
    assert get_metric("sparseness").higher_is_better and not get_metric("complexity").higher_is_better
    res = get_metric("sparseness").score(batch, {"eps": 0.0})
    np.testing.assert_allclose(res.values["sparseness"], sparseness(h, eps=0.0).numpy(), rtol=1e-6)
    assert res.params["eps"] == 0.0


# ---- random logit ---------------------------------------------------------------------------------


def test_box_ssim_equals_scikit_image():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 20, 24, generator=g, dtype=torch.float64), torch.rand(2, 20, 24, generator=g,
                                                                               dtype=torch.float64)
    b[1] = a[1] * 0.5 + 0.2 * b[1]
    for layout in ("flat", "2d"):
        ours = box_ssim(a, b, layout)
        for i in range(2):
            aa, bb = (a[i].flatten(), b[i].flatten()) if layout == "flat" else (a[i], b[i])
            rng = float(torch.cat([aa.flatten(), bb.flatten()]).max() - torch.cat([aa.flatten(), bb.flatten()]).min())
            ref = structural_similarity(aa.numpy(), bb.numpy(), data_range=rng)
            assert abs(float(ours[i]) - ref) < 1e-10, (layout, i)
    assert torch.allclose(box_ssim(a, a), torch.ones(2, dtype=torch.float64))
    const = torch.full((1, 8, 8), 0.3, dtype=torch.float64)
    assert float(box_ssim(const, const)) == 1.0


def test_random_logit_equals_quantus_with_the_same_off_classes(net, x):
    """Quantus with one image per call (its max-normalisation is then per map, as ours); the
    off-classes it draws are read from the targets its explain_func is asked for."""
    refs, offs = [], []
    for i in range(2):
        record: list = []
        metric = quantus.RandomLogit(num_classes=10, seed=42, **QUIET)
        refs.append(metric(model=net, x_batch=x[i:i + 1].numpy(), y_batch=T[i:i + 1].numpy(),
                           explain_func=np_explain("saliency", record), batch_size=1)[0])
        offs.append(int(record[-1][0]))
    ours = random_logit(net, x, T, "saliency", off_targets=torch.tensor(offs))
    np.testing.assert_allclose(ours.numpy(), refs, rtol=1e-4, atol=1e-5)
    # the seeded draw is Quantus' draw for a batch of the same images
    record = []
    quantus.RandomLogit(num_classes=10, seed=42, **QUIET)(model=net, x_batch=x.numpy(), y_batch=T.numpy(),
                                                            explain_func=np_explain("saliency", record))
    assert off_classes(T, 10, 42).tolist() == record[-1].tolist()


class SameForAll(nn.Module):
    """Every class has the same logit sum(x^2): every class's map is the same."""

    num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x**2).sum((1, 2, 3))[:, None].expand(-1, 10)


def test_random_logit_closed_forms():
    xx = make_images(3, 16)
    t = torch.tensor([0, 4, 9])
    # a class-insensitive map is identical for every class: SSIM 1
    assert torch.allclose(random_logit(SameForAll(), xx, t, "saliency"), torch.ones(3))
    # the linear model's saliency for class k is |W_k| reshaped: a known pair of maps
    lin = Linear(n_classes=10, size=16)
    off = off_classes(t, 10, seed=3)
    assert (off != t).all() and ((off >= 0) & (off < 10)).all()
    ours = random_logit(lin, xx, t, "saliency", seed=3)
    w = lin.w.detach().abs().view(10, 3, 16, 16).amax(1)
    a, o = w[t], w[off]
    expected = box_ssim(a / a.flatten(1).amax(1)[:, None, None], o / o.flatten(1).amax(1)[:, None, None])
    assert torch.allclose(ours.double(), expected, atol=1e-6)
    # the draw covers every other class and never the target
    draws = off_classes(torch.full((5000,), 4), 10, seed=0)
    assert set(draws.tolist()) == set(range(10)) - {4}


def test_random_logit_bad_inputs(net, x):
    with pytest.raises(InvalidInputError, match="off_targets equal the targets"):
        random_logit(net, x, T, "saliency", off_targets=T)
    with pytest.raises(InvalidInputError, match="layout"):
        random_logit(net, x, T, "saliency", layout="3d")
    with pytest.raises(UnknownNameError):
        random_logit(net, x, T, "salience")
    nan = torch.zeros(2, 32, 32)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"samples \[0\]"):
        random_logit(net, x, T, "saliency", nan)
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        off_classes(torch.zeros(2, dtype=torch.long), 1)


# ---- grid pointing game -------------------------------------------------------------------------------


class ValueClassifier(nn.Module):
    """Predicts class k for an image of constant value k + 1."""

    num_classes = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))[:, None]
        return -((m - torch.arange(1, 7, dtype=x.dtype)) ** 2)


def _grid_oracle(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """3 on the target's cell (pixel value t + 1), 1 on cells of lower classes, -2 on higher ones."""
    v = images[:, 0]
    own = (targets + 1).to(v.dtype)[:, None, None]
    return torch.where((v - own).abs() < 0.5, 3.0, torch.where(v < own, 1.0, -2.0))


@pytest.fixture()
def oracle():
    """The oracle registered as a method for the test only (other test files list every method)."""
    register_method("test_grid_oracle", paper="test oracle", family="baseline", needs_grad=False)(_grid_oracle)
    try:
        yield "test_grid_oracle"
    finally:
        METHODS.entries.pop("test_grid_oracle")


def _class_images(classes: list[int], size: int = 16) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), float(k + 1)) for k in classes]).double()


@pytest.mark.parametrize("cell", ["half", "full"])
def test_grid_pointing_game_oracle_hand_computed(cell, oracle):
    """Share of an image's cell = 3 / (3 + number of lower classes in its mosaic)."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 5, 3, 4])
    images = _class_images(labels.tolist())
    labels_wrong = labels.clone()
    labels_wrong[11] = 2  # image 11 shows class 4 but is labelled 2: misclassified
    for repeats in (1, 3):
        got = grid_pointing_game(ValueClassifier(), images, labels_wrong, oracle, cell=cell,
                                 repeats=repeats, seed=7)
        eligible = torch.ones(12, dtype=torch.bool)
        eligible[11] = False
        plan = plan_mosaics(labels_wrong, eligible, repeats=repeats, seed=7)
        assert plan.shape[0] >= 2 and (plan != 11).all()
        total, count = torch.zeros(12), torch.zeros(12)
        for mosaic in plan.tolist():
            cls = [int(labels[i]) for i in mosaic]
            assert len(set(cls)) == 4
            for i, k in zip(mosaic, cls):
                total[i] += 3 / (3 + sum(c < k for c in cls))
                count[i] += 1
        expected = torch.where(count > 0, total / count.clamp(min=1), torch.full((12,), float("nan")))
        assert torch.allclose(got, expected, equal_nan=True), (cell, repeats, got, expected)
        assert math.isnan(float(got[11]))
    # without the confidence filter the misclassified image takes part, explained for its label 2
    got = grid_pointing_game(ValueClassifier(), images, labels_wrong, oracle, confident_only=False,
                             cell=cell, repeats=3, seed=7)
    assert not math.isnan(float(got[11]))


def test_grid_mosaic_layout_and_sizes():
    images = make_images(4, 16)
    plan = torch.tensor([[2, 0, 3, 1]])
    full = make_mosaics(images, plan, "full")
    assert full.shape == (1, 3, 32, 32)
    assert torch.equal(full[0, :, :16, :16], images[2]) and torch.equal(full[0, :, :16, 16:], images[0])
    assert torch.equal(full[0, :, 16:, :16], images[3]) and torch.equal(full[0, :, 16:, 16:], images[1])
    half = make_mosaics(images, plan, "half")
    assert half.shape == (1, 3, 16, 16)
    small = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", antialias=True)
    assert torch.allclose(half[0, :, 8:, 8:], small[1]) and torch.allclose(half[0, :, :8, :8], small[2])
    with pytest.raises(InvalidInputError, match="even"):
        make_mosaics(make_images(4, 15), plan, "half")


def test_grid_pointing_game_needs_four_classes_and_real_models(net, oracle):
    images = _class_images([0, 1, 2, 0, 1, 2])
    with pytest.warns(UserWarning, match="no 2x2 mosaic"):
        got = grid_pointing_game(ValueClassifier(), images, torch.tensor([0, 1, 2, 0, 1, 2]), oracle)
    assert torch.isnan(got).all()
    xx, labels = make_images(8, 32), torch.arange(8) % 5
    before = snapshot(net)
    for cell in ("half", "full"):
        got = grid_pointing_game(net, xx, labels, "saliency", confident_only=False, cell=cell)
        placed = got[~torch.isnan(got)]
        assert len(placed) == 4 and ((placed >= 0) & (placed <= 1)).all()
    assert_same_state(before, snapshot(net))
    vit = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    got = grid_pointing_game(vit, xx, labels, "saliency", confident_only=False)
    assert (~torch.isnan(got)).sum() == 4
    with pytest.raises(NotApplicableError, match="cell='half'"):
        grid_pointing_game(vit, xx, labels, "saliency", confident_only=False, cell="full")
    with pytest.raises(InvalidInputError, match="cell"):
        grid_pointing_game(net, xx, labels, "saliency", cell="quarter")
    with pytest.raises(InvalidInputError, match="repeats"):
        grid_pointing_game(net, xx, labels, "saliency", repeats=0)


# ---- all method metrics: registry, model untouched, bad inputs -----------------------------------------


def test_method_metrics_through_the_registry_equal_direct_calls(net, x):
    heat = explain(net, x, T, "saliency")
    labels = torch.tensor([3, 7])
    batch = ScoreBatch(model=net, images=x, targets=T, heatmaps=heat, labels=labels, method="saliency",
                       method_params={"reduce": "l2"})
    heat_l2 = explain(net, x, T, "saliency", reduce="l2")
    batch.heatmaps = heat_l2
    direct = {
        "max_sensitivity": max_sensitivity(net, x, T, "saliency", method_params={"reduce": "l2"}, n_samples=3),
        "avg_sensitivity": avg_sensitivity(net, x, T, "saliency", method_params={"reduce": "l2"}, n_samples=3),
        "local_lipschitz": local_lipschitz(net, x, T, "saliency", method_params={"reduce": "l2"}, n_samples=3),
        "random_logit": random_logit(net, x, T, "saliency", method_params={"reduce": "l2"}),
    }
    for name, want in direct.items():
        spec = get_metric(name)
        assert not spec.higher_is_better and "method" in spec.inputs
        params = {"n_samples": 3} if "sens" in name or "lips" in name else {}
        res = spec.score(batch, params)
        np.testing.assert_allclose(res.values[name], want.numpy(), rtol=1e-6, err_msg=name)
    assert get_metric("max_sensitivity").criterion == "robustness"
    assert get_metric("random_logit").criterion == "randomisation"
    xx = make_images(8, 32)
    lab8 = torch.arange(8) % 5
    b8 = ScoreBatch(model=net, images=xx, targets=lab8, heatmaps=torch.zeros(8, 32, 32), labels=lab8,
                    method="saliency")
    spec = get_metric("grid_pointing_game")
    assert spec.higher_is_better and spec.inputs == ("method", "labels") and spec.criterion == "localisation"
    res = spec.score(b8, {"confident_only": False, "seed": 3})
    np.testing.assert_allclose(res.values["grid_pointing_game"],
                               grid_pointing_game(net, xx, lab8, "saliency", confident_only=False, seed=3).numpy(),
                               equal_nan=True)
    with pytest.raises(InvalidInputError, match="labels"):
        spec.score(ScoreBatch(model=net, images=xx, targets=lab8, heatmaps=b8.heatmaps, method="saliency"), {})


def test_sensitivity_group_shares_one_set_of_explanations(net, x):
    from saliencybench.metrics.base import GROUPS

    heat = explain(net, x, T, "saliency")
    batch = ScoreBatch(model=net, images=x, targets=T, heatmaps=heat, method="saliency")
    p = {"n_samples": 3, "radius": 0.02, "seed": 1}
    assert get_metric("max_sensitivity").group == "sensitivity" == get_metric("avg_sensitivity").group
    rows = []
    handle = net.conv1.register_forward_pre_hook(lambda m, inp: rows.append(inp[0].shape[0]))
    try:
        out = GROUPS["sensitivity"](batch, {"max_sensitivity": dict(p), "avg_sensitivity": dict(p)})
    finally:
        handle.remove()
    assert sum(rows) == 2 * 3  # the B * n perturbed images, once for both metrics
    s = sensitivities(net, x, T, "saliency", heat, n_samples=3, seed=1)
    np.testing.assert_allclose(out["max_sensitivity"].values["max_sensitivity"], s.amax(1).float().numpy())
    np.testing.assert_allclose(out["avg_sensitivity"].values["avg_sensitivity"], s.mean(1).float().numpy())
    only = GROUPS["sensitivity"](batch, {"avg_sensitivity": dict(p, seed=2)})
    np.testing.assert_allclose(only["avg_sensitivity"].values["avg_sensitivity"],
                               avg_sensitivity(net, x, T, "saliency", heat, n_samples=3, seed=2).numpy())


def test_method_metrics_leave_the_model_untouched(net, x):
    before = snapshot(net)
    max_sensitivity(net, x, T, "gradcam_pp", n_samples=2)
    local_lipschitz(net, x, T, "guided_backprop", n_samples=2)
    random_logit(net, x, T, "gradcam")
    assert_same_state(before, snapshot(net))


def test_robustness_bad_inputs(net, x):
    for radius in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="radius"):
            max_sensitivity(net, x, T, "saliency", radius=radius, n_samples=1)
    with pytest.raises(InvalidInputError, match="n_samples"):
        avg_sensitivity(net, x, T, "saliency", n_samples=0)
    with pytest.raises(InvalidInputError, match="scale"):
        local_lipschitz(net, x, T, "saliency", scale=-1.0, n_samples=1)
    with pytest.raises(InvalidInputError, match="noise"):
        local_lipschitz(net, x, T, "saliency", noise="laplace", n_samples=1)
    with pytest.raises(InvalidInputError, match="radius"):
        get_metric("max_sensitivity").check_params({"radius": -0.5})
    with pytest.raises(InvalidInputError, match="noise"):
        get_metric("local_lipschitz").check_params({"noise": "salt"})
    nan = torch.zeros(2, 32, 32)
    nan[1, 3, 3] = float("nan")
    with pytest.raises(InvalidInputError, match=r"samples \[1\]"):
        max_sensitivity(net, x, T, "saliency", nan, n_samples=1)
    with pytest.raises(InvalidInputError, match="Tensor\\[B,H,W\\]"):
        max_sensitivity(net, x, T, "saliency", torch.zeros(2, 16, 16), n_samples=1)
    with pytest.raises(InvalidInputError, match="targets out of range"):
        max_sensitivity(net, x, torch.tensor([3, 12]), "saliency", n_samples=1)
    with pytest.raises(UnknownNameError):
        local_lipschitz(net, x, T, "saliencyy", n_samples=1)
