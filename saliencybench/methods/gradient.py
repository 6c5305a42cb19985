"""Input-gradient methods: saliency, input x gradient, guided backprop, deconvnet, Integrated Gradients.

All share :func:`input_gradients` (one batched forward and backward pass). The
signed attribution ``A[B,3,H,W]`` of a method becomes a heatmap with
:func:`attribution_map`: the ``sign`` and ``reduce`` options (default: max over
channels of |A|, Simonyan et al. 2014). The noisy-sample methods (SmoothGrad,
SmoothGrad-Squared, VarGrad) build on these in :mod:`.noise`.

Guided backprop and deconvnet change the backward rule of the model's ReLU-family
modules (``nn.ReLU``, ``nn.ReLU6`` and their subclasses, which is what timm's
activation factory builds for ``relu``/``relu6``), with :func:`~.backward_rules.backward_rule`;
:func:`~.backward_rules.guided_rule_modules` tells which, and each call leaves a note listing
them (:func:`~.base.add_note`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from ..modelutil import SCORES, target_score
from .backward_rules import backward_rule, deconvnet_applicability, guided_applicability
from .backward_rules import guided_rule_modules, rule_note  # noqa: F401 - importable from here as before
from .base import REDUCTIONS, batch_slices, reduce_channels, register_method
from .shared import GradientPass, PassNeeds, derives_from_pass

SIGNS = ("abs", "signed", "positive")
MAGNITUDE_REDUCTIONS = ("max_abs", "sum_abs", "l2")
PATH_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")

# Parameter checks shared by the gradient methods (checked with the config, before any pass).
SIGN_CONSTRAINTS = {"sign": (None, *SIGNS), "reduce": (None, *REDUCTIONS), "score": SCORES, "batch_size": ">=1"}


# ---- sign and channel reduction -------------------------------------------------------------

def resolve_sign(sign: str | None, reduce: str | None) -> tuple[str, str]:
    """The ``(sign, reduce)`` a heatmap is made with; contradictory pairs raise :class:`InvalidInputError`.

    ``reduce`` alone (``sign=None``) works as it always did: ``max_abs`` (the default),
    ``sum_abs`` and ``l2`` give magnitudes (sign ``abs``), ``sum`` the signed channel sum
    (sign ``signed``). ``sign`` alone picks its reduction: ``abs`` -> ``max_abs``,
    ``signed`` and ``positive`` -> ``sum``. Both given must agree: ``abs`` goes with
    ``max_abs``/``sum_abs``/``l2``; ``signed`` and ``positive`` only with ``sum`` (the one
    reduction that keeps the sign).
    """
    if sign is not None and sign not in SIGNS:
        raise InvalidInputError(f"unknown sign {sign!r}; use one of {SIGNS} (or None: follow reduce)")
    if reduce is not None and reduce not in REDUCTIONS:
        raise InvalidInputError(f"unknown channel reduction {reduce!r}; use one of {REDUCTIONS}")
    if sign is None:
        return ("signed" if reduce == "sum" else "abs"), reduce or "max_abs"
    if sign == "abs":
        if reduce == "sum":
            raise InvalidInputError(
                "sign='abs' contradicts reduce='sum' (the signed channel sum); use sign='abs' with reduce "
                f"in {MAGNITUDE_REDUCTIONS}, or sign='signed' for the signed sum")
        return "abs", reduce or "max_abs"
    if reduce not in (None, "sum"):
        raise InvalidInputError(
            f"sign={sign!r} contradicts reduce={reduce!r} (a magnitude, which has no sign); leave reduce "
            "unset or use reduce='sum', or use sign='abs' for magnitudes")
    return sign, "sum"


def concrete_sign(params: dict) -> dict:
    """``params`` with ``sign`` and ``reduce`` made concrete by :func:`resolve_sign` (a method's ``finalise``)."""
    if "sign" not in params:
        return params
    sign, reduce = resolve_sign(params.get("sign"), params.get("reduce"))
    return {**params, "sign": sign, "reduce": reduce}


def attribution_map(attributions: torch.Tensor, sign: str | None = None, reduce: str | None = None) -> torch.Tensor:
    """Heatmap Tensor[B,H,W] from signed attributions Tensor[B,3,H,W] (see :func:`resolve_sign`).

    ``abs``: ``reduce`` over channels of |A| (max, sum or Euclidean norm); ``signed``:
    sum_c A; ``positive``: max(0, sum_c A).
    """
    sign, reduce = resolve_sign(sign, reduce)
    heat = reduce_channels(attributions, reduce)
    return heat.clamp(min=0) if sign == "positive" else heat


# ---- gradients ------------------------------------------------------------------------------

def input_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, score: str = "logit", batch_size: int = 64
) -> torch.Tensor:
    """d score(target) / d images for each image: Tensor[B,3,H,W] (same shape as ``images``).

    Images are independent in eval mode, so the gradient of the summed target
    scores of a batch gives every image's own gradient in one backward pass.
    """
    grads = torch.empty_like(images)
    for sl in batch_slices(images.shape[0], batch_size):
        x = images[sl].detach().clone().requires_grad_(True)
        s = target_score(model(x), targets[sl], score)
        (grads[sl],) = torch.autograd.grad(s.sum(), x)
    return grads


@register_method(
    "saliency", paper="Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks. ICLR-W 2014", family="gradient",
    constraints=SIGN_CONSTRAINTS,
    finalise=concrete_sign,
)
def saliency(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", sign: str | None = None,
    reduce: str | None = None, batch_size: int = 64,
) -> torch.Tensor:
    """Vanilla gradient A = d score / d input, as a heatmap Tensor[B,H,W] by ``sign``/``reduce``.

    Default: max over channels of |A| (Simonyan et al.); ``sign="signed"``: sum_c A;
    ``"positive"``: max(0, sum_c A) (:func:`attribution_map`).
    """
    resolve_sign(sign, reduce)
    return attribution_map(input_gradients(model, images, targets, score, batch_size), sign, reduce)


def _input_grad_needs(p: dict) -> PassNeeds:
    return PassNeeds(score=p["score"], input_grads=True)


@derives_from_pass("saliency", _input_grad_needs)
def _saliency_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                        p: dict) -> torch.Tensor:
    return attribution_map(gp.input_grads, p["sign"], p["reduce"])


@register_method(
    "input_x_gradient",
    paper="Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box: Learning Important Features Through "
    "Propagating Activation Differences. arXiv:1605.01713, 2016",
    family="gradient",
    constraints=SIGN_CONSTRAINTS,
    finalise=concrete_sign,
)
def input_x_gradient(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", sign: str | None = None,
    reduce: str | None = None, batch_size: int = 64,
) -> torch.Tensor:
    """Input x gradient: A = x * d score / d x, elementwise; heatmap Tensor[B,H,W] by ``sign``/``reduce``.

    Equal to ``captum.attr.InputXGradient`` (the attribution before the channel
    reduction). Default: max over channels of |A|.
    """
    resolve_sign(sign, reduce)
    return attribution_map(images * input_gradients(model, images, targets, score, batch_size), sign, reduce)


@derives_from_pass("input_x_gradient", _input_grad_needs)
def _input_x_gradient_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                                p: dict) -> torch.Tensor:
    return attribution_map(images * gp.input_grads, p["sign"], p["reduce"])


def guided_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, score: str, batch_size: int, rule: str = "guided",
) -> torch.Tensor:
    """Input gradients with a modified ReLU backward ``rule`` (:func:`~.backward_rules.backward_rule`): Tensor[B,3,H,W]."""
    with backward_rule(model, rule):
        return input_gradients(model, images, targets, score, batch_size)


@register_method(
    "guided_backprop",
    paper="Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All Convolutional Net. ICLR-W 2015",
    family="gradient",
    applicability=guided_applicability,
    constraints=SIGN_CONSTRAINTS,
    finalise=concrete_sign,
)
def guided_backprop(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", sign: str | None = None,
    reduce: str | None = None, batch_size: int = 64,
) -> torch.Tensor:
    """Guided backprop: at each ReLU only positive gradients pass where the input was positive.

    The rule acts at ``nn.ReLU`` and ``nn.ReLU6`` modules (ReLU6: where the input was
    in (0, 6)); Captum acts at ``nn.ReLU`` only, so the two agree on ReLU networks and
    differ on ReLU6 ones. Works with in-place ReLUs. On models with other activations
    it still runs (they keep their plain gradient) and warns with
    :class:`~saliencybench.errors.NotGuidedRuleWarning`; the method's
    ``applicability`` records it, and a note lists the types (:func:`~.backward_rules.rule_note`).
    Returns Tensor[B,H,W] by ``sign``/``reduce`` (default max over channels of |A|).
    """
    resolve_sign(sign, reduce)
    return attribution_map(guided_gradients(model, images, targets, score, batch_size), sign, reduce)


@register_method(
    "deconvnet",
    paper="Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014",
    family="gradient",
    applicability=deconvnet_applicability,
    constraints=SIGN_CONSTRAINTS,
    finalise=concrete_sign,
)
def deconvnet(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", sign: str | None = None,
    reduce: str | None = None, batch_size: int = 64,
) -> torch.Tensor:
    """Deconvnet: at each ReLU the backward passes only positive gradients, whatever the forward input.

    grad_in = relu(grad_out) at ``nn.ReLU``; at ``nn.ReLU6`` also * [input < 6] (the
    cap's own gradient). Equal to ``captum.attr.Deconvolution`` on ReLU networks
    (Captum acts at ``nn.ReLU`` only). Other activations keep their plain gradient
    (warned, noted, as for :func:`guided_backprop`). Returns Tensor[B,H,W] by
    ``sign``/``reduce`` (default max over channels of |A|).
    """
    resolve_sign(sign, reduce)
    return attribution_map(guided_gradients(model, images, targets, score, batch_size, "deconvnet"), sign, reduce)


# ---- Integrated Gradients -------------------------------------------------------------------

def path_rule(n_steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alphas[n]`` in [0,1] and weights ``[n]`` of the path integral's quadrature.

    ``gausslegendre`` (Captum's default) or ``riemann_trapezoid``/``riemann_left``/
    ``riemann_right``/``riemann_middle``.
    """
    if n_steps < 1:
        raise InvalidInputError(f"n_steps must be >= 1, got {n_steps}")
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return torch.tensor(0.5 * (x + 1)), torch.tensor(0.5 * w)
    if rule == "riemann_trapezoid":
        if n_steps < 2:
            raise InvalidInputError("riemann_trapezoid needs n_steps >= 2")
        alphas = torch.linspace(0, 1, n_steps, dtype=torch.float64)
        w = torch.full((n_steps,), 1 / (n_steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n_steps - 1)
        return alphas, w
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if rule not in offsets:
        raise InvalidInputError(f"unknown integration rule {rule!r}; use one of {PATH_RULES}")
    alphas = (torch.arange(n_steps, dtype=torch.float64) + offsets[rule]) / n_steps
    return alphas, torch.full((n_steps,), 1 / n_steps, dtype=torch.float64)


@register_method(
    "integrated_gradients",
    paper="Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017",
    family="gradient",
    constraints={**SIGN_CONSTRAINTS, "n_steps": ">=1", "rule": PATH_RULES},
    finalise=concrete_sign,
)
def integrated_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_steps: int = 50, rule: str = "gausslegendre",
    baseline: float = 0.0, score: str = "logit", sign: str | None = None, reduce: str | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Integrated Gradients from a constant ``baseline`` (0 in normalised space).

    IG_i = (x_i - x'_i) * sum_k w_k dS/dx_i (x' + a_k (x - x')), with the points
    a_k and weights w_k of ``rule`` (Captum's conventions). All steps of all
    images are batched together, ``batch_size`` images per forward. Returns
    Tensor[B,H,W] by ``sign``/``reduce`` (default max over channels of |IG|).
    """
    resolve_sign(sign, reduce)
    alphas, weights = path_rule(n_steps, rule)
    b = images.shape[0]
    base = torch.full_like(images, float(baseline))
    delta = images - base
    total = torch.zeros_like(images, dtype=torch.float64)
    # Flattened (step, image) jobs so a forward pass mixes steps and images.
    jobs_img = torch.arange(b).repeat(n_steps)
    jobs_step = torch.arange(n_steps).repeat_interleave(b)
    a = alphas.to(images.dtype).to(images.device)
    for sl in batch_slices(len(jobs_img), batch_size):
        idx, st = jobs_img[sl].to(images.device), jobs_step[sl].to(images.device)
        x = base[idx] + a[st].view(-1, 1, 1, 1) * delta[idx]
        g = input_gradients(model, x, targets[idx], score, batch_size)
        total.index_add_(0, idx, g.double() * weights.to(images.device)[st].view(-1, 1, 1, 1))
    return attribution_map((delta.double() * total).float(), sign, reduce)
