"""Shared fixtures: small random-init timm models and seeded images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn
import pytest

torch.set_num_threads(2)


def _user_added(spec) -> bool:
    """A registry entry made by a test (a plug-in file, README code, imported heatmaps), not by the package."""
    fn = getattr(spec, "fn", None)
    module = getattr(fn, "__module__", None) or ""
    return getattr(spec, "family", None) in ("plugin", "imported") or not module.startswith("saliencybench.")


@pytest.fixture(autouse=True)
def _forget_test_registrations():
    """Drop the methods, metrics and plug-in files a test registered in this process, so that test order
    never matters (built-in entries registered by a lazy import stay)."""
    from saliencybench.benchmark import plugins
    from saliencybench.methods.base import METHODS
    from saliencybench.metrics.base import GROUPS, METRICS

    before = (set(METHODS.entries), set(METRICS.entries), set(GROUPS), dict(plugins._LOADED))
    yield
    for registry, names in ((METHODS, before[0]), (METRICS, before[1])):
        for name in set(registry.entries) - names:
            if _user_added(registry.entries[name]):
                del registry.entries[name]
    for name in set(GROUPS) - before[2]:
        if not (getattr(GROUPS[name], "__module__", "") or "").startswith("saliencybench."):
            del GROUPS[name]
    plugins._LOADED.clear()
    plugins._LOADED.update(before[3])


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A random-init timm model (10 classes) with non-trivial norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def make_images(b: int = 2, size: int = 64, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g).to(dtype)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init resnet10t with a 6-class head (seed 0) saved as safetensors (read only: shared)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(path))
    return path


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count afterwards (a Ray worker's body sets it when built in-process)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def resnet() -> nn.Module:
    """timm resnet18, in-place ReLUs, GAP + linear head."""
    return make_model("resnet18")


@pytest.fixture(scope="session")
def effnet() -> nn.Module:
    """timm efficientnet_b0: SiLU activations, GAP + linear head."""
    return make_model("efficientnet_b0")


@pytest.fixture(scope="session")
def mobilenet() -> nn.Module:
    """timm mobilenetv3_small_050: conv head after pooling, hard-swish and ReLU."""
    return make_model("mobilenetv3_small_050")


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return make_images()


@pytest.fixture(scope="session")
def targets() -> torch.Tensor:
    return torch.tensor([3, 7])


def snapshot(model: nn.Module) -> dict:
    """Everything a method must leave unchanged on a model."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})))
            for m in model.modules()
        ],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["inplace"] == after["inplace"]
    assert before["params"].keys() == after["params"].keys()
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k


def assert_same_rows(a, b, key=("model", "method", "metric", "image_id", "metric_params", "stage"), rtol=1e-5):
    """Result rows equal up to float rounding (1 vs 2 torch threads sum in another order): same rows, no
    duplicates, none missing, every text column equal, numbers and JSON curves equal to ``rtol``."""
    import json

    import numpy as np
    import pandas as pd

    key = [k for k in key if k in a.columns]
    drop = [c for c in ("run_id", "seconds") if c in a.columns]
    a = a.drop(columns=drop).sort_values(key).reset_index(drop=True)
    b = b.drop(columns=[c for c in drop if c in b.columns]).sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 0 and not a.duplicated(key).any() and not b.duplicated(key).any()
    if "curve" in a:
        for x, y in zip(a.pop("curve"), b.pop("curve")):
            assert isinstance(x, str) == isinstance(y, str)
            if isinstance(x, str):
                np.testing.assert_allclose(json.loads(x), json.loads(y), rtol=rtol, atol=1e-6)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=rtol, atol=1e-7)
