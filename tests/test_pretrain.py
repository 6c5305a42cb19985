"""Training the missing embedded models side by side changes only the speed: the same weights as
training them in the run, on one thread whatever the machine; a failed process leaves the model to the run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from saliencybench.benchmark import pretrain
from saliencybench.benchmark.cue_models import CUE_RECIPES
from saliencybench.benchmark.models import DEFAULT_RECIPES, cache_files, default_model, train_default_model

TINY = dict(size=32, n_train=64, n_val=32, epochs=1)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path / "cache"))
    for name in ("synthetic-resnet", "synthetic-mobilenetv2"):
        monkeypatch.setitem(DEFAULT_RECIPES, name, dataclasses.replace(DEFAULT_RECIPES[name], **TINY))
    name = "cue-mobilenetv2"
    monkeypatch.setitem(CUE_RECIPES, name, dataclasses.replace(CUE_RECIPES[name], **TINY))
    return ["synthetic-resnet", "synthetic-mobilenetv2", name]


def test_side_by_side_training_gives_the_run_s_weights(tiny, capsys):
    assert pretrain.missing_models([*tiny, "resnet18", tiny[0]]) == ["synthetic-resnet", "synthetic-mobilenetv2",
                                                                    "cue-mobilenetv2"]  # longest first, once
    done = pretrain.train_missing(tiny, processes=2)
    assert sorted(r["name"] for r in done) == sorted(tiny)
    assert "3 models, 2 at a time" in capsys.readouterr().out
    assert pretrain.missing_models(tiny) == [] and all(pretrain.is_cached(n) for n in tiny)
    torch.set_num_threads(2)  # the loop pins its own thread count
    for name in tiny[:2]:
        side = load_file(str(cache_files(name)[0]))
        here, _ = train_default_model(DEFAULT_RECIPES[name], progress=False)
        assert torch.get_num_threads() == 2  # restored
        for k, v in here.state_dict().items():
            assert torch.equal(v, side[k]), (name, k)
    assert default_model(tiny[0], progress=False).info["weights"] == str(cache_files(tiny[0])[0])
    assert pretrain.train_missing(tiny) == []  # nothing missing: nothing started


def test_one_missing_model_or_one_core_trains_in_the_run(tiny):
    assert pretrain.train_missing(tiny[:1], processes=4) == []
    assert pretrain.train_missing(tiny, processes=1) == []
    assert not pretrain.is_cached(tiny[0])


def test_a_failed_process_is_a_warning_and_the_others_finish(tiny, monkeypatch):
    broken = dataclasses.replace(DEFAULT_RECIPES[tiny[0]], batch_size=0)  # fails only inside the loop
    monkeypatch.setitem(DEFAULT_RECIPES, tiny[0], broken)
    with pytest.warns(pretrain.PretrainWarning, match="synthetic-resnet.*the run trains it itself"):
        done = pretrain.train_missing(tiny[:2], processes=2, progress=False)
    assert [r["name"] for r in done] == ["synthetic-mobilenetv2"]
    assert not pretrain.is_cached(tiny[0]) and pretrain.is_cached(tiny[1])


def test_cue_models_count_as_missing_until_verified(tiny):
    name = tiny[2]
    bundle = default_model(name, recipe=CUE_RECIPES[name], progress=False)  # weights, no verification record
    assert bundle.info["weights"] and not pretrain.is_cached(name)
    assert pretrain.recipe_of("resnet18") is None and pretrain.is_cached("resnet18")


def test_train_command_trains_side_by_side(tiny, capsys, monkeypatch):
    from saliencybench.benchmark.cli import main

    monkeypatch.setattr(pretrain, "available_cores", lambda: 2)  # any machine: two at a time

    assert main(["train", "--models", *tiny]) == 0
    out = capsys.readouterr().out
    assert "training 3 models" in out and "at a time" in out
    assert all(f"{n}: val accuracy" in out for n in tiny) and "cue-mobilenetv2" in out.split("verification:")[0].splitlines()[-1]
    assert pretrain.missing_models(tiny) == []
