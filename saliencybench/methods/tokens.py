"""Token-to-map geometry: any timm layer output as a feature map A[B,K,h,w], and the default CAM layer.

CAM methods weight the K channels of a spatial map. CNN layers give NCHW maps; transformer
layers give other layouts, and this module tells which from the model and the actual input,
never from a hard-coded size:

- tokens [B,N,C] (ViT, DeiT; timm models with ``num_prefix_tokens``): the first
  ``num_prefix_tokens`` tokens (class, distillation, registers) are dropped and the rest
  reshaped to the patch grid, which the patch embedding computes for the input size
  (``patch_embed.dynamic_feat_size``: any size the model accepts, ``img_size=``,
  ``dynamic_img_size``, ``dynamic_img_pad``, a convolutional stem's ``HybridEmbed``). Token
  tensors without prefix tokens whose count is not the patch grid (Swin's flattened tokens
  inside a block) get the grid of the stride that gives that count at this input size.
- 4-D maps: NCHW or NHWC. The producing module decides when its type does (convolutions,
  batch norms and ``*2d`` norms write NCHW; ``nn.Linear`` and last-dimension layer norms
  write NHWC); otherwise the reading whose spatial dimensions are the grid of some stride
  at this input size, ceil or floor (``ceil(H/s), ceil(W/s)``); when both or neither fit,
  the model's ``output_fmt`` (timm sets ``"NHWC"`` on Swin), else NCHW, torch's convention.

Default layer (``layer=None``) per family, told by structure, not by class name:

  family                 detected by                                default CAM layer
  ---------------------  -----------------------------------------  ------------------------------------
  ViT, DeiT, registers   ``num_prefix_tokens`` and ``blocks[-1]``   output of ``blocks[-1].norm1``
                         with a ``norm1``                           (tokens, prefix tokens dropped)
  Swin                   (none of the above)                        ``forward_features`` output (NHWC)
  ConvNeXt               (none of the above)                        ``forward_features`` output (NCHW)
  MaxViT, CoAtNet        (none of the above)                        ``forward_features`` output (NCHW)
  CNNs                   (none of the above)                        ``forward_features`` output (NCHW)

Why:

- ViT, DeiT: with a class-token head (``global_pool="token"``) the logits read only token 0
  of the last block's output, after the final LayerNorm, which acts on each token alone, so
  dS/d(patch tokens) there is exactly zero and Grad-CAM at ``forward_features`` (or at
  ``blocks[-1]``) is an all-zero map; DeiT's two heads read tokens 0 and 1 only, the same.
  ``tests/test_transformers.py`` checks it: exact zeros there, no zero at
  ``blocks[-1].norm1``. The normalised input of the last block's attention is the last
  tensor whose patch tokens still reach the class token (through that attention). It is
  what pytorch-grad-cam's ViT/DeiT examples hook (a forward hook on ``norm1`` sees its
  output; the un-normalised input of ``norm1``, the output of ``blocks[-2]``, is a different
  tensor: pass ``layer="blocks.<L-2>"`` for it).
- Swin: the final LayerNorm's NHWC map, which the head averages and feeds to one linear
  layer: the CNN situation exactly (CAM applies, every position gets a gradient).
  pytorch-grad-cam's Swin example hooks the last block's ``norm2`` (the input of its MLP,
  flattened tokens here): ``layer="layers.3.blocks.<last>.norm2"`` gives that.
- ConvNeXt: the last stage's map; its head pools first, then normalises.
- MaxViT, CoAtNet: their stages end in NCHW maps (``*_rw`` variants normalise them inside
  ``forward_features``).
- CNNs: the last feature map, as before.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import NotApplicableError
from ..modelutil import FEATURES, LayerMap, LayerMaps, resolve_layer, use_layer_maps
from .base import add_note

# Module types whose 4-D outputs are NCHW / NHWC by construction.
_NCHW_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_LAST_DIM_NORMS = {"LayerNorm", "RmsNorm", "SimpleNorm", "LayerNormFp32"}


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens (class, distillation, registers): timm's ``num_prefix_tokens``, else 0."""
    n = getattr(model, "num_prefix_tokens", 0)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def patch_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid (h, w) the model's patch embedding makes of an input of ``size`` (H, W), or None."""
    fn = getattr(getattr(model, "patch_embed", None), "dynamic_feat_size", None)
    if not callable(fn):
        return None
    h, w = fn((int(size[0]), int(size[1])))
    return int(h), int(w)


@lru_cache(maxsize=256)
def stride_grids(size: tuple[int, int]) -> frozenset[tuple[int, int]]:
    """Every grid (ceil(H/s), ceil(W/s)) and (floor(H/s), floor(W/s)) of an integer stride s >= 1."""
    h, w = size
    out = set()
    for s in range(1, max(h, w) + 1):
        out.add((math.ceil(h / s), math.ceil(w / s)))
        if h // s and w // s:
            out.add((h // s, w // s))
    return frozenset(out)


def grid_for_tokens(n: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The stride grid (h, w) of input ``size`` with h * w == n, or None. For one stride both
    sides shrink together, so at most one grid has a given count."""
    found = {g for g in stride_grids(tuple(size)) if g[0] * g[1] == n}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class TokenLayout:
    """How a layer output is laid out: ``kind`` ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (``token_axis``
    1: [B,N,C], timm's layout; 2: [B,C,N]), its ``grid`` (h, w), the ``prefix`` tokens dropped and
    the ``reason`` this was told."""

    kind: str
    grid: tuple[int, int]
    prefix: int = 0
    token_axis: int = 1
    reason: str = ""

    def describe(self, layer: str, shape: tuple[int, ...]) -> str:
        """One line for a row note: the layer, its output shape, the map shape and why (batch as B)."""
        k = shape[-1] if self.kind == "nhwc" or (self.kind == "tokens" and self.token_axis == 1) else shape[1]
        what = {"nhwc": "NHWC map", "tokens": "tokens", "nchw": "NCHW map"}[self.kind]
        dims = ",".join(str(d) for d in shape[1:])
        return f"layer {layer}: {what} [B,{dims}] read as map [B,{k},{self.grid[0]},{self.grid[1]}] ({self.reason})"


def _module_hint(module: nn.Module | None) -> str | None:
    """``"nchw"``/``"nhwc"`` when the module's type fixes the layout of its 4-D output."""
    if module is None:
        return None
    name = type(module).__name__
    if isinstance(module, _NCHW_TYPES) or name.endswith("2d"):
        return "nchw"
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or name in _LAST_DIM_NORMS:
        return "nhwc"
    return None


def token_layout(model: nn.Module, layer: str, module: nn.Module | None, shape: tuple[int, ...],
                 size: tuple[int, int]) -> TokenLayout:
    """The :class:`TokenLayout` of output ``shape`` of ``module`` (named ``layer``; None for
    ``forward_features``) for an input of ``size`` (H, W). Raises :class:`NotApplicableError`
    for outputs that are no spatial map (pooled vectors, token counts that fit no grid)."""
    size = (int(size[0]), int(size[1]))
    grids = stride_grids(size)
    if len(shape) == 4:
        nchw, nhwc = tuple(shape[2:]) in grids, tuple(shape[1:3]) in grids
        hint = _module_hint(module)
        if hint is not None:
            kind, why = hint, f"{type(module).__name__} output"
        elif nchw != nhwc:
            kind = "nchw" if nchw else "nhwc"
            why = f"only this reading is a stride grid of the {size[0]}x{size[1]} input"
        else:
            kind = "nhwc" if getattr(model, "output_fmt", None) == "NHWC" else "nchw"
            why = f"the model's output_fmt {kind.upper()}" if kind == "nhwc" else "torch's NCHW convention"
        grid = tuple(shape[2:]) if kind == "nchw" else tuple(shape[1:3])
        return TokenLayout(kind, grid, reason=why)  # type: ignore[arg-type]
    if len(shape) == 3:
        p, pg = prefix_tokens(model), patch_grid(model, size)
        for axis in (1, 2):
            n = shape[axis]
            if pg is not None and p and n == p + pg[0] * pg[1]:
                return TokenLayout("tokens", pg, p, axis, f"patch grid {pg[0]}x{pg[1]} of patch_embed at "
                                   f"{size[0]}x{size[1]}, {p} prefix token{'s' if p > 1 else ''} dropped")
            if pg is not None and n == pg[0] * pg[1]:
                return TokenLayout("tokens", pg, 0, axis, f"patch grid {pg[0]}x{pg[1]} of patch_embed at "
                                   f"{size[0]}x{size[1]}")
            g = grid_for_tokens(n, size)
            if g is not None:
                return TokenLayout("tokens", g, 0, axis, f"the only stride grid of {n} tokens at {size[0]}x{size[1]}")
        raise NotApplicableError(
            f"layer {layer!r} outputs {list(shape)}, whose token count fits no grid of the {size[0]}x{size[1]} "
            f"input (patch grid {pg}, {p} prefix tokens); CAM methods need a spatial map: choose a layer inside "
            "the transformer blocks, such as a block's norm1"
        )
    raise NotApplicableError(
        f"layer {layer!r} outputs a {len(shape)}-D tensor {list(shape)}; CAM methods need a spatial map, a 4-D "
        "map (NCHW or NHWC) or tokens [B,N,C]: choose a layer before the global pooling"
    )


def to_feature_map(raw: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """A layer output in ``layout`` as a map Tensor[B,K,h,w] (prefix tokens dropped)."""
    h, w = layout.grid
    if layout.kind == "nchw":
        return raw
    if layout.kind == "nhwc":
        return raw.permute(0, 3, 1, 2)
    p = layout.prefix
    if layout.token_axis == 1:
        return raw[:, p:].transpose(1, 2).reshape(raw.shape[0], raw.shape[2], h, w)
    return raw[:, :, p:].reshape(raw.shape[0], raw.shape[1], h, w)


def from_feature_map(a: torch.Tensor, raw: torch.Tensor, layout: TokenLayout, detach: bool = False) -> torch.Tensor:
    """The inverse of :func:`to_feature_map`: map ``a`` [B,K,h,w] back in ``raw``'s layout, with ``raw``'s
    prefix tokens in front (detached when ``detach``)."""
    if layout.kind == "nchw":
        return a
    if layout.kind == "nhwc":
        return a.permute(0, 2, 3, 1)
    p, axis = layout.prefix, layout.token_axis
    body = a.flatten(2).transpose(1, 2) if axis == 1 else a.flatten(2)
    if not p:
        return body
    rest = raw[:, :p] if axis == 1 else raw[:, :, :p]
    return torch.cat([rest.detach() if detach else rest, body.to(rest.dtype)], axis)


def feature_map(model: nn.Module, raw: torch.Tensor, size: tuple[int, int], layer: str = FEATURES,
                module: nn.Module | None = None) -> tuple[torch.Tensor, TokenLayout]:
    """Any captured output ``raw`` of ``module`` (named ``layer``) at input ``size`` (H, W) as a map
    A[B,K,h,w], with the :class:`TokenLayout` that says how (``layout.describe`` for notes)."""
    layout = token_layout(model, layer, module, tuple(raw.shape), size)
    return to_feature_map(raw, layout), layout


def default_layer(model: nn.Module) -> str | None:
    """The default CAM layer's name (see the module's table), or None for ``forward_features``' output."""
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "num_prefix_tokens") or not isinstance(blocks, (nn.Sequential, nn.ModuleList)) \
            or not len(blocks) or not isinstance(getattr(blocks[-1], "norm1", None), nn.Module):
        return None
    target = blocks[-1].norm1
    return next(name for name, m in model.named_modules() if m is target)


def probe_size(model: nn.Module, cap: int = 128) -> tuple[int, int]:
    """An input size (H, W) the model accepts: the ``img_size`` it was built with (its patch
    embedding's: ViT, Swin; its own: MaxViT, CoAtNet), else its pretrained config's, at most ``cap``."""
    for img in (getattr(getattr(model, "patch_embed", None), "img_size", None), getattr(model, "img_size", None)):
        if isinstance(img, int) and not isinstance(img, bool):
            return img, img
        if isinstance(img, (tuple, list)) and len(img) == 2:
            return int(img[0]), int(img[1])
    size = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 64, 64))[-1])
    return min(size, cap), min(size, cap)


# model -> {(layer, input size): note} of the maps read so far, so that methods that derive their
# heatmap from a shared pass (which read the layer once, for the first method) repeat the note.
_READ_NOTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, tuple[int, int]], str]] = \
    weakref.WeakKeyDictionary()


def repeat_layer_note(model: nn.Module, layer: str | None, size: tuple[int, int]) -> None:
    """Leave again the note of how ``layer`` (None: the default) was read at input ``size`` (H, W),
    if it was read as something other than an NCHW map."""
    key = (resolve_layer(model, layer), (int(size[0]), int(size[1])))
    note = _READ_NOTES.get(model, {}).get(key)
    if note:
        add_note(note)


def _layer_map(model: nn.Module, layer: str, module: nn.Module | None, out: object,
               size: tuple[int, int]) -> LayerMap:
    if not isinstance(out, torch.Tensor):
        raise NotApplicableError(f"layer {layer!r} outputs {type(out).__name__}, not a tensor; choose another layer")
    layout = token_layout(model, layer, module, tuple(out.shape), size)
    note = "" if layout.kind == "nchw" else layout.describe(layer, tuple(out.shape))
    if note:
        add_note(note)
        _READ_NOTES.setdefault(model, {})[(layer, (int(size[0]), int(size[1])))] = note
    return LayerMap(lambda raw: to_feature_map(raw, layout),
                    lambda a, raw, detach: from_feature_map(a, raw, layout, detach), note)


use_layer_maps(LayerMaps(default_layer=default_layer, layer_map=_layer_map))

__all__ = ["TokenLayout", "default_layer", "feature_map", "from_feature_map", "grid_for_tokens", "patch_grid",
           "prefix_tokens", "probe_size", "repeat_layer_note", "stride_grids", "to_feature_map", "token_layout"]
