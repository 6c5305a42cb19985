"""Shared fixtures: small random-init timm models and seeded images."""

from __future__ import annotations

import timm
import torch
from torch import nn
import pytest

torch.set_num_threads(2)


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
