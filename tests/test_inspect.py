"""Model inspection (saliencybench.inspect): filters, receptive fields, activations,
class visualisation, nearest neighbours, t-SNE, figures and the ``inspect`` CLI."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import matplotlib.image as mpimg
import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from saliencybench import inspect as si
from saliencybench.benchmark.datasets import GroundTruthDataset, get_dataset
from saliencybench.benchmark.models import DEFAULT_ARCHS, Recipe, default_model
from saliencybench.errors import InvalidInputError, NotApplicableError, UnknownNameError
from saliencybench.inspect import cli

from conftest import assert_same_state, make_images, snapshot

# A 32 px model trained in about 20 s on one CPU thread (0.945 validation accuracy when measured):
# small enough for the suite, good enough that feature neighbours beat pixel neighbours.
FAST_RECIPE = Recipe(arch="synthetic-resnet", size=32, n_train=2000, n_val=200, epochs=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads run far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SALIENCYBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        bundle = default_model("synthetic-resnet", FAST_RECIPE, progress=False)
    assert bundle.info["val_accuracy"] >= 0.5
    return bundle


@pytest.fixture(scope="module")
def test_images(trained):
    """200 synthetic test images at the trained model's 32 px: ([N,3,32,32] in [0,1], labels[N])."""
    images, labels, _ = si.dataset_tensors(get_dataset("synthetic", size=32, n_images=200, split="test"))
    return images, labels


def random_model(name: str) -> nn.Module:
    """A random-init default architecture; for the ResNet, the plain-stem 1-1-1-1 timm ResNet
    (widths 24-192, output stride 8) whose receptive fields are worked out by hand below."""
    torch.manual_seed(0)
    if name == "synthetic-resnet":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=6, channels=(24, 48, 96, 192), output_stride=8).eval()
    return DEFAULT_ARCHS[name](6).eval()


def conv(cin: int, cout: int, k, s=1, p=0, d=1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d)


# ---- first convolution and filters -------------------------------------------------------------------

def test_first_conv_is_found_by_walking_not_by_name():
    stem = nn.Sequential(OrderedDict(odd_name=conv(3, 5, 3), act=nn.ReLU(), later=conv(5, 7, 3)))
    model = nn.Sequential(OrderedDict(pre=nn.Identity(), block=stem))
    name, c = si.first_conv(model)
    assert (name, c) == ("block.odd_name", stem.odd_name)
    assert si.first_conv(random_model("synthetic-vgg"))[0] == "features.0"
    assert si.first_conv(random_model("synthetic-mobilenetv2"))[0] == "conv_stem"


def test_filter_grid_shape_range_and_per_filter_scaling(resnet):
    grid = si.filter_grid(resnet)
    assert grid.shape == (3, 8 * 8 + 1, 8 * 8 + 1)  # 64 filters 7x7: 8 x 8 tiles, 1 px gaps
    assert grid.min() >= 0 and grid.max() <= 1
    w = resnet.conv1.weight[9].float()
    tile = grid[:, 1 + 1 * 8 : 1 + 1 * 8 + 7, 1 + 1 * 8 : 1 + 1 * 8 + 7]  # filter 9: row 1, column 1
    assert torch.allclose(tile, (w - w.min()) / (w.max() - w.min()), atol=1e-6)
    grey = si.filter_grid(nn.Sequential(conv(1, 5, 3)), columns=5)
    assert grey.shape == (3, 5, 21) and torch.equal(grey[0], grey[1])


def test_model_without_convolution_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    for call in (lambda: si.first_conv(mlp), lambda: si.filter_grid(mlp), lambda: si.receptive_field(mlp, "1")):
        with pytest.raises(NotApplicableError, match="no convolution"):
            call()


# ---- receptive fields ------------------------------------------------------------------------------

class Residual(nn.Module):
    """conv3x3 s2 -> conv3x3 main branch plus a 1x1 s2 shortcut (registered first)."""

    def __init__(self) -> None:
        super().__init__()
        self.shortcut = conv(3, 4, 1, s=2)
        self.a = conv(3, 4, 3, s=2, p=1)
        self.b = conv(4, 4, 3, p=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.shortcut(x)


class PoolRegisteredFirst(nn.Module):
    """Registration order (pool, conv) differs from forward order (conv, pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = conv(3, 4, 5, p=2)

    def forward(self, x):
        return self.pool(self.conv(x))


RF_CASES = [  # (stack, layer, size, stride, start), each worked out by hand
    (nn.Sequential(conv(3, 4, 3, p=1), conv(4, 4, 3, p=1)), "1", 5, 1, -2),
    (nn.Sequential(conv(3, 4, 7, s=2, p=3), nn.MaxPool2d(3, 2, 1)), "1", 11, 4, -5),
    (nn.Sequential(conv(3, 4, 3, s=2, p=1), conv(4, 4, 3, p=2, d=2)), "1", 11, 2, -5),
    (nn.Sequential(conv(3, 4, 3, p=2, d=2), conv(4, 4, 3, p=4, d=4)), "1", 13, 1, -6),
    (nn.Sequential(nn.AvgPool2d(2), conv(3, 4, 3, p=1), nn.ReLU()), "2", 6, 2, -2),
    (nn.Sequential(Residual()), "0", 7, 2, -3),
    (nn.Sequential(PoolRegisteredFirst()), "0.pool", 6, 2, -2),
]


@pytest.mark.parametrize("stack,layer,size,stride,start", RF_CASES)
def test_receptive_field_hand_computed(stack, layer, size, stride, start):
    rf = si.receptive_field(stack, layer, input_size=32)
    assert (rf.size, rf.stride, rf.start) == ((size, size), (stride, stride), (start, start))
    assert rf.padding == (-start, -start)


def test_receptive_field_pad_and_rectangular_kernel():
    stack = nn.Sequential(nn.ZeroPad2d((2, 0, 1, 0)), conv(3, 4, (3, 5), p=(1, 2)), conv(4, 4, 3))
    rf = si.receptive_field(stack, "2", input_size=(20, 24))
    assert rf.size == (5, 7) and rf.stride == (1, 1) and rf.start == (-2, -4)
    assert rf.box(0, 0) == (0, 0, 3, 3) and rf.box(5, 6, clip=False) == (2, 3, 9, 8)


def test_receptive_field_of_timm_resnet_by_hand():
    """conv1 7/2/3 -> maxpool 3/2/1 -> layer1 (two 3x3) -> layer2 (3x3 s2, 3x3; 1x1 s2 shortcut)."""
    model = random_model("synthetic-resnet")
    expect = {"conv1": (7, 2, -3), "maxpool": (11, 4, -5), "layer1.0.conv1": (19, 4, -9), "layer1": (27, 4, -13),
              "layer2.0.conv1": (35, 8, -17), "layer2": (51, 8, -25), "layer2.0.downsample": (27, 8, -13)}
    for layer, (size, stride, start) in expect.items():
        rf = si.receptive_field(model, layer, input_size=64)
        assert (rf.size[0], rf.stride[0], rf.start[0]) == (size, stride, start), layer


def test_receptive_field_contains_the_gradient_support():
    """Slow reference: the input pixels an interior unit's gradient reaches."""
    torch.manual_seed(0)
    stack = nn.Sequential(conv(3, 4, 3, s=2, p=1), nn.AvgPool2d(2), conv(4, 4, 3, p=2, d=2), conv(4, 4, 3)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    out = stack(x)
    i, j = out.shape[-2] // 2, out.shape[-1] // 2
    (grad,) = torch.autograd.grad(out[0, 0, i, j], x)
    rows, cols = grad[0].abs().sum(0).nonzero().unbind(1)
    support = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    assert support == si.receptive_field(stack, "3", input_size=64).box(i, j)
    model = random_model("synthetic-resnet").double()
    x = make_images(1, 64)
    x.requires_grad_(True)
    acts = {}
    h = model.layer2.register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
    model(x)
    h.remove()
    (grad,) = torch.autograd.grad(acts["a"][0, :, 4, 4].sum(), x)
    rows, cols = grad[0].abs().sum(0).nonzero().unbind(1)
    x1, y1, x2, y2 = si.receptive_field(model, "layer2", input_size=64).box(4, 4)
    assert x1 <= cols.min() and cols.max() < x2 and y1 <= rows.min() and rows.max() < y2


def test_receptive_field_errors():
    model = random_model("synthetic-resnet")
    with pytest.raises(UnknownNameError, match="layer1.0.conv1"):
        si.receptive_field(model, "layer9")
    with pytest.raises(NotApplicableError, match="not a feature map"):
        si.receptive_field(model, "fc", input_size=64)
    up = nn.Sequential(conv(3, 4, 3), nn.Upsample(scale_factor=2), conv(4, 4, 3))
    with pytest.raises(NotApplicableError, match="cannot be computed"):
        si.receptive_field(up, "2", input_size=16)


# ---- activations -----------------------------------------------------------------------------------

def test_layer_activations_shapes_and_bad_names():
    model = random_model("synthetic-resnet")
    x = make_images(2, 64, dtype=torch.float32)
    before = snapshot(model)
    acts = si.layer_activations(model, x, "layer1")
    assert acts.shape == (2, 24, 16, 16)
    maps = si.activation_maps(model, x, "layer1", 5)
    assert maps.shape == (2, 16, 16) and torch.equal(maps, acts[:, 5]) and maps.min() >= 0  # after the ReLU
    assert_same_state(before, snapshot(model))
    with pytest.raises(UnknownNameError) as e:
        si.layer_activations(model, x, "layer1.0.conv9")
    assert "layer1.0.conv1" in str(e.value) and "layer1.0.conv2" in str(e.value)
    with pytest.raises(InvalidInputError, match=r"24 channels.*0\.\.23"):
        si.activation_maps(model, x, "layer1", 24)
    with pytest.raises(InvalidInputError, match="out of range"):
        si.activation_maps(model, x, "layer1", -1)


def test_top_activating_images_and_patches(trained):
    ds = get_dataset("synthetic", size=32, n_images=40, split="test")
    tops, rf = si.top_activating(trained.model, ds, "layer2", 3, k=5, transform=trained.normalise)
    # deep stem 3x3/2, 3x3, 3x3 -> 11 (stride 2); maxpool 3/2 -> 15 (stride 4); layer1: four 3x3 -> 47;
    # layer2: 3x3/2 -> 55 (stride 8), then three 3x3 -> 103
    assert len(tops) == 5 and rf.map_size == (4, 4) and rf.size == (103, 103)
    values = [t.value for t in tops]
    assert values == sorted(values, reverse=True)
    everything = torch.stack([ds[i].image for i in range(len(ds))])
    maps = si.activation_maps(trained.model, trained.normalise(everything), "layer2", 3)
    assert values[0] == pytest.approx(float(maps.max()), rel=1e-5)
    for t in tops:
        m = maps[t.index]
        assert t.value == pytest.approx(float(m.max()), rel=1e-5)
        assert float(m[t.position]) == pytest.approx(t.value, rel=1e-5)
        x1, y1, x2, y2 = t.box
        assert t.box == rf.box(*t.position) and 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
        assert t.patch.shape == (3, y2 - y1, x2 - x1) and torch.equal(t.patch, t.image[:, y1:y2, x1:x2])
        assert t.patch.min() >= 0 and t.patch.max() <= 1
    with pytest.raises(InvalidInputError, match=r"0\.\.31"):
        si.top_activating(trained.model, ds, "layer2", 48, k=3, transform=trained.normalise)


def test_empty_dataset_is_a_clear_error(trained):
    empty = GroundTruthDataset([], ["a"])
    with pytest.raises(InvalidInputError, match="empty"):
        si.top_activating(trained.model, empty, "layer2", 0)
    with pytest.raises(InvalidInputError, match="empty"):
        si.dataset_tensors(empty)


# ---- class visualisation ---------------------------------------------------------------------------

def test_class_visualisation_increases_the_score_and_is_deterministic(trained):
    before = snapshot(trained.model)
    kw = dict(steps=60, lr=0.1, size=32, mean=trained.mean, std=trained.std)
    res = si.class_visualisation(trained.model, 4, seed=3, **kw)
    assert_same_state(before, snapshot(trained.model))
    assert res.input.shape == (3, 32, 32) and res.image.shape == (3, 32, 32) and res.scores.shape == (60,)
    assert res.image.min() >= 0 and res.image.max() <= 1
    with torch.no_grad():
        clean = float(trained.model(res.input[None])[0, 4])
    assert clean == pytest.approx(res.final_score, rel=1e-5)
    assert res.final_score > res.initial_score + 5
    again = si.class_visualisation(trained.model, 4, seed=3, **kw)
    assert torch.equal(again.input, res.input) and torch.equal(again.scores, res.scores)
    other = si.class_visualisation(trained.model, 4, seed=4, **kw)
    assert not torch.equal(other.input, res.input)


def test_channel_visualisation_increases_the_mean_activation(trained):
    layer = "layer2.0.bn2"  # before the ReLU: a channel that is dead on the start image gets no gradient
    res = si.class_visualisation(trained.model, channel=7, layer=layer, steps=40, size=32, blur_every=0, seed=0)
    assert res.final_score > res.initial_score
    with torch.no_grad():
        clean = si.activation_maps(trained.model, res.input[None], layer, 7).mean()
    assert float(clean) == pytest.approx(res.final_score, rel=1e-5)


def test_class_visualisation_bad_input(trained):
    with pytest.raises(InvalidInputError, match=r"0\.\.5"):
        si.class_visualisation(trained.model, 6, steps=1, size=32)
    with pytest.raises(InvalidInputError, match=r"0\.\.31"):
        si.class_visualisation(trained.model, channel=99, layer="layer2", steps=1, size=32)
    with pytest.raises(UnknownNameError):
        si.class_visualisation(trained.model, channel=0, layer="nope", steps=1, size=32)


def test_gaussian_blur_keeps_constants_and_mass():
    x = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(si.gaussian_blur(x, 1.0), x)
    spike = torch.zeros(1, 1, 15, 15)
    spike[0, 0, 7, 7] = 1
    blurred = si.gaussian_blur(spike, 1.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-6) and blurred[0, 0, 7, 7] < 0.2


# ---- feature spaces --------------------------------------------------------------------------------

def test_penultimate_features_feed_the_classifier(trained, test_images):
    images, _ = test_images
    x = trained.normalise(images[:8])
    feats = si.penultimate_features(trained.model, x)
    assert feats.shape == (8, trained.model.num_features)
    with torch.no_grad():
        assert torch.allclose(trained.model.fc(feats), trained.model(x), atol=1e-5)
    vgg = random_model("synthetic-vgg")
    x = make_images(3, 64, dtype=torch.float32)
    feats = si.penultimate_features(vgg, x)
    assert feats.shape == (3, vgg.get_classifier().in_features)  # after VGG's conv-MLP pre-logits
    with torch.no_grad():
        assert torch.allclose(vgg.get_classifier()(feats), vgg(x), atol=1e-5)


def test_nearest_neighbours_hand_case():
    bank = torch.tensor([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    idx, dist = si.nearest_neighbours(query, bank, 2, "cosine")
    assert idx.tolist() == [[0, 1], [2, 1]] and dist[0, 0] == pytest.approx(0.0)
    idx, dist = si.nearest_neighbours(query, bank, 2, "euclidean")
    assert idx.tolist() == [[0, 2], [2, 0]] and dist[0].tolist() == pytest.approx([1.0, 5 ** 0.5])  # tie: 0 < 3
    idx, _ = si.nearest_neighbours(bank, bank, 1, "euclidean", exclude=torch.arange(4))
    assert idx[:, 0].tolist() == [2, 0, 0, 2]
    assert si.class_agreement(torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]), torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(InvalidInputError, match="k must be"):
        si.nearest_neighbours(bank, bank, 4, exclude=torch.arange(4))
    with pytest.raises(InvalidInputError, match="unknown metric"):
        si.nearest_neighbours(query, bank, 1, "manhattan")


def test_feature_neighbours_agree_on_class_far_more_than_pixel_neighbours(trained, test_images):
    images, labels = test_images
    feats = si.penultimate_features(trained.model, trained.normalise(images))
    every = torch.arange(len(images))
    f_nn, _ = si.nearest_neighbours(feats, feats, 5, "cosine", exclude=every)
    p_nn, _ = si.nearest_neighbours(si.pixel_features(images), si.pixel_features(images), 5, "euclidean",
                                    exclude=every)
    feature, pixel = si.class_agreement(f_nn, labels, labels), si.class_agreement(p_nn, labels, labels)
    assert feature > pixel + 0.2 and pixel < 0.3  # measured: 0.585 vs 0.191 (chance 1/6)


def test_tsne_shape_trustworthiness_and_seed(trained, test_images):
    images, _ = test_images
    feats = si.penultimate_features(trained.model, trained.normalise(images[:80]))
    emb, trust = si.tsne_embedding(feats, seed=0)
    assert emb.shape == (80, 2) and torch.isfinite(emb).all()
    assert 0.8 < trust <= 1.0
    emb2, trust2 = si.tsne_embedding(feats, seed=0)
    assert torch.equal(emb, emb2) and trust == trust2
    with pytest.raises(InvalidInputError, match="at least 6"):
        si.tsne_embedding(feats[:4])


# ---- figures and CLI -------------------------------------------------------------------------------

def _png_shape(path) -> tuple[int, ...]:
    assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_figure_writers(trained, test_images, tmp_path):
    images, labels = test_images
    x, y = images[:12], labels[:12]
    assert len(_png_shape(si.write_filters(si.filter_grid(trained.model), tmp_path))) == 3
    maps = si.activation_maps(trained.model, trained.normalise(x[:4]), "layer1", 0)
    assert _png_shape(si.write_activation_maps(x[:4], maps, tmp_path))[0] > 100
    ds = get_dataset("synthetic", size=32, n_images=10, split="test")
    tops, _ = si.top_activating(trained.model, ds, "layer1", 0, k=3, transform=trained.normalise)
    _png_shape(si.write_top_activating(tops, tmp_path, classes=ds.classes))
    res = si.class_visualisation(trained.model, 0, steps=3, size=32)
    _png_shape(si.write_class_visualisation(res, tmp_path))
    nn_idx = torch.arange(12).roll(1).view(12, 1)
    _png_shape(si.write_neighbours(x[:3], x, nn_idx[:3], nn_idx[:3], y[:3], y, tmp_path, ds.classes))
    paths = si.write_tsne(torch.randn(12, 2), y, tmp_path, classes=ds.classes, images=x)
    assert [p.name for p in paths] == ["tsne.png", "tsne_thumbnails.png"]
    for p in paths:
        _png_shape(p)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="saliencybench")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_filters_on_a_timm_model(tmp_path, capsys):
    assert timm.is_model("resnet18")
    args = _parse(["inspect", "filters", "--model", "resnet18", "--random-init", "--output", str(tmp_path)])
    assert cli.run(args) == 0
    assert "conv1 (64, 3, 7, 7)" in capsys.readouterr().out and (tmp_path / "filters.png").is_file()


def test_cli_subcommands(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_bundle", lambda args: trained)
    common = ["--n-images", "30", "--output", str(tmp_path)]
    assert cli.run(_parse(["inspect", "activations", "--layer", "layer2", "--channel", "3", "--k", "4", *common])) == 0
    out = capsys.readouterr().out
    assert "receptive field of layer2: size (103, 103), stride (8, 8)" in out
    assert (tmp_path / "activations.png").is_file() and (tmp_path / "top_activating.png").is_file()
    assert cli.run(_parse(["inspect", "neighbours", "--k", "3", *common])) == 0
    assert "penultimate features (cosine)" in capsys.readouterr().out and (tmp_path / "neighbours.png").is_file()
    assert cli.run(_parse(["inspect", "tsne", *common])) == 0
    assert "trustworthiness" in capsys.readouterr().out and (tmp_path / "tsne_thumbnails.png").is_file()
    assert cli.run(_parse(["inspect", "class-visualisation", "--target", "ring", "--steps", "5",
                           "--output", str(tmp_path)])) == 0
    assert "class 4 (ring)" in capsys.readouterr().out and (tmp_path / "class_visualisation.png").is_file()
    assert cli.run(_parse(["inspect", "activations", "--layer", "layer2.0.conv", *common])) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'layer2.0.conv'" in err and "layer2.0.conv1" in err
    assert cli.run(_parse(["inspect", "activations", "--layer", "layer2", "--channel", "48", *common])) == 2
    assert "0..31" in capsys.readouterr().err
