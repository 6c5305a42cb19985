"""The method contract, its registry and the shared helpers.

Every method is a function ``fn(model, images[B,3,H,W], targets[B], *, **params)
-> heatmaps[B,H,W]`` registered with :func:`register_method`. :func:`explain` wraps
each call with the input checks and :func:`~saliencybench.modelutil.model_guard`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, NotApplicableError
from ..modelutil import model_guard, num_classes
from ..notes import add_note, collect_notes, progress_to, report_progress  # noqa: F401 (part of this module's API)
from ..registry import Constraint, Registry, check_params, keyword_defaults
from ..validation import all_finite, check_images, check_model_inputs, check_targets

MethodFn = Callable[..., torch.Tensor]

@dataclass(frozen=True)
class Applicability:
    """Whether a method's defining rule holds on a model, and why not."""

    applicable: bool
    reason: str = ""


@dataclass
class MethodSpec:
    """A registered explanation method: callable plus metadata.

    ``scaled``: ``(H, W) -> {param: value}`` for defaults that depend on the image
    size (declared ``None`` in the signature, e.g. occlusion's window); the resolved
    value is what a run records. ``constraints``: ranges or choices per parameter,
    checked with the config before any work starts (:func:`~saliencybench.registry.check_params`).
    ``signed``: whether the default output can be negative. ``finalise``: turns the
    resolved parameters into concrete values (e.g. ``sign``/``reduce`` left ``None`` into
    the pair they mean) and raises on contradictory combinations, so what a run records
    is what ran.
    """

    name: str
    fn: MethodFn
    paper: str
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    needs_grad: bool = True
    applicability: Callable[[nn.Module], Applicability] | None = None
    summary: str = ""
    pass_needs: Callable[[dict[str, Any]], Any] | None = None
    derive: Callable[..., torch.Tensor] | None = None
    scaled: Callable[[int, int], dict[str, Any]] | None = None
    constraints: dict[str, Constraint] = field(default_factory=dict)
    signed: bool = False
    finalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def check(self, model: nn.Module) -> Applicability:
        """Tell whether the method applies to ``model`` (it may still run when not)."""
        return self.applicability(model) if self.applicability else Applicability(True)

    def check_params(self, params: dict[str, Any]) -> None:
        """Names, types and ranges of ``params``; raises :class:`InvalidInputError` naming the problem."""
        check_params("method", self.name, params, self.fn, self.params, self.constraints)

    def resolve_params(self, params: dict[str, Any], size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The method's defaults, then the image-size defaults for ``size`` (H, W), then ``params``,
        key by key; unknown names and wrong types are an error."""
        self.check_params(params)
        scaled = {}
        if self.scaled is not None and size is not None:  # ``scaled(h, w)`` or ``scaled(h, w, params)``
            takes_params = self.scaled.__code__.co_argcount >= 3 if hasattr(self.scaled, "__code__") else False
            scaled = self.scaled(*size, {**self.params, **params}) if takes_params else self.scaled(*size)
        resolved = {**self.params, **scaled}
        for k, v in params.items():
            if not (v is None and k in scaled):  # None asks for the image-size default
                resolved[k] = v
        return self.finalise(resolved) if self.finalise is not None else resolved


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    *,
    paper: str,
    family: str,
    needs_grad: bool = True,
    applicability: Callable[[nn.Module], Applicability] | None = None,
    scaled: Callable[[int, int], dict[str, Any]] | None = None,
    constraints: dict[str, Constraint] | None = None,
    signed: bool = False,
    finalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn`` as method ``name`` with its paper and family (see :class:`MethodSpec`)."""

    def deco(fn: MethodFn) -> MethodFn:
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        METHODS.add(
            name,
            MethodSpec(name, fn, paper, family, keyword_defaults(fn), needs_grad, applicability, summary,
                       scaled=scaled, constraints=dict(constraints or {}), signed=signed, finalise=finalise),
        )
        return fn

    return deco


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.names()


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (unknown names list the valid ones).
    ``captum:<Class>`` and ``gradcam:<Class>`` register the peer's class on first use
    (:mod:`saliencybench.methods.peers`)."""
    if name not in METHODS and isinstance(name, str) and name.split(":", 1)[0] in ("captum", "gradcam"):
        from .peers import register_peer

        return register_peer(name)
    return METHODS.get(name)


def explain(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor | list[int] | int | None, method: str = "gradcam", *,
    shared: Any = None, **params: Any
) -> torch.Tensor:
    """Explain ``model``'s target scores on ``images`` with a registered method.

    images: float Tensor[B,3,H,W], already normalised for the model.
    targets: LongTensor[B] of class indices (an int applies to every image; ``None``:
    the model's top-1 prediction for each image).
    Returns float32 Tensor[B,H,W] at the input resolution on ``images.device``,
    not normalised. The model is left exactly as it was found.
    ``shared``: a :class:`~saliencybench.methods.shared.SharedPasses` built on these
    images and targets; methods that can derive their heatmap from its passes do
    (same result, no pass of their own).
    """
    spec = get_method(method)
    images = check_images(images)
    check_model_inputs(model, images)
    if targets is None:  # the model's top-1 predictions, as Captum and pytorch-grad-cam allow
        with model_guard(model), torch.no_grad():
            targets = model(images).argmax(1)
    targets = check_targets(targets, images.shape[0], num_classes(model)).to(images.device)
    resolved = spec.resolve_params(params, tuple(images.shape[-2:]))
    with model_guard(model):
        if shared is not None and spec.derive is not None:
            with torch.enable_grad():
                heat = spec.derive(shared(spec.pass_needs(resolved)), model, images, targets, resolved)
        else:
            with torch.enable_grad() if spec.needs_grad else torch.inference_mode():
                heat = spec.fn(model, images, targets, **resolved)
    heat = heat.detach().float()
    b, _, h, w = images.shape
    if tuple(heat.shape) != (b, h, w):
        raise RuntimeError(f"method {method!r} returned shape {tuple(heat.shape)}, expected {(b, h, w)}")
    if not all_finite(heat):
        bad = (~torch.isfinite(heat)).flatten(1).any(1)
        raise InvalidInputError(
            f"method {method!r} produced NaN or infinite heatmaps for samples "
            f"{bad.nonzero().flatten().tolist()}; check the inputs and the model's outputs for overflow"
        )
    return heat.clone()


# ---- helpers shared by method families -------------------------------------------------

REDUCTIONS = ("max_abs", "sum_abs", "l2", "sum")


def reduce_channels(attributions: torch.Tensor, reduce: str = "max_abs") -> torch.Tensor:
    """Reduce input attributions Tensor[B,3,H,W] to a heatmap Tensor[B,H,W].

    ``max_abs``: max over channels of the absolute value (Simonyan et al. 2014);
    ``sum_abs``, ``l2`` (Euclidean norm over channels) and ``sum`` (signed).
    """
    if reduce == "max_abs":
        return attributions.abs().amax(1)
    if reduce == "sum_abs":
        return attributions.abs().sum(1)
    if reduce == "l2":
        return attributions.norm(dim=1)
    if reduce == "sum":
        return attributions.sum(1)
    raise InvalidInputError(f"unknown channel reduction {reduce!r}; use one of {REDUCTIONS}")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample Tensor[B,h,w] to Tensor[B,H,W] (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def batch_slices(total: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``range(total)`` of at most ``batch_size`` items."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]


def generator(seed: int) -> torch.Generator:
    """A seeded ``torch.Generator`` on the CPU (draws are moved to the images' device by the caller)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def warn_not_applicable(method: str, reason: str, category: type[Warning]) -> None:
    """Warn that ``method`` ran outside its defining conditions."""
    warnings.warn(f"{method}: {reason}", category, stacklevel=4)


__all__ = [
    "Applicability", "MethodSpec", "METHODS", "NotApplicableError", "register_method", "list_methods",
    "get_method", "explain", "reduce_channels", "upsample", "batch_slices", "generator",
]
