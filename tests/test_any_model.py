"""Any model: the fast inference paths (channels_last, folded batch norms, incremental occlusion)
only change the speed. Where a speed-up cannot run it declines with a note, and every result
equals the plain path's: float64 (which never takes a fast path) or ``fast_paths(False)``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencybench as sb
from saliencybench import modelutil
from saliencybench.methods.base import collect_notes
from saliencybench.modelutil import channels_last, fast_inference, fast_paths

from conftest import assert_same_state, make_model, snapshot

VIEW_ERROR = "channels_last disabled: RuntimeError: view size is not compatible"


class ViewNet(nn.Module):
    """The issue's reproduction: ``.view()`` on a convolution output, which channels_last breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(-1, 8))


def seeded(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    model = cls(*args).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics away from the identity: folding changes numbers
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and bool(
        (a.double() - b.double()).abs().max() <= rtol * b.double().abs().max() + 1e-7)


def run(kind: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kw) -> tuple[torch.Tensor, list[str]]:
    """A method's heatmaps or a metric's curve, and the notes left."""
    with collect_notes() as notes:
        if kind in ("deletion", "insertion"):
            heat = torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0))
            out = getattr(sb.metrics, kind)(model, x, t, heat, return_curves=True, **kw)[1]
        else:
            out = sb.explain(model, x, t, kind, **kw)
    return out, notes


def against_float64(kind: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kw) -> list[str]:
    """Run float32 (fast paths) and float64 (plain) on the same model; assert equal; return the notes."""
    ours, notes = run(kind, model, x, t, **kw)
    ref, _ = run(kind, copy.deepcopy(model).double(), x.double(), t, **kw)
    assert close(ours, ref.float()), (kind, float((ours - ref).abs().max()))
    return notes


REPRO_CASES = [
    ("occlusion", {"window": 2, "stride": 1}),
    ("occlusion", {"window": 2, "stride": 1, "incremental": False}),
    ("rise", {"n_masks": 20}),
    ("scorecam", {"layer": "conv"}),
    ("deletion", {"step": 4}),
    ("insertion", {"step": 4}),
]


@pytest.mark.parametrize("kind,kw", REPRO_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REPRO_CASES)])
def test_the_reproduction_runs_plain_with_a_note(kind, kw):
    model = seeded(ViewNet)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    notes = against_float64(kind, model, x, torch.tensor([0]), **kw)
    assert any(n.startswith(VIEW_ERROR) for n in notes), notes
    assert_same_state(before, snapshot(model))
    assert "forward" not in model.__dict__ and model.conv.weight.is_contiguous()


def test_incremental_occlusion_of_the_reproduction_is_not_applicable():
    model = seeded(ViewNet)
    with pytest.raises(sb.NotApplicableError, match="forward_features"):
        sb.explain(model, torch.randn(1, 3, 4, 4), 0, "occlusion", window=2, stride=1, incremental=True)


class SizeCheck(nn.Module):
    """A custom kernel built for maps of one width only."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise RuntimeError(f"kernel built for width {self.width}, got {x.shape[-1]}")
        return x


class FixedWidth(nn.Module):
    """A timm-style CNN (forward_features / forward_head) whose stem ends in :class:`SizeCheck`:
    it splits into stages, but its crops fail."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.check, self.body, self.fc = SizeCheck(16), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.check(self.act(self.bn(self.stem(x)))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("incremental", [True, None])
def test_incremental_occlusion_falls_back_to_full_forwards_when_it_fails(incremental):
    from saliencybench.methods import incremental as inc

    model = seeded(FixedWidth)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 3])
    if incremental:
        with collect_notes() as notes:
            ours = sb.explain(model, x, t, "occlusion", window=4, stride=4, incremental=True)
    else:  # the automatic path's planner (at this size occlusion itself would not try)
        ours, note = inc.incremental_occlusion(model, x, t, window=4, stride=4)
        notes = [note]
    assert notes == ["full forward passes: the incremental computation failed "
                     "(RuntimeError: kernel built for width 16, got 8)"], notes
    ref = sb.explain(copy.deepcopy(model).double(), x.double(), t, "occlusion", window=4, stride=4,
                     incremental=False)
    assert close(ours, ref.float())


class FiveD(nn.Module):
    """A 5-D parameter nobody uses, and a Conv3d used on the maps (as timm's lambda layers do)."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.randn(2, 3, 1, 1, 1))
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        z = self.conv3d(y.unsqueeze(1))  # [B,2,4,H,W]
        return self.fc(z.flatten(1, 2).mean((2, 3)))


@pytest.mark.parametrize("kind,kw", [("occlusion", {"window": 4, "stride": 2}), ("rise", {"n_masks": 20}),
                                     ("deletion", {"n_steps": 4})])
def test_a_model_with_5d_weights_runs_the_fast_path_and_equals_float64(kind, kw):
    model = seeded(FiveD)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    notes = against_float64(kind, model, x, torch.tensor([1, 2]), **kw)
    assert not any("disabled" in n for n in notes), notes  # channels_last and folding both ran
    with channels_last(model):
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert model.unused.is_contiguous() and model.conv3d.weight.is_contiguous()
    assert model.conv.weight.is_contiguous()


@torch.library.custom_op("saliencybench_test::contiguous_only", mutates_args=())
def contiguous_only(x: torch.Tensor) -> torch.Tensor:
    """A custom kernel that refuses anything but contiguous memory."""
    if not x.is_contiguous():
        raise RuntimeError("contiguous_only needs contiguous memory")
    return x.clone()


class CustomOp(nn.Module):
    """A conv + norm followed by a custom op that fails (``raw=False``) or silently reads the
    memory in storage order (``raw=True``: different values in channels_last)."""

    num_classes = 4

    def __init__(self, raw: bool) -> None:
        super().__init__()
        self.raw = raw
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.raw:
            y = y.as_strided(y.shape, (y[0].numel(), 36, 6, 1))  # the plain layout's strides, on any memory
        else:
            y = contiguous_only(y)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("raw,reason", [(False, "RuntimeError: contiguous_only needs contiguous memory"),
                                        (True, "outputs differ from the plain path's by")])
def test_a_custom_op_that_fails_or_differs_in_channels_last_is_run_plain(raw, reason):
    model = seeded(CustomOp, raw)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    notes = against_float64("deletion", model, x, torch.tensor([0, 1]), n_steps=4)
    declined = [n for n in notes if "disabled" in n]
    assert len(declined) == 1 and declined[0].startswith(f"channels_last disabled: {reason}"), notes


class BatchedOnlyContiguous(nn.Module):
    """Fails in channels_last only on batches of more than one image: the one-image probe passes."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[0] > 1 and not y.is_contiguous():
            raise RuntimeError("the batched kernel needs contiguous memory")
        return self.fc(y.mean((2, 3)))


def count_calls(model: nn.Module) -> list[int]:
    """The batch size of every forward call of ``model`` (a pre-hook on the model itself)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _m, inp: calls.append(inp[0].shape[0]))
    return calls


def test_a_failure_later_in_the_loop_reruns_plain_and_is_remembered():
    model = seeded(BatchedOnlyContiguous)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2])
    calls = count_calls(model)
    before = snapshot(model)
    notes = against_float64("deletion", model, x, t, n_steps=4)
    assert notes == ["fast paths disabled after a failure on a batch of (5, 3, 8, 8): "
                     "RuntimeError: the batched kernel needs contiguous memory"], notes
    assert_same_state(before, snapshot(model))
    calls.clear()
    _, again = run("deletion", model, x, t, n_steps=4)
    assert calls == [5] and again == notes  # no probe, no fast try: the plain path, with the note


def test_the_probe_runs_once_per_model_structure_and_input_shape():
    model = make_model("resnet10t", dtype=torch.float32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1])
    calls = count_calls(model)
    first, _ = run("deletion", model, x, t, n_steps=4)
    assert calls == [1, 1, 1, 5]  # plain, then the folding trace and its check channels_last, then the curve
    for _ in range(2):
        calls.clear()
        again, notes = run("deletion", model, x, t, n_steps=4)
        assert calls == [5] and notes == [] and torch.equal(again, first)
    calls.clear()
    run("deletion", model, torch.randn(1, 3, 48, 48), t, n_steps=4)
    assert calls == [1, 1, 1, 5]  # another input shape is probed again
    view = seeded(ViewNet)
    calls = count_calls(view)
    run("deletion", view, torch.randn(1, 3, 4, 4), torch.tensor([0]), step=4)
    # plain; channels_last + folding (its trace fails); channels_last (fails); folding alone (nothing to fold)
    assert calls == [1, 1, 1, 1, 5]
    calls.clear()
    _, notes = run("deletion", view, torch.randn(1, 3, 4, 4), torch.tensor([0]), step=4)
    assert calls == [5] and notes[0].startswith(VIEW_ERROR)


def test_hooks_on_convolutions_and_norms_see_plain_outputs():
    model = make_model("resnet10t", dtype=torch.float32)
    conv, norm = model.conv1[0], model.layer1[0].bn1  # the stem's first convolution, feeding a norm
    weight = conv.weight.detach().clone()
    seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    norm_calls: list[int] = []
    conv.register_forward_hook(lambda _m, inp, out: seen.append(
        (inp[0].clone(), out.clone(), isinstance(model.layer2[0].bn1, nn.BatchNorm2d))))
    norm.register_forward_hook(lambda _m, inp, out: norm_calls.append(out.shape[0]))
    calls = count_calls(model)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for kind, kw in (("deletion", {"n_steps": 4}), ("occlusion", {"window": 16, "stride": 16})):
        seen.clear(), norm_calls.clear(), calls.clear()
        _, notes = run(kind, model, x, torch.tensor([1]), **kw)
        assert any(n.startswith("batch-norm folding skipped where modules have hooks of their own") and
                   "conv1.0" in n and "layer1.0.conv1" in n for n in notes), notes
        for inp, out, _ in seen:  # the hook saw the convolution's own output, not conv+norm folded
            ref = F.conv2d(inp, weight, None, conv.stride, conv.padding)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        assert norm_calls == calls  # the hooked norm ran in every forward pass (it was not folded away)
        assert not all(other_norm for _, _, other_norm in seen)  # the other norms were folded meanwhile


def test_fast_paths_switch_runs_the_plain_model_without_a_probe():
    model = make_model("resnet10t", dtype=torch.float32)
    x = torch.randn(1, 3, 32, 32)
    calls = count_calls(model)
    assert modelutil.fast_paths_enabled()
    with fast_paths(False), torch.no_grad():
        assert not modelutil.fast_paths_enabled()
        with fast_inference(model, x) as fmt:
            assert fmt(x) is x and isinstance(model.bn1, nn.BatchNorm2d) and model.conv1[0].weight.is_contiguous()
    assert calls == [] and modelutil.fast_paths_enabled()
    with torch.no_grad(), fast_inference(model, x) as fmt:  # on again: channels_last and folded norms
        assert fmt(x).is_contiguous(memory_format=torch.channels_last) and not isinstance(model.bn1, nn.BatchNorm2d)
        with fast_inference(model, x) as inner:  # nested: nothing more
            assert inner(x).is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1[0].weight.is_contiguous()
    from saliencybench.methods import incremental as inc

    with fast_paths(False):  # occlusion's automatic choice takes full forward passes
        _, note = inc.incremental_occlusion(seeded(FixedWidth), torch.randn(2, 3, 16, 16), torch.tensor([0, 1]),
                                            window=4, stride=4)
    assert note == "full forward passes: the fast paths are switched off (saliencybench.modelutil.fast_paths)"
    with pytest.raises(sb.InvalidInputError, match="True or False"):
        with fast_paths("off"):
            pass


# ---- over the zoo: every registered method and both curves, fast equals plain -----------------

ZOO = [("resnet10t", {}), ("mobilenetv3_small_050", {}), ("regnetx_002", {}), ("ghostnet_050", {}),
       ("convnext_atto", {}), ("dla46_c", {}), ("lambda_resnet26t", {"img_size": 32})]
LIGHT = {"rise": {"n_masks": 16}, "integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 2},
         "occlusion": {"window": 8, "stride": 8}}


@pytest.mark.parametrize("name,kwargs", ZOO, ids=[n for n, _ in ZOO])
def test_every_method_on_timm_architectures_equals_the_plain_path(name, kwargs):
    model = make_model(name, dtype=torch.float32, **kwargs)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3])
    before = snapshot(model)
    outcomes = {}
    for kind in [*sb.list_methods(), "deletion", "insertion"]:
        kw = {"n_steps": 4} if kind in ("deletion", "insertion") else LIGHT.get(kind, {})
        try:
            fast, _ = run(kind, model, x, t, **kw)
        except sb.NotApplicableError as err:
            assert str(err).strip(), kind  # a reason is given
            outcomes[kind] = "n/a"
            continue
        with fast_paths(False):
            plain, _ = run(kind, model, x, t, **kw)
        assert close(fast, plain, rtol=1e-3), (kind, float((fast - plain).abs().max() / plain.abs().max()))
        outcomes[kind] = "ok"
    assert_same_state(before, snapshot(model))
    assert all(outcomes[k] == "ok" for k in ("occlusion", "rise", "deletion", "insertion", "gradcam")), outcomes
