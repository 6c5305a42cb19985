"""The fast paths (channels_last layout, folded batch norms, shared clean scores) change no result."""

from __future__ import annotations

import pytest
import torch

import saliencybench as sb
from saliencybench import modelutil
from saliencybench.modelutil import auto_batch_size, channels_last, fast_inference, folded_batchnorm, safe_forward

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
    monkeypatch.setattr(modelutil.fastpath, "fast_layout", lambda images: False)
    plain = {
        "rise": sb.explain(model, x, t, "rise", n_masks=40),
        "scorecam": sb.explain(model, x, t, "scorecam", layer="layer3"),
        "curves": sb.metrics.deletion_insertion(model, x, t, heat, n_steps=8)["insertion"][1],
    }
    for k in fast:
        assert torch.allclose(fast[k], plain[k], rtol=1e-4, atol=1e-5 * float(plain[k].abs().max())), k


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_folded_batchnorm_keeps_outputs_and_restores_the_model(name):
    """Folding is checked against the unfolded outputs and undone on exit: resnet18 (plain
    BatchNorm2d), efficientnet_b0 (timm BatchNormAct2d with SiLU), densenet121 (norms
    after concatenations, which must not be folded, and after each bottleneck convolution)."""
    model = make_model(name, dtype=torch.float32)
    x = make_images(dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with torch.inference_mode():
        ref = model(x)
        with folded_batchnorm(model, x[:1]) as n:
            norms_left = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            out = model(x)
        after = model(x)
    convs_then_norm = {"resnet18": 20, "efficientnet_b0": 49, "densenet121": 59}[name]
    assert n == convs_then_norm and len(norms_left) == len([m for m in modules.values()
                                                            if isinstance(m, torch.nn.BatchNorm2d)]) - n
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert not torch.equal(out, ref)  # the arithmetic did change: the norms were really folded
    assert torch.equal(after, ref) and dict(model.named_modules()).keys() == modules.keys()
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values()))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()


class _ConvUsedTwice(torch.nn.Module):
    """A convolution whose output feeds a norm and, unnormalised, a residual sum: folding the norm
    into the convolution would change the sum, and the check must catch it."""

    num_classes = 4

    def __init__(self, identity_norm: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3, 4)
        if not identity_norm:
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


@pytest.mark.parametrize("identity_norm", [False, True])
def test_folding_that_would_change_the_output_is_refused(identity_norm):
    # With fresh norm statistics folding changes the numbers by ~1e-6 only, so the output
    # check alone would pass; the convolution's second reader is found in the trace.
    torch.manual_seed(0)
    model = _ConvUsedTwice(identity_norm).eval()
    x = make_images(dtype=torch.float32)
    with torch.inference_mode():
        ref = model(x)
        with folded_batchnorm(model, x[:1]) as n:
            out = model(x)
            assert n == 0 and isinstance(model.bn, torch.nn.BatchNorm2d)
        with fast_inference(model, x) as fmt:
            fast = model(fmt(x))
    assert torch.equal(out, ref) and torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_folding_pairs_are_found_once_per_model_structure_and_input_shape():
    model = make_model("resnet18", dtype=torch.float32)
    x = make_images(dtype=torch.float32)
    probes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, inp: probes.append(inp[0].shape[0]))
    with torch.inference_mode():
        for _ in range(3):
            with folded_batchnorm(model, x[:1]) as n:
                assert n == 20
        assert probes == [1, 1]  # finding and checking the pairs, on the first call only
        with folded_batchnorm(model, make_images(size=48, dtype=torch.float32)[:1]) as n:
            assert n == 20 and probes == [1, 1, 1, 1]  # another input shape is checked again
        model.layer1[0].bn2 = torch.nn.BatchNorm2d(64).eval()  # another structure: found again
        with folded_batchnorm(model, x[:1]) as n:
            out = model(x)
        assert n == 20 and len(probes) == 7
        assert isinstance(model.layer1[0].bn2, torch.nn.BatchNorm2d)
        assert torch.allclose(out, model(x), rtol=1e-4, atol=1e-5 * float(out.abs().max()))
    handle.remove()


def test_a_convolution_with_tied_weights_is_not_folded():
    # Two convolutions sharing one weight: folding the norm after one would change the other.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)).eval()
    model[3].weight = model[0].weight
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 2)
    x = make_images(dtype=torch.float32)
    with torch.inference_mode():
        ref = model(x)
        with folded_batchnorm(model, x[:1]) as n:
            out = model(x)
    assert n == 0 and torch.equal(out, ref)


def test_models_in_training_mode_are_not_folded():
    model = make_model("resnet18", dtype=torch.float32).train()
    x = make_images(dtype=torch.float32)
    with torch.no_grad(), fast_inference(model, x):
        assert isinstance(model.bn1, torch.nn.BatchNorm2d)


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
