"""ROAR (Hooker et al. NeurIPS 2019): the ablation by hand, the retraining, the run's files and resume,
an oracle that the protocol must tell from random removal, and the errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

from saliencybench.benchmark import load_all
from saliencybench.benchmark import roar as roar_mod
from saliencybench.benchmark.cli import main
from saliencybench.benchmark.datasets import get_dataset
from saliencybench.benchmark.models import (DEFAULT_ARCHS, SYNTHETIC_MEAN, SYNTHETIC_STD, ModelBundle, Recipe,
                                            _training_data, train_default_model)
from saliencybench.errors import InvalidInputError, SaliencyBenchError, UnknownNameError
from saliencybench.methods.base import generator
from saliencybench.metrics.perturbation_curves import pixel_ranks

load_all()
TINY = Recipe(arch="synthetic-mobilenetv2", size=32, n_train=96, n_val=48, epochs=1, lr=2e-2)
N_ORACLE = (300, 120, 5)  # training images, held-out images, epochs of the oracle check


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path / "cache"))


def _removed_by_hand(heat: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """bool[B,H,W]: the k pixels of each map that come first by (-value, place in the image's seeded
    permutation), the permutations drawn one per image from one generator, as the tie rule says."""
    b, h, w = heat.shape
    g = generator(seed)
    out = torch.zeros(b, h * w, dtype=torch.bool)
    for i in range(b):
        perm = torch.randperm(h * w, generator=g).tolist()
        place = {p: j for j, p in enumerate(perm)}
        vals = heat[i].flatten().tolist()
        order = sorted(range(h * w), key=lambda p: (-vals[p], place[p]))
        out[i, order[:k]] = True
    return out.view(b, h, w)


def test_ablate_hand_case():
    img = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3) / 54
    heat = torch.tensor([[[9.0, 1, 2], [3, 8, 4], [5, 6, 7]], [[0.0, 0, 0], [0, 1, 0], [0, 0, 2]]])
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = roar_mod.ablate(img, pixel_ranks(heat, 0), 1 / 3, fill)  # round(3) = 3 pixels
    expect = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    expect[1] |= _removed_by_hand(heat, 3, 0)[1]  # 2 and 1, then one of the seven tied zeros, by the tie rule
    assert int(expect[1].sum()) == 3 and torch.equal(expect, _removed_by_hand(heat, 3, 0))
    for i in range(2):
        for c in range(3):
            assert torch.equal(out[i, c][expect[i]], torch.full((3,), float(fill[c])))
            assert torch.equal(out[i, c][~expect[i]], img[i, c][~expect[i]])


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 0.9])
def test_ablate_exactly_top_pixels_with_ties(fraction):
    g = torch.Generator().manual_seed(3)
    heat = torch.randint(0, 4, (3, 7, 9), generator=g).float()  # many ties
    img = torch.rand(3, 3, 7, 9, generator=g)
    fill = roar_mod.channel_mean(img)
    k = round(fraction * 63)
    out = roar_mod.ablate(img, pixel_ranks(heat, seed=5), fraction, fill)
    removed = (out == fill.view(1, 3, 1, 1)).all(1)
    assert removed.flatten(1).sum(1).tolist() == [k] * 3
    assert torch.equal(removed, _removed_by_hand(heat, k, 5))
    assert torch.equal(out.permute(0, 2, 3, 1)[~removed], img.permute(0, 2, 3, 1)[~removed])
    assert torch.allclose(fill, img.mean((0, 2, 3)))
    assert torch.equal(roar_mod.ablate(img, pixel_ranks(heat, 5), 0.0, fill), img)


def test_mask_maps_remove_every_object_pixel():
    """The information check on the synthetic set: with the exact object masks as maps, every object
    pixel is replaced once the fraction covers the largest object, and no pixel outside when it does not."""
    ds = get_dataset("synthetic", size=32, n_images=24, seed=0, split="train")
    images = torch.stack([s.image for s in ds])
    masks = torch.stack([s.mask for s in ds])
    fill = roar_mod.channel_mean(images)
    ranks = pixel_ranks(masks.float(), 0)
    big = math.ceil(masks.flatten(1).sum(1).max().item() / 1024 * 100) / 100
    out = roar_mod.ablate(images, ranks, big, fill)
    assert (out.permute(0, 2, 3, 1)[masks] == fill).all()
    small = masks.flatten(1).sum(1).min().item() / 1024 * 0.99
    out = roar_mod.ablate(images, ranks, small, fill)
    changed = (out != images).any(1)
    assert not (changed & ~masks).any()


def test_fraction_zero_is_the_unmodified_retrain_and_deterministic():
    xtr, ytr, xva, yva = _training_data(TINY)
    a = roar_mod.retrain(TINY, (xtr, ytr), (xva, yva))
    b = roar_mod.retrain(TINY, (xtr.clone(), ytr), (xva.clone(), yva))
    _model, info = train_default_model(TINY, progress=False)  # the plain loop on the recipe's own data
    assert a[0] == b[0] == info["val_accuracy"]
    blank = roar_mod.ablate(xtr, pixel_ranks(torch.zeros(96, 32, 32), 0), 1.0, roar_mod.channel_mean(xtr))
    blank_val = roar_mod.ablate(xva, pixel_ranks(torch.zeros(48, 32, 32), 1), 1.0, roar_mod.channel_mean(xtr))
    acc, _ = roar_mod.retrain(TINY, (blank, ytr), (blank_val, yva))  # trained and tested on constant images
    assert acc in {(yva == c).sum().item() / len(yva) for c in range(6)}  # one class for all: the loop used them
    assert _training_data(TINY)[0] is xtr  # the recipe's own data is back in the loop's cache

def _counting(monkeypatch, name):
    calls = []
    fn = getattr(roar_mod, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    monkeypatch.setattr(roar_mod, name, wrapper)
    return calls


def test_end_to_end_files_and_resume(tmp_path, monkeypatch):
    trains = _counting(monkeypatch, "retrain")
    explains = _counting(monkeypatch, "method_heatmaps")
    kw = dict(recipe=TINY, output=tmp_path / "out", progress=False)
    table = roar_mod.roar("synthetic-mobilenetv2", ["saliency"], [0.3, 0.6], **kw)
    assert len(trains) == 1 + 2 * 2 and len(explains) == 2  # baseline + 2 methods x 2 fractions; train + val maps
    assert table.shape[0] == 2 * 3 and list(table.method.unique()) == ["random", "saliency"]
    for col in ("model", "method", "fraction", "removed_pixels", "accuracy", "accuracy_std", "n_train", "n_val",
                "train_seconds", "explain_seconds", "recipe", "params", "versions", "base_accuracy", "seed"):
        assert col in table.columns
    assert sorted(table.fraction.unique()) == [0.0, 0.3, 0.6]
    assert table[table.fraction == 0.3].removed_pixels.tolist() == [round(0.3 * 1024)] * 2
    assert table.groupby("fraction").accuracy.nunique()[0.0] == 1  # the baseline, trained once, shared
    assert (table.n_train == 96).all() and json.loads(table.recipe[0])["epochs"] == 1
    assert json.loads(table[table.method == "saliency"].params.iloc[0])["score"] == "logit"  # resolved parameters
    assert json.loads(table.params[0]) == {"tie_break_seed": 0}
    run = tmp_path / "out" / f"roar-synthetic-mobilenetv2-{TINY.key()}-seed0"
    for name in ("roar.csv", "roar.md", "roar.png", "roar.svg"):
        assert (run / name).stat().st_size > 0
    assert len(list((run / "cells").glob("*.json"))) == 5
    assert pd.read_csv(run / "roar.csv").shape == table.shape
    assert "| saliency |" in (run / "roar.md").read_text()

    again = roar_mod.roar("synthetic-mobilenetv2", ["saliency"], [0.3, 0.6], **kw)
    assert len(trains) == 5 and len(explains) == 2  # nothing retrained, the maps not recomputed
    pd.testing.assert_frame_equal(again.drop(columns="versions"), table.drop(columns="versions"))
    more = roar_mod.roar("synthetic-mobilenetv2", ["saliency"], [0.3, 0.6, 0.9], **kw)
    assert len(trains) == 7 and len(explains) == 2  # only the new fraction, maps from the cache
    assert more.shape[0] == 2 * 4
    next(iter((run / "cells").glob("saliency-0.3000-*.json"))).unlink()
    roar_mod.roar("synthetic-mobilenetv2", ["saliency"], [0.3], **kw)
    assert len(trains) == 8


def test_repeats_mean_and_std(tmp_path):
    table = roar_mod.roar("synthetic-mobilenetv2", [], [0.5], recipe=TINY, repeats=2, output=tmp_path, progress=False)
    row = table[table.fraction == 0.5].iloc[0]
    accs = json.loads(row.accuracies)
    assert len(accs) == 2 and row.accuracy == pytest.approx(sum(accs) / 2)
    assert row.accuracy_std == pytest.approx(pd.Series(accs).std(ddof=1))
    assert len(list(tmp_path.glob("roar-*/cells/none-0.0000-r1-*.json"))) == 1


def test_oracle_is_told_from_random(tmp_path, monkeypatch):
    """The protocol discriminates: on synthetic-cue the class is only in a small texture square, so
    removing the square (an oracle map) leaves chance accuracy after retraining; removing as many
    random pixels keeps most of it. The base model only explains, and the oracle needs none: an
    untrained one stands in for it."""
    params = (("cue_max", 10), ("cue_min", 8))
    recipe = Recipe(arch="synthetic-resnet", size=32, n_train=N_ORACLE[0], n_val=N_ORACLE[1], epochs=N_ORACLE[2],
                    lr=5e-3, dataset="synthetic-cue", dataset_params=params)
    untrained = ModelBundle("synthetic-resnet", DEFAULT_ARCHS["synthetic-resnet"](4).eval(), ["a"] * 4, 32,
                            SYNTHETIC_MEAN, SYNTHETIC_STD, {"val_accuracy": 0.25})
    monkeypatch.setattr(roar_mod, "default_model", lambda *a, **k: untrained)

    def masks(split, n):
        ds = get_dataset("synthetic-cue", size=32, n_images=n, seed=0, split=split, **dict(params))
        return torch.stack([ds[i].mask.float() for i in range(n)])

    table = roar_mod.roar("synthetic-resnet", [], [0.1], recipe=recipe, output=tmp_path, progress=False,
                          heatmaps={"oracle": (masks("train", recipe.n_train), masks("val", recipe.n_val))})
    acc = table.set_index(["method", "fraction"]).accuracy
    # seed 0: 0.92, 0.25, 0.83; recipe and tie-break seeds 1 and 2: (0.90, 0.23, 0.75) and (0.80, 0.31, 0.82)
    assert acc["oracle", 0.0] > 0.75  # a model of decent accuracy (chance 0.25)
    assert acc["oracle", 0.1] < 0.25 + 0.12  # the class is gone: chance
    assert acc["random", 0.1] > acc["oracle", 0.1] + 0.3


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(model="resnet50"), SaliencyBenchError, "not a default model"),
    (dict(methods=["gradcamm"]), UnknownNameError, "gradcam"),
    (dict(fractions=[0.0]), SaliencyBenchError, "strictly between 0 and 1"),
    (dict(fractions=[1.0]), SaliencyBenchError, "strictly between 0 and 1"),
    (dict(fractions=[]), SaliencyBenchError, "at least one fraction"),
    (dict(repeats=0), SaliencyBenchError, "repeats"),
    (dict(n_train=0), SaliencyBenchError, "n_train"),
    (dict(method_params={"vargrad": {"n_samples": 4}}), SaliencyBenchError, "not among the methods"),
    (dict(method_params={"saliency": {"nope": 1}}), InvalidInputError, "nope"),
    (dict(heatmaps={"mine": (torch.zeros(3, 64, 64), torch.zeros(3, 64, 64))}), InvalidInputError, "shapes"),
    (dict(output="s3://bucket/results"), InvalidInputError, "local directory"),
])
def test_bad_inputs(kwargs, error, text, tmp_path, monkeypatch):
    monkeypatch.setattr(roar_mod, "default_model", lambda *a, **k: pytest.fail("checked too late"))
    args = {"model": "synthetic-mobilenetv2", "methods": ["saliency"], "fractions": [0.5], "output": tmp_path,
            "progress": False, **kwargs}
    with pytest.raises(error, match=text):
        roar_mod.roar(args.pop("model"), args.pop("methods"), args.pop("fractions"), **args)


def test_cli_errors_exit_2(capsys, tmp_path):
    for argv, text in ((["--models", "resnet50"], "not a default model"),
                       (["--models", "synthetic-resnet", "resnet50"], "not a default model"),
                       (["--models", "synthetic-resnet", "synthetic-vit", "--run-id", "x"], "one model"), (["--fractions", "0.5,1.5"], "between 0"),
                       (["--fractions", "a"], "numbers"), (["--param", "n_samples=3"], "METHOD.NAME=VALUE")):
        assert main(["roar", "--output", str(tmp_path), "--quiet", *argv]) == 2
        assert text in capsys.readouterr().err


def test_cli_tiny_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(roar_mod.DEFAULT_RECIPES, "synthetic-mobilenetv2", dataclasses.replace(TINY, n_train=200))
    monkeypatch.setitem(roar_mod.DEFAULT_RECIPES, "synthetic-resnet",
                        dataclasses.replace(TINY, arch="synthetic-resnet", n_train=200))
    assert main(["roar", "--models", "synthetic-mobilenetv2", "synthetic-resnet", "--methods", "saliency",
                 "--fractions", "0.5", "--n-train", "64", "--n-val", "32", "--param", "saliency.batch_size=16",
                 "--output", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| random |" in out and "| saliency |" in out and "roar.png" in out
    assert "# ROAR on synthetic-mobilenetv2" in out and "# ROAR on synthetic-resnet" in out
    for model in ("synthetic-mobilenetv2", "synthetic-resnet"):
        table = pd.read_csv(next(tmp_path.glob(f"roar-{model}-*/roar.csv")))
        assert (table.model == model).all()
        assert (table.n_train == 64).all() and json.loads(table.params[2])["batch_size"] == 16
