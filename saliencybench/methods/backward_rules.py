"""Modified backward rules at a model's ReLU-family modules: guided backprop (Springenberg et al.,
Striving for Simplicity: The All Convolutional Net, ICLR workshop 2015) and deconvnet (Zeiler &
Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014).

:func:`backward_rule` is a context manager that hooks every ``nn.ReLU`` / ``nn.ReLU6`` (and
subclasses) so that gradients pass by the rule; :func:`guided_rule_modules` and
:func:`rule_note` say where it acts; the applicability checks say when a model is not a ReLU
network (the rule is then not the paper's). The methods built on it are in :mod:`.gradient`
(guided backprop, deconvnet) and :mod:`.cam` (guided Grad-CAM).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..errors import InvalidInputError, NotGuidedRuleWarning
from ..modelutil import RELU_TYPES, activation_modules, non_relu_activations
from .base import Applicability, add_note, warn_not_applicable


class _GuidedGate(torch.autograd.Function):
    """Identity forward; backward passes only positive gradients (guided backprop rule).

    Placed after a ReLU's output, whose own backward already keeps only positions
    where its forward input was positive (ReLU6: in (0, 6)), the two together give
    Springenberg et al.'s rule: grad_in = relu(grad_out) * [x > 0].
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


class _DeconvRule(torch.autograd.Function):
    """Forward: the module's output ``out``; backward: relu(grad_out) straight to the module's input ``x``.

    Zeiler & Fergus' deconvnet rule ignores the sign of the forward input. A module
    with an upper cap (ReLU6: ``max_val`` 6) is treated as a ReLU followed by that
    cap, whose ordinary gradient (zero where the output reached the cap) is kept:
    grad_in = relu(grad_out) * [out < cap].
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, out: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.capped = math.isfinite(cap)
        if ctx.capped:
            ctx.save_for_backward(out < cap)
        return out.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        g = grad.clamp(min=0)
        if ctx.capped:
            (below,) = ctx.saved_tensors
            g = g * below
        return g, None, None


def _guided_hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
    return _GuidedGate.apply(out)


def _deconv_pre_hook(stash: list, _m: nn.Module, args: tuple) -> tuple:
    # The module computes on a detached alias (in place too): its own backward is never
    # used; the forward hook links its output to the input.
    stash.append(args[0])
    return (args[0].detach(), *args[1:])


def _deconv_hook(stash: list, m: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
    return _DeconvRule.apply(stash.pop(), out, float(getattr(m, "max_val", math.inf)))


BACKWARD_RULES = {"guided": "guided_backprop", "deconvnet": "deconvnet"}


def guided_rule_modules(model: nn.Module) -> dict[str, int]:
    """Activation module types at which guided backprop and deconvnet apply their rule, with counts.

    Those are the modules that are ``nn.ReLU`` or ``nn.ReLU6`` (or subclasses), e.g.
    ``{"ReLU": 17}`` for resnet18, ``{"ReLU6": 35}`` for mobilenetv2_050. Functional
    ``F.relu`` calls in a forward are not modules and keep the plain gradient.
    (Captum's GuidedBackprop and Deconvolution apply it at ``nn.ReLU`` only, so on a
    ReLU6 network they give the plain gradient.)
    """
    return dict(sorted(Counter(type(m).__name__ for m in model.modules() if isinstance(m, RELU_TYPES)).items()))


def rule_note(model: nn.Module, rule: str) -> str:
    """``"guided rule applied at: ReLU x14; not at: Hardsigmoid x9, Hardswish x19"``: where ``rule`` acts."""
    counts = lambda c: ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))  # noqa: E731
    others = Counter(type(m).__name__ for _, m in activation_modules(model) if not isinstance(m, RELU_TYPES))
    text = f"{rule} rule applied at: {counts(guided_rule_modules(model)) or 'no module'}"
    return text + (f"; not at: {counts(others)}" if others else "")


def _rule_applicability(rule: str) -> Callable[[nn.Module], Applicability]:
    method = BACKWARD_RULES[rule]

    def check(model: nn.Module) -> Applicability:
        """Defined on ReLU networks; other activations keep their plain gradient."""
        others = non_relu_activations(model)
        if others:
            return Applicability(
                False, f"the model uses {', '.join(others)} activations; the {rule} rule is applied only at its "
                f"ReLU units, so this is not the paper's {method}")
        if not any(isinstance(m, RELU_TYPES) for m in model.modules()):
            return Applicability(False, f"the model has no ReLU modules: {method} reduces to the plain gradient")
        return Applicability(True)

    return check


guided_applicability, deconvnet_applicability = _rule_applicability("guided"), _rule_applicability("deconvnet")


@contextmanager
def backward_rule(model: nn.Module, rule: str) -> Iterator[None]:
    """Within the block, the model's ReLU-family modules backpropagate by ``rule``.

    ``"guided"``: grad_in = relu(grad_out) * [forward input > 0] (ReLU6: in (0, 6));
    ``"deconvnet"``: grad_in = relu(grad_out) (ReLU6: * [input < 6]). Forward values are
    unchanged; works with in-place modules; every hook is removed on exit, also on an
    exception. Warns (:class:`NotGuidedRuleWarning`) on models with other activations
    and leaves the note of :func:`rule_note`.
    """
    if rule not in BACKWARD_RULES:
        raise InvalidInputError(f"unknown backward rule {rule!r}; use one of {tuple(BACKWARD_RULES)}")
    found = _rule_applicability(rule)(model)
    if not found.applicable:
        warn_not_applicable(BACKWARD_RULES[rule], found.reason, NotGuidedRuleWarning)
    add_note(rule_note(model, rule))
    handles = []
    try:
        for m in model.modules():
            if not isinstance(m, RELU_TYPES):
                continue
            if rule == "guided":
                handles.append(m.register_forward_hook(_guided_hook))
            else:
                stash: list = []
                handles.append(m.register_forward_pre_hook(partial(_deconv_pre_hook, stash)))
                handles.append(m.register_forward_hook(partial(_deconv_hook, stash)))
        yield
    finally:
        for h in handles:
            h.remove()
