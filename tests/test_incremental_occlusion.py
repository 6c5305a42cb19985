"""Incremental occlusion (Krypton-style) against full forward passes, on random-init timm models."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import saliencybench as sb
from saliencybench.methods import incremental as inc
from saliencybench.methods.perturbation import occlusion

from conftest import assert_same_state, make_model, snapshot


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def images(h: int, w: int, b: int = 1, dtype: torch.dtype = torch.float64, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def narrow(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A timm ResNet of the named layout with 8..64 channels: cheap at sizes where deep stages get crops."""
    return make_model(name, dtype=dtype, channels=(8, 16, 32, 64), stem_width=8)


def planned_and_full(model: nn.Module, x: torch.Tensor, t: torch.Tensor, window: int, stride: int,
                     batch_size: int, baseline: float = 0.0) -> tuple[inc.OcclusionPlan, torch.Tensor, torch.Tensor]:
    """(plan, its heatmaps, full occlusion's heatmaps) for the same windows, under no_grad."""
    with torch.no_grad():
        plan = inc.plan_occlusion(model, x, window=window, stride=stride)
        ours = inc.run_occlusion_plan(plan, x, t, baseline=baseline, batch_size=batch_size)
        full = occlusion(model, x, t, window=window, stride=stride, baseline=baseline, incremental=False)
    return plan, ours, full


@pytest.fixture(scope="module")
def narrow18() -> nn.Module:
    return narrow("resnet18")


def test_resnet18_equals_full_and_leaves_model_alone(resnet):
    # window 16, stride 10 does not divide 64 - 16: the last window is cut off by the border.
    x = images(64, 64)
    before = snapshot(resnet)
    full = sb.explain(resnet, x, 3, "occlusion", window=16, stride=10, incremental=False)
    ours = sb.explain(resnet, x, 3, "occlusion", window=16, stride=10, incremental=True)
    assert_same_state(before, snapshot(resnet))
    assert rel_err(ours, full) < 1e-4


@pytest.mark.parametrize("h,w,window,stride,baseline", [
    (160, 56, 14, 14, 0.3),  # stride-2 blocks with 1x1 shortcuts on crops along the rows
    (72, 40, 9, 8, 0.0),  # non-dividing stride on both axes
    (65, 67, 16, 16, -0.5),  # odd sizes, windows cut off by the border
])
def test_narrow_resnet18_equals_full(narrow18, h, w, window, stride, baseline):
    x = images(h, w, b=2 if h == 65 else 1)
    t = torch.tensor([7, 2][:x.shape[0]])
    kw = {"window": window, "stride": stride, "baseline": baseline}
    with torch.no_grad():
        ours, note = inc.incremental_occlusion(narrow18, x, t, batch_size=32, **kw)
    full = sb.explain(narrow18, x, t, "occlusion", incremental=False, **kw)
    assert note.startswith("incremental:"), note
    if h == 160:  # the strided block with a downsampling shortcut runs on crops
        plan = inc.plan_occlusion(narrow18, x, window=window, stride=stride)
        assert "layer2.0" in [s.name for s, c in zip(plan.stages, plan.cropped) if c], plan.note
    assert rel_err(ours, full) < 1e-4


def test_window_scores_exact_in_float64(narrow18):
    # The heatmap is float32; the scores themselves agree to float64 rounding.
    x = images(112, 48, b=2)
    t = torch.tensor([1, 5])
    with torch.no_grad():
        plan = inc.plan_occlusion(narrow18, x, window=10, stride=10)
        clean, occluded = inc.window_scores(plan, x, t, baseline=0.2, batch_size=16)
        assert 0 < plan.ideal_flop_ratio <= plan.flop_ratio < 1
        ys, xs = plan.windows
        rows, cols = torch.arange(112), torch.arange(48)
        for b in range(2):
            for i in (0, len(ys[0]) - 1):
                for j in (0, len(xs[0]) - 1):
                    mask = ((rows >= ys[0][i]) & (rows < ys[1][i]))[:, None] & ((cols >= xs[0][j]) & (cols < xs[1][j]))
                    ref = narrow18(torch.where(mask, torch.tensor(0.2, dtype=x.dtype), x[b:b + 1]))[0, t[b]]
                    assert abs(float(occluded[b, i, j] - ref)) < 1e-10 * float(ref.abs().clamp(min=1))
        assert torch.allclose(clean, narrow18(x).gather(1, t[:, None])[:, 0], rtol=1e-12, atol=1e-12)


def test_resnet_d_with_deep_stem_and_avgpool_shortcut_equals_full():
    # resnet10t: Sequential deep stem (opened into stages) and AvgPool2d(2, ceil_mode=True,
    # count_include_pad=False) shortcuts, at odd sizes where ceil_mode matters.
    model = narrow("resnet10t")
    x = images(131, 45)
    t = torch.tensor([2])
    plan, ours, full = planned_and_full(model, x, t, 10, 9, 64)
    assert plan.stages[0].name.startswith("conv1.0")
    assert any(s.name == "layer2.0" for s in plan.stages[:plan.n_crop]), plan.note
    assert rel_err(ours, full) < 1e-4


def test_mobilenetv2_depthwise_blocks_equal_full():
    # float32 here and below: float64 depthwise convolutions are very slow on the CPU.
    model = make_model("mobilenetv2_035", dtype=torch.float32)
    x = images(96, 64, dtype=torch.float32)
    t = torch.tensor([4])
    plan, ours, full = planned_and_full(model, x, t, 16, 12, 64)
    assert plan.n_crop >= 4 and "blocks.1.0" in [s.name for s in plan.stages[:plan.n_crop]], plan.note
    assert rel_err(ours, full) < 1e-4


def test_squeeze_excitation_stops_crops():
    # mobilenetv3_small_050: the stem runs on crops, the first block has squeeze-excitation.
    model = make_model("mobilenetv3_small_050", dtype=torch.float32)
    x = images(48, 48, b=2, dtype=torch.float32)
    t = torch.tensor([0, 9])
    plan, ours, full = planned_and_full(model, x, t, 12, 12, 64)
    assert plan.n_crop == 1 and plan.stages[1].name == "blocks.0.0", plan.note
    assert "blocks.0.0 and later stages run in full" in plan.note and "pools globally" in plan.note
    assert rel_err(ours, full) < 1e-4


def test_efficientnet_falls_back_after_stem():
    model = make_model("efficientnet_b0", dtype=torch.float32)
    x = images(48, 48, b=2, dtype=torch.float32)
    with torch.no_grad():
        heat, note = inc.incremental_occlusion(model, x, torch.tensor([0, 9]), window=12, stride=12)
    # Only the stem could run on crops (the first block has squeeze-excitation), which
    # saves too little: the automatic path runs full forwards.
    assert note.startswith("full forward passes: the plan saves too little work (incremental: 1 of"), note
    assert "blocks.0.0 and later stages run in full" in note and "pools globally" in note
    assert heat.shape == (2, 48, 48)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_unsplittable_model_falls_back_or_raises(narrow18):
    model = Wrapper(narrow18)
    x = images(32, 32)
    t = torch.tensor([3])
    heat, note = inc.incremental_occlusion(model, x, t, window=8, stride=4)
    assert note.startswith("full forward passes:") and "forward_features" in note, note
    full = sb.explain(model, x, t, "occlusion", window=8, stride=4, incremental=False)
    assert torch.equal(heat, full)
    assert torch.equal(sb.explain(model, x, t, "occlusion", window=8, stride=4), full)
    with pytest.raises(sb.NotApplicableError, match="forward_features"):
        sb.explain(model, x, t, "occlusion", window=8, stride=4, incremental=True)


def test_too_few_windows_run_full_forwards(narrow18):
    x = images(32, 32)
    _, note = inc.incremental_occlusion(narrow18, x, torch.tensor([3]), window=16, stride=16)
    assert "too few" in note


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gate = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * self.gate(y.mean((2, 3), keepdim=True)).sigmoid()


class PositionalAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class ChannelAttention(nn.Module):
    """Per-position gate from a mean over channels (CBAM's spatial branch without its conv): local."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(1, keepdim=True).sigmoid()


@pytest.mark.parametrize("module,expected", [
    (nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.ReLU(inplace=True)),
     (inc.AxisGeometry(3, 1, 1),) * 2),
    (nn.Sequential(nn.Conv2d(4, 4, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)), nn.MaxPool2d(3, 2, 1)),
     (inc.AxisGeometry(7, 4, 3), inc.AxisGeometry(13, 4, 4))),
    (ChannelAttention(), (inc.AxisGeometry(1, 1, 0),) * 2),
    (SqueezeExcite(4), "pools globally"),
    (PositionalAdd(), "position-dependent"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "'pad'"),
    (nn.BatchNorm2d(4).train(), "batch statistics"),
])
def test_stage_geometry_trace(module, expected):
    _, field, _ = inc.trace_stage([module], torch.randn(2, 4, 8, 8))
    if isinstance(expected, str):
        assert isinstance(field, str) and expected in field, field
    else:
        assert field == expected


def test_resnet_block_geometry(narrow18):
    stages, _ = inc.split_stages(narrow18, images(64, 64))
    geo = {s.name: s.geometry for s in stages}
    assert list(geo)[:2] == ["conv1+bn1+act1+maxpool", "layer1.0"]
    assert geo["conv1+bn1+act1+maxpool"] == (inc.AxisGeometry(11, 4, 5),) * 2  # 7x7/2 then 3x3/2
    assert geo["layer1.1"] == (inc.AxisGeometry(5, 1, 2),) * 2
    assert geo["layer2.0"] == (inc.AxisGeometry(7, 2, 3),) * 2  # 3x3/2 then 3x3, or the 1x1/2 shortcut
    assert stages[-1].name == "layer4.1"


def test_plan_axis_crops_are_aligned_and_exact():
    rng = random.Random(0)
    for _ in range(300):
        geo = inc.AxisGeometry(rng.randint(1, 9), rng.randint(1, 4), 0)
        geo = inc.AxisGeometry(geo.size, geo.stride, rng.randint(0, geo.size - 1))
        n_in = rng.randint(geo.size, 80)
        n_out = (n_in + 2 * geo.padding - geo.size) // geo.stride + 1
        window, stride = rng.randint(1, n_in), 0
        stride = rng.randint(1, window)
        starts = list(range(0, n_in - window + stride, stride))
        ax = inc.plan_axis(geo, n_in, n_out, starts, [min(s + window, n_in) for s in starts])
        assert ax.size <= n_in and (ax.start % geo.stride == 0).all()
        assert ((ax.start >= 0) & (ax.start + ax.size <= n_in)).all()


def test_basic_blocks_open_into_their_two_convolutions(narrow18):
    x = images(64, 64)
    with torch.no_grad():
        stages, _ = inc.split_stages(narrow18, x)
        parts = inc.open_blocks(stages, x)
        names = [s.name for s in parts]
        assert names[1:5] == ["layer1.0.conv1", "layer1.0", "layer1.1.conv1", "layer1.1"]
        geo = {s.name: s.geometry for s in parts}
        assert geo["layer2.0.conv1"] == (inc.AxisGeometry(3, 2, 1),) * 2  # 3x3/2, or the 1x1/2 shortcut
        assert geo["layer2.0"] == (inc.AxisGeometry(3, 1, 1),) * 2  # 3x3, or the shortcut carried along
        y = x
        for s in parts:
            y = s(y)
        assert torch.allclose(y, narrow18.forward_features(x), rtol=1e-12, atol=1e-12)


def test_window_groups_with_their_own_crops_equal_full(narrow18):
    # Windows near a border change less of the deep maps: buckets of rows x columns get
    # their own crop sizes (and full stages); two images run through every group.
    x = images(96, 64, b=2)
    t = torch.tensor([3, 8])
    plan, ours, full = planned_and_full(narrow18, x, t, 20, 6, 16, baseline=0.1)
    assert len(plan.groups) > 1 and "groups of windows" in plan.note, plan.note
    assert len({tuple(ax[0].size for ax in g.axes if ax) for g in plan.groups}) > 1
    assert sorted((int(i), int(j)) for g in plan.groups for i in g.iy for j in g.ix) == [
        (i, j) for i in range(len(plan.windows[0][0])) for j in range(len(plan.windows[1][0]))]
    assert rel_err(ours, full) < 1e-4


class WideThenPointwise(nn.Module):
    """A timm-style model whose 13x13 convolution's crops cost the whole map, followed by
    1x1 convolutions whose crops are small again."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.wide = nn.Conv2d(8, 8, 13, padding=6)
        self.act = nn.ReLU()
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.pw1(self.act(self.wide(self.stem(x)))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_stages_after_a_full_stage_run_on_crops_again():
    torch.manual_seed(0)
    model = WideThenPointwise().double().eval()
    x = images(32, 32)
    t = torch.tensor([2])
    plan, ours, full = planned_and_full(model, x, t, 4, 4, 32)
    names = [s.name for s in plan.stages]
    assert names == ["stem", "wide+act", "pw1", "pw2"], names
    assert any(g.cropped == [True, False, True, True] for g in plan.groups), [g.cropped for g in plan.groups]
    assert rel_err(ours, full) < 1e-4


def test_norms_swapped_for_identity_during_the_run(narrow18):
    # A context may fold batch norms into the convolutions and swap the norm modules for
    # nn.Identity while occlusion runs: opened blocks look their submodules up at each call.
    import copy

    model = copy.deepcopy(narrow18)
    x = images(64, 48)
    t = torch.tensor([4])
    with torch.no_grad():
        plan = inc.plan_occlusion(model, x, window=12, stride=6)
        for block in [*model.layer1, *model.layer2, *model.layer3, *model.layer4]:
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
        ours = inc.run_occlusion_plan(plan, x, t, batch_size=32)
        full = occlusion(model, x, t, window=12, stride=6, incremental=False)
        again, note = inc.incremental_occlusion(model, x, t, window=12, stride=6)
    assert note.startswith("incremental:"), note
    assert rel_err(ours, full) < 1e-4 and rel_err(again, full) < 1e-4


def test_group_with_its_first_stage_in_full_equals_full(narrow18):
    # A group may run its first stage in full and later ones on crops: the input image is
    # assembled (occluded) in full, and the full output's changed region patches the crops.
    x = images(64, 64)
    t = torch.tensor([1])
    with torch.no_grad():
        plan = inc.plan_occlusion(narrow18, x, window=16, stride=8)
        g = plan.groups[0]
        assert g.cropped[:2] == [True, True]
        g.cropped[0], g.stage_macs[0] = False, plan.stages[0].macs
        ours = inc.run_occlusion_plan(plan, x, t)
        full = occlusion(narrow18, x, t, window=16, stride=8, incremental=False)
    assert rel_err(ours, full) < 1e-4


def test_float32_runs_with_folded_norms_and_equals_full(monkeypatch):
    # float32 plans and runs with the batch norms folded into the convolutions (both ways,
    # incremental and full); the heatmap still equals a float64 full computation.
    import copy
    from contextlib import contextmanager

    from saliencybench import modelutil

    folded: list[int] = []
    real = modelutil.folded_batchnorm

    @contextmanager
    def spy(model, probe):
        with real(model, probe) as n:
            folded.append(n)
            yield n

    monkeypatch.setattr(modelutil.fastpath, "folded_batchnorm", spy)
    model = narrow("resnet18", dtype=torch.float32)
    x = images(64, 64, dtype=torch.float32)
    t = torch.tensor([5])
    with torch.no_grad():
        ours, note = inc.incremental_occlusion(model, x, t, window=16, stride=8)
        ref = occlusion(copy.deepcopy(model).double(), x.double(), t, window=16, stride=8, incremental=False)
    assert note.startswith("incremental:"), note
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folded and folded[0] == norms, (folded, norms)  # every norm of a ResNet follows a convolution
    assert rel_err(ours, ref.float()) < 1e-4
    assert all(isinstance(m, nn.BatchNorm2d) for m in [model.bn1, model.layer1[0].bn1])  # restored


def test_default_path_and_its_note():
    # incremental=None: full forward passes below AUTO_MIN_PIXELS; above, the plan is taken
    # when it needs at most AUTO_MAX_FLOP_RATIO of the convolution work. The path is noted.
    from saliencybench.methods import perturbation
    from saliencybench.methods.base import collect_notes

    model = make_model("resnet18", dtype=torch.float32)
    t = torch.tensor([2])
    for size, expected in ((64, "full forward passes: incremental occlusion is tried from"), (160, "incremental:")):
        x = images(size, size, dtype=torch.float32)
        with collect_notes() as notes:
            heat = sb.explain(model, x, t, "occlusion", window=16, stride=8)
        assert len(notes) == 1 and notes[0].startswith(expected), notes
        assert rel_err(heat, sb.explain(model, x, t, "occlusion", window=16, stride=8, incremental=False)) < 1e-4
    assert perturbation.AUTO_MIN_PIXELS > 64 * 64
