"""Layer outputs as feature maps A[B,K,h,w] (the CAM methods' input) and the GAP + linear head check.
"""

from __future__ import annotations

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotApplicableError
from .core import GuardState, get_module, has_feature_head_split

# ---- layer outputs as feature maps -------------------------------------------------------
#
# CAM methods need a layer's output as a map A[B,K,h,w]. CNNs give one; a ViT gives tokens
# [B,N,C] (class, distillation and register tokens first), Swin gives NHWC maps. How to turn
# a timm model's layer output into a map is model knowledge that lives in
# ``saliencybench.methods.tokens``, which installs it here with :func:`use_layer_maps` when
# it is imported (saliencybench's own import does so). Without it every layer is read as
# today: 4-D outputs as NCHW, anything else refused. The dependency points one way: tokens
# imports this module, never the reverse.

FEATURES = "forward_features"  # the layer name meaning the output of timm's ``forward_features``


@dataclass(frozen=True)
class LayerMap:
    """How one captured layer output ``raw`` becomes a feature map A[B,K,h,w] and back.

    ``to_map(raw) -> A``; ``from_map(A, raw, detach) -> raw'``, the tensor of ``raw``'s
    shape the forward pass continues with (built from ``A``; parts of ``raw`` that ``A``
    leaves out, such as class tokens, are taken from ``raw``, detached when ``detach``).
    ``note``: how the map was made (empty for plain NCHW maps).
    """

    to_map: Callable[[torch.Tensor], torch.Tensor]
    from_map: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
    note: str = ""


def _plain_layer_map(model: nn.Module, layer: str, module: nn.Module | None, out: object,
                     size: tuple[int, int]) -> LayerMap:
    """Today's reading: a 4-D output is an NCHW map; anything else is refused."""
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise NotApplicableError(
            f"layer {layer!r} outputs {type(out).__name__} "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; a 4-D feature map "
            "[B,K,h,w] is needed: choose a convolutional layer"
        )
    return LayerMap(lambda raw: raw, lambda a, raw, detach: a)


@dataclass
class LayerMaps:
    """The model knowledge :func:`forward_with_layer` uses: ``default_layer(model)`` (a module
    name, or None for ``forward_features``) and ``layer_map(model, layer, module, out, size)``
    (a :class:`LayerMap` for output ``out`` of ``module`` called ``layer`` at input ``size``
    (H, W); ``module`` None for ``forward_features``; raises :class:`NotApplicableError`)."""

    default_layer: Callable[[nn.Module], str | None] = lambda model: None
    layer_map: Callable[[nn.Module, str, nn.Module | None, object, tuple[int, int]], LayerMap] = _plain_layer_map


_LAYER_MAPS = [LayerMaps()]


def use_layer_maps(maps: LayerMaps) -> LayerMaps:
    """Install ``maps`` for :func:`forward_with_layer`; returns the ones it replaces."""
    old, _LAYER_MAPS[0] = _LAYER_MAPS[0], maps
    return old


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """The layer ``forward_with_layer`` captures: ``layer``, or for None the model's default
    (:data:`FEATURES`, the output of ``forward_features``, unless the installed layer maps
    name another, such as a ViT's ``blocks.<last>.norm1``)."""
    return layer if layer is not None else (_LAYER_MAPS[0].default_layer(model) or FEATURES)


def forward_with_layer(
    model: nn.Module, images: torch.Tensor, layer: str | None, state: GuardState, grad: bool = False,
    through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``images`` and capture one layer's output as a map: ``(activations[B,K,h,w], logits)``.

    ``layer``: a module name, :data:`FEATURES` for the output of timm's ``forward_features``,
    or None for the model's default (:func:`resolve_layer`: ``forward_features`` for CNNs).
    A named module's output is captured by a forward hook registered on ``state`` (so it
    is removed by :func:`model_guard`). Outputs that are not NCHW maps (ViT tokens, Swin's
    NHWC maps) are turned into A[B,K,h,w] by the installed :class:`LayerMaps`, and the
    forward pass continues from A. With ``grad=True`` the captured activation is a leaf
    that requires grad and the rest of the forward runs from it, so
    ``autograd.grad(logits, activations)`` works even when the model's parameters and
    input are frozen, and the backward pass stops at that layer. With ``through=True``
    the captured map stays inside the graph instead, so one backward pass gives the
    gradients with respect to both the layer and an input that requires grad.
    """
    maps = _LAYER_MAPS[0]
    layer = resolve_layer(model, layer)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    leaf = grad and not through
    if layer == FEATURES:
        if not has_feature_head_split(model):
            raise NotApplicableError(
                f"{type(model).__name__} has no forward_features/forward_head (timm) split, so the "
                "default layer cannot be found; pass layer='<module name>'"
            )
        feats = model.forward_features(images)
        lm = maps.layer_map(model, FEATURES, None, feats, size)
        a = lm.to_map(feats)
        if leaf:
            a = a.detach().requires_grad_(True)
        return a, model.forward_head(lm.from_map(a, feats, leaf))
    module = get_module(model, layer)
    captured: list[torch.Tensor] = []

    def hook(m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        lm = maps.layer_map(model, layer, m, out, size)
        a = lm.to_map(out)
        if leaf:
            a = a.detach().requires_grad_(True)
        captured.append(a)
        # Later in-place ops (ReLU(inplace=True)) must not overwrite the captured map.
        return lm.from_map(a, out, leaf).clone()

    handle = module.register_forward_hook(hook)
    state.handles.append(handle)
    try:
        logits = model(images)
    finally:
        handle.remove()
    if not captured:
        raise NotApplicableError(f"layer {layer!r} was not called in the forward pass; choose another layer")
    return captured[-1], logits


def _head_difference(model: nn.Module) -> str:
    """What in a timm head stands between global average pooling and the classifier, in words."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str) and pool in ("token", "map"):
        return (f"{type(model).__name__}'s head reads the class token (global_pool={pool!r}), not an average of "
                "the patch tokens")
    for where, norm in (("fc_norm", getattr(model, "fc_norm", None)),
                        ("head.norm", getattr(getattr(model, "head", None), "norm", None))):
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
            return (f"{type(model).__name__}'s head normalises the pooled features ({where} is "
                    f"{type(norm).__name__}) before the classifier, so the logits are not linear in the "
                    "pooled map (ConvNeXt, MaxViT and CoAtNet heads do this)")
    return (f"{type(model).__name__}'s head computes something else (another pooling or extra layers between "
            "pooling and the classifier)")


def gap_linear_head(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> nn.Linear:
    """Return the linear classifier if ``logits == Linear(GAP(feats))``; else raise.

    ``feats``: the output of ``forward_features`` as a map [B,K,h,w] (as
    :func:`forward_with_layer` gives it: a ViT's patch tokens without the prefix tokens,
    Swin's NHWC map as NCHW). The check is structural (``get_classifier()`` is one
    ``nn.Linear`` over the feature channels) and numerical (the head's output equals that
    linear layer on the spatial mean of ``feats``), so any head with extra layers (VGG's
    conv-MLP, MobileNetV3's conv head after pooling, max pooling, a LayerNorm after pooling
    as in ConvNeXt, a class-token readout as in ViT) is refused. Swin's head (average pool
    of the final normalised NHWC map, then one linear layer) passes.
    """
    name = type(model).__name__
    get_classifier = getattr(model, "get_classifier", None)
    fc = get_classifier() if callable(get_classifier) else None
    if isinstance(fc, tuple):
        raise NotApplicableError(
            f"CAM needs a head of global average pooling followed by one linear classifier; {name} has "
            f"{len(fc)} classifiers (DeiT's class- and distillation-token heads, averaged). Use gradcam instead"
        )
    if not isinstance(fc, nn.Linear):
        raise NotApplicableError(
            f"CAM needs a head of global average pooling followed by one linear classifier; "
            f"{name}'s classifier is {type(fc).__name__}. Use gradcam, which needs no such structure"
        )
    if feats.ndim != 4 or fc.in_features != feats.shape[1]:
        raise NotApplicableError(
            f"CAM needs the classifier to act directly on the pooled final feature maps; {name}'s "
            f"classifier takes {fc.in_features} inputs but forward_features gives "
            f"{tuple(feats.shape[1:])} (there are layers between pooling and the classifier, as in "
            "VGG's MLP or MobileNetV3's conv head). Use gradcam instead"
        )
    expected = F.linear(feats.mean((2, 3)), fc.weight, fc.bias)
    if not torch.allclose(expected, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()) + 1e-6):
        raise NotApplicableError(
            f"CAM needs logits = Linear(global average pool(features)); {_head_difference(model)}. "
            "Use gradcam instead"
        )
    return fc
