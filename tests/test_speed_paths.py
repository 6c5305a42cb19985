"""The fast paths (channels_last layout, shared clean scores) change no result."""

from __future__ import annotations

import pytest
import torch

import saliencybench as sb
from saliencybench.methods import cam, perturbation
from saliencybench.metrics import perturbation_curves
from saliencybench.modelutil import auto_batch_size, channels_last, safe_forward

from conftest import make_images, make_model


def test_channels_last_restores_the_model_layout_and_keeps_values():
    model = make_model("efficientnet_b0", dtype=torch.float32)
    weight = model.conv_stem.weight
    x = make_images(dtype=torch.float32)
    with torch.inference_mode():
        ref = model(x)
        with channels_last(model) as fmt:
            assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
            out = model(fmt(x))
    assert model.conv_stem.weight is weight and weight.is_contiguous() and not weight.is_inference()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fast_layout_gives_the_same_perturbation_scores(monkeypatch):
    model = make_model("resnet18", dtype=torch.float32)
    x, t = make_images(dtype=torch.float32), torch.tensor([3, 7])
    heat = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = {
        "rise": sb.explain(model, x, t, "rise", n_masks=40),
        "scorecam": sb.explain(model, x, t, "scorecam", layer="layer3"),
        "curves": sb.metrics.deletion_insertion(model, x, t, heat, n_steps=8)["insertion"][1],
    }
    for module in (cam, perturbation, perturbation_curves):
        monkeypatch.setattr(module, "fast_layout", lambda images: False)
    plain = {
        "rise": sb.explain(model, x, t, "rise", n_masks=40),
        "scorecam": sb.explain(model, x, t, "scorecam", layer="layer3"),
        "curves": sb.metrics.deletion_insertion(model, x, t, heat, n_steps=8)["insertion"][1],
    }
    for k in fast:
        assert torch.allclose(fast[k], plain[k], rtol=1e-4, atol=1e-5 * float(plain[k].abs().max())), k


class _SmallMemory(torch.nn.Module):
    """Wraps a model; raises the allocator's out-of-memory error on batches above ``limit``."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.num_classes, self.calls = model, limit, model.num_classes, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_batches_that_run_out_of_memory_are_split_with_the_same_result():
    model = make_model("resnet18", dtype=torch.float32)
    x, t = make_images(3, dtype=torch.float32), torch.tensor([3, 7, 1])
    heat = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = sb.metrics.deletion(model, x, t, heat, n_steps=8, return_curves=True)[1]
    small = _SmallMemory(model, limit=5)
    got = sb.metrics.deletion(small, x, t, heat, n_steps=8, return_curves=True, batch_size=27)[1]
    assert torch.allclose(got, ref, atol=1e-5) and max(small.calls) == 27 and max(c for c in small.calls if c <= 5)
    rise_ref = sb.explain(model, x, t, "rise", n_masks=20, batch_size=30)
    assert torch.allclose(sb.explain(small, x, t, "rise", n_masks=20, batch_size=30), rise_ref, atol=1e-5)


def test_other_errors_are_not_taken_for_out_of_memory():
    class Broken(torch.nn.Module):
        num_classes = 10

        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        safe_forward(Broken(), torch.zeros(4, 3, 8, 8))


def test_auto_batch_size_and_its_result():
    model = make_model("resnet18", dtype=torch.float32)
    x, t = make_images(dtype=torch.float32), torch.tensor([3, 7])
    n = auto_batch_size(model, x[0])
    assert 1 <= n <= 256
    heat = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    a = sb.metrics.insertion(model, x, t, heat, n_steps=8, batch_size="auto")
    assert torch.allclose(a, sb.metrics.insertion(model, x, t, heat, n_steps=8), atol=1e-5)
    with pytest.raises(sb.InvalidInputError, match="batch_size"):
        sb.metrics.insertion(model, x, t, heat, n_steps=8, batch_size=0)


def test_bfloat16_autocast_is_close_to_float32():
    model = make_model("resnet18", dtype=torch.float32)
    x, t = make_images(dtype=torch.float32), torch.tensor([3, 7])
    heat = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    full = sb.metrics.deletion(model, x, t, heat, n_steps=8, return_curves=True)[1]
    half = sb.metrics.deletion(model, x, t, heat, n_steps=8, return_curves=True, precision="bfloat16")[1]
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.05
    with pytest.raises(sb.InvalidInputError, match="precision"):
        sb.metrics.deletion(model, x, t, heat, precision="float8")
