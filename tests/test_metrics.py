"""Metrics against closed-form cases, slow reference implementations and Quantus."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import quantus
import torch
from skimage.metrics import structural_similarity
from torch import nn

import saliencybench as sb
from saliencybench.errors import ConstantHeatmapWarning, InvalidInputError
from saliencybench.metrics.perturbation_curves import blur, pixel_ranks
from saliencybench.metrics.sanity import minmax, randomization_blocks, ssim

from conftest import make_images, make_model


class MeanScore(nn.Module):
    """Toy classifier: logits [0, a * mean(x)], so P(class 1) = sigmoid(a * mean(x))."""

    def __init__(self, a: float = 1.0):
        super().__init__()
        self.a = a
        self.num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.a * x.mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], 1)


def test_deletion_insertion_linear_case_closed_form():
    """Score = mean(x) on an all-ones image: both curves are linear, AUC exactly 1/2,
    whatever the heatmap and also when the step does not divide H*W."""
    x = torch.ones(3, 3, 20, 20, dtype=torch.float64)
    heat = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    heat[1] = 0  # all ties: the seeded permutation decides
    t = torch.ones(3, dtype=torch.long)
    for step in (20, 7, 1):
        auc, curves, xs = sb.metrics.deletion(MeanScore(), x, t, heat, step=step, score="logit", return_curves=True)
        assert torch.allclose(auc.double(), torch.full((3,), 0.5, dtype=torch.float64), atol=1e-6)
        assert xs[0] == 0 and xs[-1] == 1 and len(xs) == math.ceil(400 / step) + 1
        assert torch.allclose(curves.double(), (1 - xs)[None].expand(3, -1), atol=1e-6)
        ins = sb.metrics.insertion(MeanScore(), x, t, heat, step=step, score="logit", substrate="zeros")
        assert torch.allclose(ins.double(), torch.full((3,), 0.5, dtype=torch.float64), atol=1e-6)


def test_deletion_probability_closed_form():
    """P = sigmoid(a (1 - f)) after deleting a fraction f: AUC = (ln(1 + e^a) - ln 2) / a."""
    a = 6.0
    x = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    heat = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1))
    auc = sb.metrics.deletion(MeanScore(a), x, torch.tensor([1]), heat, step=1)
    expected = (math.log1p(math.exp(a)) - math.log(2)) / a
    assert abs(float(auc) - expected) < 1e-5
    ins = sb.metrics.insertion(MeanScore(a), x, torch.tensor([1]), heat, step=1, substrate="zeros")
    assert abs(float(ins) - (math.log1p(math.exp(a)) - math.log(2)) / a) < 1e-5


def test_deletion_depends_on_the_heatmap_order():
    """Deleting the bright half first drops a mean-score model faster than the dark half first."""
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    x[..., :8] = 1.0
    good = torch.zeros(1, 16, 16)
    good[..., :8] = 1.0
    bad = 1.0 - good
    t = torch.tensor([1])
    d_good = sb.metrics.deletion(MeanScore(), x, t, good, score="logit")
    d_bad = sb.metrics.deletion(MeanScore(), x, t, bad, score="logit")
    assert float(d_good) < float(d_bad)
    # bright half removed first: curve falls linearly to 0 at f = 1/2, AUC = 1/8 of the 0.5 start
    assert abs(float(d_good) - 0.125) < 1e-6 and abs(float(d_bad) - 0.375) < 1e-6


def slow_curve(model, image, target, heat, start, end, step):
    """Obvious reference: sort pixels by descending heat, change them step by step in a loop."""
    h, w = heat.shape
    order = np.argsort(-heat.flatten().numpy(), kind="stable")
    cur = start.clone()
    scores = [model(cur[None]).softmax(1)[0, target].item()]
    for k in range(0, h * w, step):
        for p in order[k : k + step]:
            cur[:, p // w, p % w] = end[:, p // w, p % w]
        scores.append(model(cur[None]).softmax(1)[0, target].item())
    return np.array(scores)


def test_deletion_and_insertion_equal_slow_reference():
    model = make_model("resnet10t")
    x = make_images(2, 24, seed=4)
    t = torch.tensor([1, 5])
    heat = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(2))  # tie-free
    step = 40
    res = sb.metrics.deletion_insertion(model, x, t, heat, step=step, batch_size=9)
    blurred = blur(x)
    with torch.no_grad():
        for b in range(2):
            ref_d = slow_curve(model, x[b], t[b], heat[b], x[b], torch.zeros_like(x[b]), step)
            ref_i = slow_curve(model, x[b], t[b], heat[b], blurred[b], x[b], step)
            assert np.allclose(res["deletion"][1][b].numpy(), ref_d, atol=1e-6)
            assert np.allclose(res["insertion"][1][b].numpy(), ref_i, atol=1e-6)
            xs = np.minimum(np.arange(len(ref_d)) * step, 576) / 576
            assert abs(float(res["deletion"][0][b]) - np.trapezoid(ref_d, xs)) < 1e-6
    single = sb.metrics.deletion(model, x, t, heat, step=step)
    assert torch.allclose(single, res["deletion"][0])
    with torch.no_grad():
        clean = model(x).softmax(1)[torch.arange(2), t]
    shared = sb.metrics.deletion_insertion(model, x, t, heat, step=step, batch_size=9, clean_scores=clean)
    for m in ("deletion", "insertion"):
        assert torch.allclose(shared[m][1], res[m][1], atol=1e-6)


def test_rise_auc_formula_when_step_divides():
    """RISE's (sum s - s0/2 - sn/2) / n equals our trapezoid when the step divides H*W."""
    model = make_model("resnet10t")
    x = make_images(1, 16, seed=6)
    heat = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    auc, curve, _ = sb.metrics.insertion(model, x, torch.tensor([2]), heat, step=16, return_curves=True)
    s = curve[0].double()
    n = len(s) - 1
    assert abs(float(auc) - float((s.sum() - s[0] / 2 - s[-1] / 2) / n)) < 1e-6


def test_ties_broken_by_seeded_permutation_not_raster_order():
    heat = torch.zeros(1, 8, 8)
    r0, r0b, r1 = pixel_ranks(heat, 0), pixel_ranks(heat, 0), pixel_ranks(heat, 1)
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1)
    assert not torch.equal(r0[0], torch.arange(64))
    heat[0, 7, 7] = 1.0
    assert pixel_ranks(heat, 0)[0, 63] == 0  # the only maximum comes first


def test_deletion_equals_quantus_pixel_flipping():
    """Quantus flips values of the channel x pixel array: 3 x step values = step pixels.
    Its curve omits the clean image, our point 0."""
    model = make_model("resnet10t", dtype=torch.float32)
    x = make_images(2, 24, seed=7, dtype=torch.float32)  # Quantus needs 3 x step to divide H*W
    t = torch.tensor([0, 4])
    heat = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(4))
    step = 16
    _, ours, _ = sb.metrics.deletion(model, x, t, heat, step=step, return_curves=True)
    metric = quantus.PixelFlipping(features_in_step=3 * step, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True, display_progressbar=False)
    a = heat[:, None].expand(-1, 3, -1, -1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a, device="cpu", softmax=True)
    assert np.allclose(ours[:, 1:].numpy(), np.asarray(ref), atol=1e-5)


def test_pointing_game_hand_cases_and_tolerance():
    heat = torch.zeros(3, 40, 40)
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[:, 20:30, 20:30] = True
    heat[0, 25, 25] = 1  # inside
    heat[1, 25, 5] = 1  # 15 px left of column 20: distance 15, not < 15
    heat[2, 25, 6] = 1  # distance 14 < 15
    assert sb.metrics.pointing_game(heat, masks, tolerance=15).tolist() == [1.0, 0.0, 1.0]
    # the default tolerance scales with the image: 15 * 40 / 224 = 2.68 px
    assert sb.metrics.pointing_game(heat, masks).tolist() == [1.0, 0.0, 0.0]
    assert sb.metrics.pointing_game(heat, masks, tolerance=0).tolist() == [1.0, 0.0, 0.0]
    assert sb.metrics.pointing_game(heat, masks, tolerance=16).tolist() == [1.0, 1.0, 1.0]


def test_pointing_game_ties_and_constant_heatmap():
    heat = torch.zeros(1, 10, 10)
    heat[0, 2, 3] = heat[0, 8, 8] = 5.0  # first maximum in row-major order wins
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 8, 8] = True
    assert sb.metrics.pointing_game(heat, mask, tolerance=0).item() == 0.0
    with pytest.warns(ConstantHeatmapWarning):
        sb.metrics.pointing_game(torch.ones(1, 10, 10), mask, tolerance=15)


def test_pointing_game_equals_quantus_at_tolerance_zero():
    g = torch.Generator().manual_seed(9)
    heat = torch.rand(16, 12, 12, generator=g)  # tie-free
    masks = torch.rand(16, 12, 12, generator=g) < 0.3
    ours = sb.metrics.pointing_game(heat, masks, tolerance=0)
    model = make_model("resnet10t", dtype=torch.float32)
    metric = quantus.PointingGame(disable_warnings=True, display_progressbar=False, normalise=False, abs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = metric(model=model, x_batch=np.zeros((16, 3, 12, 12), np.float32), y_batch=np.zeros(16, int),
                     a_batch=heat[:, None].numpy(), s_batch=masks[:, None].numpy().astype(np.float32), device="cpu")
    assert ours.tolist() == [float(v) for v in ref]
    assert 0 < ours.sum() < 16


def test_pointing_accuracy_is_mean_over_classes():
    hits = [1, 1, 1, 0, 0]
    classes = [0, 0, 0, 1, 1]
    assert sb.metrics.pointing_accuracy(hits, classes) == pytest.approx(0.5)  # not 3/5


def test_energy_pointing_game():
    heat = torch.zeros(2, 4, 4)
    heat[0, 0, 0], heat[0, 3, 3], heat[0, 1, 1] = 3.0, 1.0, -5.0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    with pytest.warns(ConstantHeatmapWarning):
        e = sb.metrics.energy_pointing_game(heat, masks)
    assert e.tolist() == pytest.approx([0.75, 0.0])


def test_box_iou_hand_case():
    heat = torch.zeros(2, 30, 30)
    heat[0, 5:15, 10:26] = 1.0  # the box over columns 10..25 and rows 5..14
    heat[0, 25:27, 0:2] = 0.9  # a smaller component, ignored
    heat[1] = -1.0  # no positive value
    gt = [torch.tensor([[10.0, 5.0, 26.0, 15.0], [0.0, 0.0, 3.0, 3.0]]), torch.tensor([[0.0, 0.0, 5.0, 5.0]])]
    ious, boxes, no_box = sb.metrics.box_iou(heat, gt, return_boxes=True)
    assert boxes[0].tolist() == [10.0, 5.0, 26.0, 15.0]
    assert ious.tolist() == [1.0, 0.0] and no_box.tolist() == [False, True]
    # overlapping ground truth: intersection 8 x 10, union 16 x 10 + 10 x 15 - 80
    iou = sb.metrics.box_iou(heat[:1], [torch.tensor([[18.0, 0.0, 28.0, 15.0]])])
    assert iou.item() == pytest.approx(80 / 230)


def test_box_iou_threshold_and_eight_connectivity():
    heat = torch.zeros(1, 10, 10)
    heat[0, 2, 2] = heat[0, 3, 3] = heat[0, 4, 4] = 1.0  # diagonal: one 8-connected component
    heat[0, 8, 0] = 0.1  # below 0.15 x max
    _, boxes, _ = sb.metrics.box_iou(heat, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], return_boxes=True)
    assert boxes[0].tolist() == [2.0, 2.0, 5.0, 5.0]
    _, boxes, _ = sb.metrics.box_iou(heat, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], threshold=0.05,
                                     return_boxes=True)
    assert boxes[0].tolist() == [2.0, 2.0, 5.0, 5.0]  # the 3-pixel diagonal is still the largest


def test_box_checks():
    heat = torch.rand(1, 10, 10)
    with pytest.warns(sb.errors.BoxClippedWarning):
        sb.metrics.box_iou(heat, [torch.tensor([[-2.0, 0.0, 12.0, 5.0]])])
    with pytest.raises(InvalidInputError, match="x2 <= x1"):
        sb.metrics.box_iou(heat, [torch.tensor([[5.0, 0.0, 5.0, 5.0]])])
    with pytest.raises(InvalidInputError, match="empty"):
        sb.metrics.box_iou(heat, [torch.zeros(0, 4)])


def test_ssim_equals_scikit_image():
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(2, 32, 32, generator=g), torch.rand(2, 32, 32, generator=g)
    b = 0.6 * a + 0.4 * b
    ours = ssim(minmax(a), minmax(b))
    for i in range(2):
        ref = structural_similarity(minmax(a)[i].numpy(), minmax(b)[i].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
        assert abs(float(ours[i]) - ref) < 1e-5
    assert float(ssim(a, a)[0]) == pytest.approx(1.0)


def test_randomization_blocks_of_a_resnet():
    blocks = randomization_blocks(make_model("resnet10t"))
    assert blocks[0] == "conv1.0" and blocks[-1] == "fc" and "layer4.0" in blocks


def test_sanity_randomization_gradient_changes_edge_does_not():
    model = make_model("resnet10t")
    x = make_images(2, 32, seed=3)
    t = torch.tensor([1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = sb.metrics.sanity_randomization(model, x, t, "saliency")
    assert list(df.columns[:4]) == ["stage", "layer", "order", "method"]
    assert df.stage.tolist() == list(range(len(df)))
    assert df.iloc[0].spearman == pytest.approx(1.0) and df.iloc[0].ssim == pytest.approx(1.0)
    assert df.iloc[-1].spearman_abs < 0.9  # fully randomised model: the map has changed
    edge = sb.metrics.sanity_randomization(model, x, t, "edge", order="independent")
    assert np.allclose(edge.spearman.to_numpy(), 1.0)  # a model-free map does not change
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    per = sb.metrics.sanity_randomization(model, x, t, "saliency", per_image=True)
    assert len(per) == 2 * len(df) and set(per.image) == {0, 1}
