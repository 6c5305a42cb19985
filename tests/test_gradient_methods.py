"""Gradient methods: input x gradient, deconvnet, SmoothGrad-Squared and VarGrad against Captum (float64),
the sign option by hand on a linear model, the ReLU-family backward rules by hand and on ReLU6 networks,
shared passes, the model left untouched and the parameter checks."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, NoiseTunnel, Saliency
from torch import nn

import saliencybench as sb
from saliencybench.errors import InvalidInputError, NotGuidedRuleWarning
from saliencybench.methods import shared
from saliencybench.methods.base import collect_notes
from saliencybench.methods.gradient import backward_rule, guided_gradients, guided_rule_modules
from saliencybench.methods.noise import sample_noise

from conftest import assert_same_state, make_images, make_model, snapshot


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    ref = ref.to(ours)
    assert ours.shape == ref.shape
    err = float((ours - ref).abs().max().detach() / ref.abs().max().clamp(min=1e-12))
    assert err < rtol, f"max relative error {err:.3g}"


def out_of_place(model: nn.Module) -> nn.Module:
    """A copy with out-of-place ReLUs (Captum's backward hooks fail on in-place ones)."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = False
    return plain


@pytest.fixture(scope="module")
def mobilenetv2() -> nn.Module:
    """timm mobilenetv2_050: in-place ReLU6 activations only."""
    return make_model("mobilenetv2_050")


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return make_images(2, 32, seed=4)


# ---- against Captum ---------------------------------------------------------------------------

def test_input_x_gradient_equals_captum(resnet, images, targets):
    ref = InputXGradient(resnet).attribute(images.clone().requires_grad_(), target=targets)
    close(sb.explain(resnet, images, targets, "input_x_gradient"), ref.abs().amax(1))
    close(sb.explain(resnet, images, targets, "input_x_gradient", sign="signed"), ref.sum(1))
    close(sb.explain(resnet, images, targets, "input_x_gradient", sign="positive"), ref.sum(1).clamp(min=0))
    close(sb.explain(resnet, images, targets, "input_x_gradient", reduce="l2"), ref.norm(dim=1))


def test_deconvnet_equals_captum_on_relu_model(resnet, images, targets):
    assert any(getattr(m, "inplace", False) for m in resnet.modules())  # ours works in place
    ours = sb.explain(resnet, images, targets, "deconvnet", sign="signed")
    ref = Deconvolution(out_of_place(resnet)).attribute(images.clone().requires_grad_(), target=targets)
    close(ours, ref.sum(1))
    close(sb.explain(resnet, images, targets, "deconvnet"), ref.abs().amax(1))
    # the rule really differs from the guided rule and from the plain gradient
    for other in ("guided_backprop", "saliency"):
        assert not torch.allclose(ours, sb.explain(resnet, images, targets, other, sign="signed"), rtol=1e-2)


def test_guided_backprop_signed_equals_captum_on_relu_model(resnet, images, targets):
    ref = GuidedBackprop(out_of_place(resnet)).attribute(images.clone().requires_grad_(), target=targets)
    close(sb.explain(resnet, images, targets, "guided_backprop", sign="signed"), ref.sum(1))
    close(sb.explain(resnet, images, targets, "guided_backprop", sign="positive"), ref.sum(1).clamp(min=0))


def captum_noise(monkeypatch: pytest.MonkeyPatch, noise: torch.Tensor) -> None:
    """Make Captum's NoiseTunnel add our noise[n,B,...] (its layout: image-major, samples adjacent)."""
    n = noise.shape[0]
    layout = noise.transpose(0, 1).reshape(-1, *noise.shape[2:])

    def add(inp: torch.Tensor, _stdev: float, n_part: int) -> torch.Tensor:
        assert n_part == n
        return inp.repeat_interleave(n, dim=0) + layout

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(add))


@pytest.mark.parametrize("level,seed", [(0.15, 3), (0.4, 0)])
def test_noise_methods_equal_captum_noise_tunnel_on_same_noise(resnet, targets, monkeypatch, level, seed):
    x = make_images(2, 32, seed=6)
    n = 5
    captum_noise(monkeypatch, sample_noise(x, n, level, seed))
    tunnel = NoiseTunnel(Saliency(resnet))

    def ref(nt_type: str, abs_: bool) -> torch.Tensor:
        return tunnel.attribute(x, nt_type=nt_type, nt_samples=n, target=targets, abs=abs_)

    kw = dict(n_samples=n, noise_level=level, seed=seed, batch_size=3)  # 10 jobs in batches of 3
    sq = ref("smoothgrad_sq", True)
    close(sb.explain(resnet, x, targets, "smoothgrad_sq", **kw), sq.amax(1))
    close(sb.explain(resnet, x, targets, "smoothgrad_sq", reduce="sum_abs", **kw), sq.sum(1))
    var = ref("vargrad", False)
    close(sb.explain(resnet, x, targets, "vargrad", **kw), var.amax(1))
    close(sb.explain(resnet, x, targets, "vargrad", reduce="sum", **kw), var.sum(1))
    # Captum's default abs=True is the variance of |g|, not of g
    assert not torch.allclose(ref("vargrad", True).amax(1), var.amax(1), rtol=1e-2)
    # SmoothGrad, signed: the mean gradient's channel sum; default: the mean of max |g| maps
    close(sb.explain(resnet, x, targets, "smoothgrad", sign="signed", **kw), ref("smoothgrad", False).sum(1))
    close(sb.explain(resnet, x, targets, "smoothgrad", sign="positive", **kw),
          ref("smoothgrad", False).sum(1).clamp(min=0))


def test_noise_methods_are_seeded_and_batching_free(resnet, targets):
    x = make_images(2, 32, seed=6)
    for method in ("smoothgrad_sq", "vargrad"):
        a = sb.explain(resnet, x, targets, method, n_samples=3, seed=1, batch_size=2)
        close(sb.explain(resnet, x, targets, method, n_samples=3, seed=1, batch_size=64), a, rtol=1e-10)
        assert not torch.allclose(a, sb.explain(resnet, x, targets, method, n_samples=3, seed=2))


# ---- the sign option by hand --------------------------------------------------------------------

class Linear(nn.Module):
    """score = W x + c on the flattened image: its gradient is W[target], whatever x."""

    num_classes = 10

    def __init__(self, h: int = 6, w: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(10, 3 * h * w, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(10, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def test_sign_options_by_hand_on_a_linear_model():
    model = Linear()
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([4, 9])
    w = model.weight.detach()[t].view(2, 3, 6, 5)
    ex = lambda m, **p: sb.explain(model, x, t, m, **p).double()  # noqa: E731
    hand = {  # method -> its signed attribution A[B,3,H,W]
        "saliency": w, "input_x_gradient": x * w, "integrated_gradients": x * w, "smoothgrad": w,
        "guided_backprop": w, "deconvnet": w,
    }
    for method, a in hand.items():
        with pytest.warns(NotGuidedRuleWarning) if method in ("guided_backprop", "deconvnet") else nullcontext():
            close(ex(method), a.abs().amax(1))  # the default: max over channels of |A|
            close(ex(method, sign="abs"), a.abs().amax(1))
            close(ex(method, sign="abs", reduce="sum_abs"), a.abs().sum(1))
            close(ex(method, sign="abs", reduce="l2"), a.norm(dim=1))
            close(ex(method, sign="signed"), a.sum(1))
            close(ex(method, reduce="sum"), a.sum(1))  # reduce="sum" alone is the signed sum, as before
            close(ex(method, sign="positive"), a.sum(1).clamp(min=0))
            close(ex(method, sign="positive", reduce="sum"), a.sum(1).clamp(min=0))
        assert (a.sum(1) < 0).any() and (a.sum(1) > 0).any()
    close(ex("smoothgrad_sq", n_samples=3), w.square().amax(1))
    # a constant gradient has no variance (E[g^2] - E[g]^2 in float64: zero up to its rounding)
    assert ex("vargrad", n_samples=3).max() < 1e-14 * w.square().max()
    # occlusion: signed by definition and by default; 1x1 windows of 0 remove exactly x * w
    occ = lambda **p: ex("occlusion", window=1, stride=1, **p)  # noqa: E731
    close(occ(), (x * w).sum(1))
    close(occ(sign="signed"), (x * w).sum(1))
    close(occ(sign="abs"), (x * w).sum(1).abs())
    close(occ(sign="positive"), (x * w).sum(1).clamp(min=0))
    assert sb.get_method("occlusion").signed and not any(
        sb.get_method(m).signed for m in [*hand, "smoothgrad_sq", "vargrad"])


# ---- the backward rules by hand, and on ReLU6 networks ---------------------------------------

class Mlp(nn.Module):
    """x -> fc1 -> ReLU6 (in place) -> fc2 -> ReLU -> fc3 -> the same ReLU module again -> fc4."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(i, o).double() for i, o in
                                                  ((48, 32), (32, 24), (24, 16), (16, 10)))
        with torch.no_grad():
            self.fc1.weight.mul_(12)  # pre-activations beyond ReLU6's cap at 6
        self.act6, self.act = nn.ReLU6(inplace=True), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.fc1(x.flatten(1))
        return self.fc4(self.act(self.fc3(self.act(self.fc2(self.act6(z1))))))


def mlp_rule_by_hand(model: Mlp, x: torch.Tensor, t: torch.Tensor, rule: str) -> torch.Tensor:
    """The chain rule written out, with the rule at each ReLU: Tensor[B,3,4,4]."""
    with torch.no_grad():
        z1 = model.fc1(x.flatten(1))
        z2 = model.fc2(z1.clamp(0, 6))
        z3 = model.fc3(z2.relu())
        assert (z1 > 6).any() and (z1 < 0).any() and (z2 < 0).any() and (z3 < 0).any()
        g = model.fc4.weight[t]  # d score / d relu(z3)
        gate = (lambda z: z > 0) if rule == "guided" else (lambda z: torch.ones_like(z, dtype=torch.bool))
        g = g.clamp(min=0) * gate(z3) @ model.fc3.weight
        g = g.clamp(min=0) * gate(z2) @ model.fc2.weight
        g = g.clamp(min=0) * gate(z1) * (z1 < 6) @ model.fc1.weight
    return g.view(-1, 3, 4, 4)


@pytest.mark.parametrize("rule,method", [("guided", "guided_backprop"), ("deconvnet", "deconvnet")])
def test_backward_rules_by_hand_with_relu6_in_place_and_a_reused_relu(rule, method):
    model = Mlp().eval()
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([1, 5, 8])
    ref = mlp_rule_by_hand(model, x, t, rule)
    close(guided_gradients(model, x, t, "logit", 2, rule), ref, rtol=1e-10)
    close(sb.explain(model, x, t, method, sign="signed").double(), ref.sum(1), rtol=1e-6)  # float32 out
    with torch.no_grad(), backward_rule(model, rule):
        ruled = model(x)
    with torch.no_grad():
        assert torch.equal(ruled, model(x))  # the rule leaves the forward values as they are


def relu6_as_relu_and_cap(model: nn.Module) -> nn.Module:
    """A copy where each ReLU6 is an (out-of-place) nn.ReLU followed by a clamp at 6: Captum's rules
    then act at that ReLU, which is our rule at ReLU6 written the slow way."""

    class Cap(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(max=6)

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.ReLU6):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, nn.Sequential(nn.ReLU(), Cap()))
    return out


@pytest.mark.parametrize("method,captum", [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)])
def test_relu6_model_rule_differs_from_captum_and_equals_relu_plus_cap(method, captum, mobilenetv2, x32, targets):
    n6 = sum(type(m) is nn.ReLU6 for m in mobilenetv2.modules())
    assert n6 > 0 and not any(type(m) is nn.ReLU for m in mobilenetv2.modules())
    with collect_notes() as notes:
        ours = sb.explain(mobilenetv2, x32, targets, method, sign="signed")
    rule = "guided" if method == "guided_backprop" else "deconvnet"
    assert notes == [f"{rule} rule applied at: ReLU6 x{n6}"]
    x = x32.clone().requires_grad_()
    # Captum acts at nn.ReLU only: on this network its result is the plain gradient ...
    theirs = captum(mobilenetv2).attribute(x, target=targets).sum(1)
    close(theirs, sb.explain(mobilenetv2, x32, targets, "saliency", sign="signed"))
    assert not torch.allclose(ours, theirs.to(ours), rtol=1e-2)
    # ... and on the same network with ReLU6 written as ReLU + clamp it is ours
    close(ours, captum(relu6_as_relu_and_cap(mobilenetv2)).attribute(x, target=targets).sum(1))


def test_rule_note_and_guided_rule_modules_list_the_activation_types(resnet, mobilenet, effnet, x32, targets):
    assert guided_rule_modules(resnet) == {"ReLU": sum(type(m) is nn.ReLU for m in resnet.modules())} == {"ReLU": 17}
    assert guided_rule_modules(effnet) == {}
    count = lambda cls: sum(type(m).__name__ == cls for m in mobilenet.modules())  # noqa: E731
    assert guided_rule_modules(mobilenet) == {"ReLU": count("ReLU")}
    expected = (f"guided rule applied at: ReLU x{count('ReLU')}; "
                f"not at: Hardsigmoid x{count('Hardsigmoid')}, Hardswish x{count('Hardswish')}")
    assert count("ReLU") > 0 and count("Hardswish") > 0
    with collect_notes() as notes, pytest.warns(NotGuidedRuleWarning, match="Hardswish"):
        sb.explain(mobilenet, x32, targets, "guided_backprop")
    assert notes == [expected]
    with collect_notes() as notes, pytest.warns(NotGuidedRuleWarning, match="SiLU"):
        sb.explain(effnet, x32, targets, "deconvnet")
    n = {c: sum(isinstance(m, c) for m in effnet.modules()) for c in (nn.SiLU, nn.Sigmoid)}  # Sigmoid: SE gates
    assert notes == [f"deconvnet rule applied at: no module; not at: SiLU x{n[nn.SiLU]}, Sigmoid x{n[nn.Sigmoid]}"]
    assert not sb.get_method("deconvnet").check(effnet).applicable
    assert sb.get_method("deconvnet").check(resnet).applicable


# ---- shared passes, the model left untouched -------------------------------------------------

def test_input_x_gradient_from_a_shared_pass_equals_alone(resnet, images, targets, monkeypatch):
    calls = []
    real = shared.gradient_pass
    monkeypatch.setattr(shared, "gradient_pass", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    wanted = {"saliency": {"sign": "signed"}, "input_x_gradient": {}, "gradcam": {}}
    many = sb.explain_many(resnet, images, targets, wanted)
    assert len(calls) == 1 and calls[0].input_grads
    monkeypatch.setattr(shared, "gradient_pass", real)
    for name, p in wanted.items():
        close(many[name], sb.explain(resnet, images, targets, name, **p), rtol=1e-10)
    for p in ({"sign": "positive"}, {"reduce": "sum_abs"}):
        got = sb.explain_many(resnet, images, targets, {"input_x_gradient": p})["input_x_gradient"]
        close(got, sb.explain(resnet, images, targets, "input_x_gradient", **p), rtol=1e-10)


NEW = {"input_x_gradient": {}, "deconvnet": {}, "smoothgrad_sq": {"n_samples": 2}, "vargrad": {"n_samples": 2},
       "guided_backprop": {"sign": "positive"}, "smoothgrad": {"n_samples": 2, "sign": "signed"}}


@pytest.mark.parametrize("method", list(NEW))
def test_model_untouched_also_after_an_exception_midway(method):
    model = make_model("resnet10t", dtype=torch.float32).train()
    model.layer1.requires_grad_(False)
    before = snapshot(model)
    x = make_images(2, 32, dtype=torch.float32)
    heat = sb.explain(model, x, torch.tensor([0, 1]), method, **NEW[method])
    assert heat.shape == (2, 32, 32) and torch.isfinite(heat).all()
    assert_same_state(before, snapshot(model))
    calls = {"n": 0}

    def explode(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("midway")

    handle = model.layer3.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="midway"):
        sb.explain(model, x, torch.tensor([0, 1]), method, batch_size=1, **NEW[method])
    handle.remove()
    assert_same_state(before, snapshot(model))
    assert model.training


# ---- parameter checks -------------------------------------------------------------------------

BAD = [
    ("saliency", {"sign": "absolute"}, "sign.*one of"),
    ("saliency", {"sign": "abs", "reduce": "sum"}, "sign='abs' contradicts reduce='sum'"),
    ("input_x_gradient", {"sign": "signed", "reduce": "l2"}, "sign='signed' contradicts reduce='l2'"),
    ("guided_backprop", {"sign": "positive", "reduce": "max_abs"}, "contradicts"),
    ("deconvnet", {"reduce": "mean"}, "reduce.*one of"),
    ("smoothgrad", {"n_samples": 0}, "n_samples.*>=1"),
    ("smoothgrad_sq", {"noise_level": 0.0}, "noise_level.*>0"),
    ("vargrad", {"sign": "signed"}, "no parameter 'sign'"),
    ("vargrad", {"n_samples": 2.5}, "n_samples.*int"),
    ("integrated_gradients", {"n_steps": 0}, "n_steps.*>=1"),
    ("integrated_gradients", {"rule": "simpson"}, "rule.*one of"),
    ("input_x_gradient", {"score": "prob"}, "score.*one of"),
    ("deconvnet", {"batch_size": 0}, "batch_size.*>=1"),
    ("occlusion", {"sign": "unsigned"}, "sign.*one of"),
]


@pytest.mark.parametrize("method,params,match", BAD, ids=[f"{m}-{sorted(p)}" for m, p, _ in BAD])
def test_bad_parameters_fail_before_any_forward_pass(method, params, match):
    model = Linear()
    forwards = []
    handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(InvalidInputError, match=match):
        sb.explain(model, torch.zeros(1, 3, 6, 5, dtype=torch.float64), torch.tensor([0]), method, **params)
    handle.remove()
    assert forwards == []
    if "contradicts" not in match:  # one parameter at a time: caught with the config, before a run
        with pytest.raises(InvalidInputError, match=match):
            sb.get_method(method).check_params(params)
