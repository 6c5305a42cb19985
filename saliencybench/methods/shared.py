"""Forward and backward passes shared by methods on one batch of images.

Saliency needs dS/dx, Grad-CAM and Grad-CAM++ need a layer's activations A and
dS/dA, CAM needs the final activations and the logits, Guided Grad-CAM needs
Grad-CAM's map. One forward pass that captures A, and one backward pass from
the target scores S to both x and A, serve them all. A method declares what it
needs from a pass with :func:`derives_from_pass`; :class:`SharedPasses` merges the
needs of several methods into as few passes as possible and computes each once.
:func:`explain_many` (and the runner) use it; every method still runs alone
through :func:`~saliencybench.methods.base.explain` with identical results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..modelutil import (GuardState, forward_with_layer, has_feature_head_split, model_guard, num_classes,
                         target_score)
from ..validation import check_images, check_targets
from .base import batch_slices, explain, get_method


@dataclass(frozen=True)
class PassNeeds:
    """What a method needs from a shared pass.

    ``layer``: the captured layer (None: ``forward_features``' output), used when
    ``acts``; ``score``: the differentiated target score, used when
    ``input_grads`` or ``layer_grads``.
    """

    layer: str | None = None
    score: str = "logit"
    acts: bool = False
    layer_grads: bool = False
    input_grads: bool = False

    @property
    def grads(self) -> bool:
        return self.layer_grads or self.input_grads

    def merge(self, other: PassNeeds) -> PassNeeds:
        return replace(self, acts=self.acts or other.acts, layer_grads=self.layer_grads or other.layer_grads,
                       input_grads=self.input_grads or other.input_grads)


@dataclass
class GradientPass:
    """One pass over a batch: logits[B,C]; acts and layer_grads [B,K,h,w]; input_grads [B,3,H,W] (or None)."""

    logits: torch.Tensor
    acts: torch.Tensor | None = None
    layer_grads: torch.Tensor | None = None
    input_grads: torch.Tensor | None = None


def gradient_pass(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, needs: PassNeeds, batch_size: int = 64,
) -> GradientPass:
    """Forward ``images`` once (per ``batch_size`` slice) and backward once, as ``needs`` asks.

    The model must already be guarded (:func:`~saliencybench.modelutil.model_guard`).
    Returns detached tensors; see :class:`GradientPass` for shapes.
    """
    logits, acts, lgrads, igrads = [], [], [], []
    with torch.inference_mode(False), torch.set_grad_enabled(needs.grads):
        for sl in batch_slices(images.shape[0], batch_size):
            x = images[sl].clone().requires_grad_(needs.input_grads)
            state = GuardState()
            try:
                if needs.acts:
                    a, out = forward_with_layer(model, x, needs.layer, state, grad=needs.layer_grads,
                                                through=needs.input_grads)
                else:
                    a, out = None, model(x)
            finally:
                for h in state.handles:
                    h.remove()
            if needs.grads:
                wrt = ([x] if needs.input_grads else []) + ([a] if needs.layer_grads else [])
                grads = list(torch.autograd.grad(target_score(out, targets[sl], needs.score).sum(), wrt))
                if needs.input_grads:
                    igrads.append(grads.pop(0).detach())
                if needs.layer_grads:
                    lgrads.append(grads.pop(0).detach())
            if a is not None:
                acts.append(a.detach())
            logits.append(out.detach())
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return GradientPass(torch.cat(logits), cat(acts), cat(lgrads), cat(igrads))


NeedsFn = Callable[[dict[str, Any]], PassNeeds]
DeriveFn = Callable[..., torch.Tensor]


def derives_from_pass(method: str, needs: NeedsFn) -> Callable[[DeriveFn], DeriveFn]:
    """Decorator: ``fn(gp, model, images, targets, params) -> Tensor[B,H,W]`` computes
    registered ``method`` from a :class:`GradientPass` ``gp`` holding ``needs(params)``.

    ``params`` are the method's resolved parameters; the result must equal the
    method's own function on the same inputs.
    """

    def deco(fn: DeriveFn) -> DeriveFn:
        spec = get_method(method)
        spec.pass_needs, spec.derive = needs, fn
        return fn

    return deco


class SharedPasses:
    """The passes several methods need on one batch, merged, each computed once on first use.

    ``requests``: the :class:`PassNeeds` of every method that will ask. Requests
    that differ only in what they keep from a pass (activations, input or layer
    gradients) are merged: same layer and score for gradients; activations alone
    join any pass of the same layer; input gradients alone join any pass with the
    same score.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, requests: list[PassNeeds],
                 batch_size: int = 64) -> None:
        self.model, self.images, self.targets, self.batch_size = model, images, targets, batch_size
        self.plan: list[PassNeeds] = []
        if not has_feature_head_split(model):  # those requests fail alone; they must not fail the others' pass
            requests = [r for r in requests if not (r.acts and r.layer is None)]
        for r in sorted(requests, key=lambda r: (not (r.acts and r.grads), not r.acts)):
            self._add(r)
        self._done: dict[int, GradientPass] = {}
        self.passes_computed = 0

    def _slot(self, r: PassNeeds) -> int | None:
        for i, p in enumerate(self.plan):
            same_layer = not (r.acts and p.acts) or p.layer == r.layer
            same_score = not (r.grads and p.grads) or p.score == r.score
            if same_layer and same_score:
                return i
        return None

    def _add(self, r: PassNeeds) -> int:
        i = self._slot(r)
        if i is None:
            self.plan.append(r)
            return len(self.plan) - 1
        p = self.plan[i]
        merged = p.merge(r)
        self.plan[i] = replace(merged, layer=p.layer if p.acts else r.layer, score=p.score if p.grads else r.score)
        return i

    def __call__(self, needs: PassNeeds) -> GradientPass:
        """The pass satisfying ``needs`` (computed now if it is the first request)."""
        i = self._slot(needs)
        if i is None or self.plan[i].merge(needs) != self.plan[i]:
            i = self._add(needs)
            self._done.pop(i, None)
        if i not in self._done:
            with model_guard(self.model):
                self._done[i] = gradient_pass(self.model, self.images, self.targets, self.plan[i], self.batch_size)
            self.passes_computed += 1
        return self._done[i]


def pass_requests(methods: dict[str, dict[str, Any]]) -> list[PassNeeds]:
    """The pass needs of those ``methods`` (name -> params) that can share passes."""
    out = []
    for name, params in methods.items():
        spec = get_method(name)
        if spec.pass_needs is not None:
            out.append(spec.pass_needs(spec.resolve_params(params)))
    return out


def explain_many(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor | list[int] | int,
    methods: list[str] | dict[str, dict[str, Any]], params: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Several methods on one batch, sharing forward and backward passes where they can.

    images Tensor[B,3,H,W] (normalised), targets LongTensor[B]; ``methods`` are
    names (with ``params[name]`` for their parameters) or a name -> params dict.
    Returns {name: Tensor[B,H,W]}, each equal to ``explain(model, images,
    targets, name, **params)``. Saliency, CAM, Grad-CAM, Grad-CAM++ and Guided
    Grad-CAM on one layer and score cost one forward and one backward pass
    together (Guided Grad-CAM adds its own guided backward).
    """
    wanted = methods if isinstance(methods, dict) else {m: (params or {}).get(m, {}) for m in methods}
    images = check_images(images)
    targets = check_targets(targets, images.shape[0], num_classes(model)).to(images.device)
    shared = SharedPasses(model, images, targets, pass_requests(wanted), batch_size)
    return {name: explain(model, images, targets, name, shared=shared, **p) for name, p in wanted.items()}
