"""Input-gradient methods: saliency, guided backprop, Integrated Gradients, SmoothGrad.

All share :func:`input_gradients` (one batched forward and backward pass) and
reduce the 3 input channels of the attribution to a heatmap with
:func:`~saliencybench.methods.base.reduce_channels` (default: max of absolute
values, Simonyan et al. 2014).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, NotGuidedRuleWarning
from ..modelutil import RELU_TYPES, GuardState, non_relu_activations, target_score
from .base import Applicability, batch_slices, generator, reduce_channels, register_method, warn_not_applicable
from .shared import GradientPass, PassNeeds, derives_from_pass


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
    "saliency", paper="Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks. ICLR-W 2014", family="gradient"
)
def saliency(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", reduce: str = "max_abs",
    batch_size: int = 64,
) -> torch.Tensor:
    """Vanilla gradient: ``reduce`` over channels of |d score / d input| -> Tensor[B,H,W]."""
    return reduce_channels(input_gradients(model, images, targets, score, batch_size), reduce)


@derives_from_pass("saliency", lambda p: PassNeeds(score=p["score"], input_grads=True))
def _saliency_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                        p: dict) -> torch.Tensor:
    return reduce_channels(gp.input_grads, p["reduce"])


class _GuidedGate(torch.autograd.Function):
    """Identity forward; backward passes only positive gradients (guided backprop rule).

    Placed after a ReLU's output, whose own backward already keeps only positions
    where its forward input was positive, the two together give Springenberg et
    al.'s rule: grad_in = relu(grad_out) * [x > 0].
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def _guided_hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
    return _GuidedGate.apply(out)


def guided_applicability(model: nn.Module) -> Applicability:
    """Guided backprop is defined on ReLU networks; report other activations."""
    others = non_relu_activations(model)
    if others:
        return Applicability(
            False,
            f"the model uses {', '.join(others)} activations; the guided rule is applied only at its "
            "ReLU units, so this is not Springenberg et al.'s guided backprop",
        )
    if not any(isinstance(m, RELU_TYPES) for m in model.modules()):
        return Applicability(False, "the model has no ReLU modules: guided backprop reduces to the plain gradient")
    return Applicability(True)


def guided_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, score: str, batch_size: int
) -> torch.Tensor:
    """Input gradients with the guided ReLU backward rule: Tensor[B,3,H,W]."""
    found = guided_applicability(model)
    if not found.applicable:
        warn_not_applicable("guided_backprop", found.reason, NotGuidedRuleWarning)
    state = GuardState()
    try:
        for m in model.modules():
            if isinstance(m, RELU_TYPES):
                state.handles.append(m.register_forward_hook(_guided_hook))
        return input_gradients(model, images, targets, score, batch_size)
    finally:
        for h in state.handles:
            h.remove()


@register_method(
    "guided_backprop",
    paper="Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All Convolutional Net. ICLR-W 2015",
    family="gradient",
    applicability=guided_applicability,
)
def guided_backprop(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", reduce: str = "max_abs",
    batch_size: int = 64,
) -> torch.Tensor:
    """Guided backprop: at each ReLU only positive gradients pass where the input was positive.

    Works with in-place ReLUs. On models with non-ReLU activations it still runs
    (the rule is applied at the ReLUs there are) and warns with
    :class:`~saliencybench.errors.NotGuidedRuleWarning`; the method's
    ``applicability`` records it. Returns Tensor[B,H,W].
    """
    return reduce_channels(guided_gradients(model, images, targets, score, batch_size), reduce)


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
        raise InvalidInputError(
            f"unknown integration rule {rule!r}; use gausslegendre, riemann_trapezoid, riemann_left, "
            "riemann_right or riemann_middle"
        )
    alphas = (torch.arange(n_steps, dtype=torch.float64) + offsets[rule]) / n_steps
    return alphas, torch.full((n_steps,), 1 / n_steps, dtype=torch.float64)


@register_method(
    "integrated_gradients",
    paper="Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017",
    family="gradient",
)
def integrated_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_steps: int = 50, rule: str = "gausslegendre",
    baseline: float = 0.0, score: str = "logit", reduce: str = "max_abs", batch_size: int = 64,
) -> torch.Tensor:
    """Integrated Gradients from a constant ``baseline`` (0 in normalised space).

    IG_i = (x_i - x'_i) * sum_k w_k dS/dx_i (x' + a_k (x - x')), with the points
    a_k and weights w_k of ``rule`` (Captum's conventions). All steps of all
    images are batched together, ``batch_size`` images per forward. Returns
    Tensor[B,H,W] after ``reduce`` over channels.
    """
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
    return reduce_channels((delta.double() * total).float(), reduce)


@register_method(
    "smoothgrad",
    paper="Smilkov, Thorat, Kim, Viegas, Wattenberg. SmoothGrad: removing noise by adding noise. ICML-W 2017",
    family="gradient",
)
def smoothgrad(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_samples: int = 50, noise_level: float = 0.15,
    seed: int = 0, score: str = "logit", reduce: str = "max_abs", batch_size: int = 64,
) -> torch.Tensor:
    """SmoothGrad: mean of the saliency map over ``n_samples`` noisy copies of each image.

    Noise is N(0, sigma^2) with sigma = ``noise_level`` x (max - min) of each image
    (Smilkov et al.'s 15% of the input range), drawn from a generator seeded with
    ``seed``. Returns Tensor[B,H,W] = 1/n sum_i reduce(|d S / d x|(x + eps_i)).
    """
    if n_samples < 1:
        raise InvalidInputError(f"n_samples must be >= 1, got {n_samples}")
    b = images.shape[0]
    sigma = noise_level * (images.flatten(1).amax(1) - images.flatten(1).amin(1))
    g = generator(seed)
    noise = torch.randn((n_samples, *images.shape), generator=g, dtype=images.dtype).to(images.device)
    heat = torch.zeros(images.shape[0], *images.shape[2:], device=images.device, dtype=torch.float64)
    jobs_img = torch.arange(b).repeat(n_samples)
    jobs_sample = torch.arange(n_samples).repeat_interleave(b)
    for sl in batch_slices(len(jobs_img), batch_size):
        idx, smp = jobs_img[sl].to(images.device), jobs_sample[sl].to(images.device)
        x = images[idx] + sigma[idx].view(-1, 1, 1, 1) * noise[smp, idx]
        m = reduce_channels(input_gradients(model, x, targets[idx], score, batch_size), reduce)
        heat.index_add_(0, idx, m.double())
    return (heat / n_samples).float()
