"""Theoretical receptive fields of a layer's units, from the strides, kernels, paddings and
dilations of the operations between the input and that layer.

Per axis, a unit at index ``i`` of a feature map sees input pixels
``start + i * stride ... start + i * stride + size - 1`` (Araujo, Norris, Sim,
"Computing receptive fields of convolutional neural networks", Distill 2019). A
convolution or pooling with kernel ``k``, stride ``s``, padding ``p`` and dilation
``d`` applied to a map with field ``(size, stride, start)`` gives

    size'   = size + (d (k - 1)) * stride
    stride' = stride * s
    start'  = start - p * stride

Order. Registration order is not forward order in general (a ResNet block registers
its ``downsample`` shortcut after the main branch, but the two run in parallel), so
the field is not computed by walking ``named_modules()``. Instead one forward pass of
a zero image runs under a :class:`torch.overrides.TorchFunctionMode` that sees every
torch operation in the order it executes and attaches a field to every tensor it
produces: ``conv2d``, ``max_pool2d`` and ``avg_pool2d`` apply the rule above,
``pad`` shifts ``start``, and any other operation whose output keeps the input's
spatial size (norms, activations, residual additions, concatenations, layout
permutes) takes the union of its inputs' fields, so a residual block's field is that
of its wider branch. Stated assumptions:

- the spatial axes are a tensor's two dimensions whose sizes equal the map's
  height and width (the last two in NCHW, also found after an NHWC permute);
- a global-context gate (a map reduced to 1x1, e.g. squeeze-excitation, multiplied
  back onto a map) modulates but is not counted as spatial input: strictly such a
  unit depends on the whole image, but the local field is the useful one;
- operations that change the spatial size in other ways (upsampling, transposed
  convolutions, reshapes into tokens) make the field unknown and raise a clear error
  for any layer downstream of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NotApplicableError
from ..modelutil import get_module, int_pair, iter_tensors, model_guard

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVGPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_KERNEL_OPS = {"conv2d": _CONV_ARGS, "max_pool2d": _MAXPOOL_ARGS, "max_pool2d_with_indices": _MAXPOOL_ARGS,
               "avg_pool2d": _AVGPOOL_ARGS}
_UNSUPPORTED = ("conv_transpose", "interpolate", "upsample", "grid_sample", "pixel_shuffle", "pixel_unshuffle",
                "unfold", "fold", "fractional_max_pool", "lp_pool")


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of every unit of one layer's feature map, per axis ``(height, width)``.

    ``size``: extent in input pixels; ``stride``: input pixels between neighbouring
    units; ``start``: input coordinate of the first pixel seen by unit ``(0, 0)``
    (negative where the field reaches into the padding; ``padding`` is its negation);
    ``map_size``: the layer's ``(h, w)``; ``input_size``: the ``(H, W)`` it was traced at.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    start: tuple[int, int]
    map_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def padding(self) -> tuple[int, int]:
        """Effective padding ``(top, left)`` of the whole stack: ``-start``."""
        return (-self.start[0], -self.start[1])

    def box(self, i: int, j: int, clip: bool = True) -> tuple[int, int, int, int]:
        """Input box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) seen by unit ``(i, j)`` (row, column).

        With ``clip`` the box is cut to the input image ``[0, W) x [0, H)``.
        """
        y1, x1 = self.start[0] + i * self.stride[0], self.start[1] + j * self.stride[1]
        y2, x2 = y1 + self.size[0], x1 + self.size[1]
        if clip:
            h, w = self.input_size
            y1, x1, y2, x2 = max(y1, 0), max(x1, 0), min(y2, h), min(x2, w)
        return (x1, y1, x2, y2)


@dataclass(frozen=True)
class _Axis:
    size: int
    stride: int
    start: int


@dataclass(frozen=True)
class _Field:
    """What the tracer knows about one tensor: its spatial size and field (``None`` when unknown)."""

    hw: tuple[int, int]
    axes: tuple[_Axis, _Axis] | None = None
    is_global: bool = False
    reason: str | None = None


def _spatial_in(shape: torch.Size, hw: tuple[int, int]) -> bool:
    """Whether ``hw`` occurs as two consecutive non-batch dimensions of ``shape``."""
    dims = tuple(shape)[1:]
    return any(dims[i : i + 2] == hw for i in range(len(dims) - 1))


def _kernel_field(src: _Field, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], out_hw: tuple[int, int]) -> _Field:
    if src.axes is None:
        return _Field(out_hw, None, src.is_global, src.reason)
    axes = tuple(
        _Axis(a.size + dilation[n] * (kernel[n] - 1) * a.stride, a.stride * stride[n], a.start - padding[n] * a.stride)
        for n, a in enumerate(src.axes)
    )
    return _Field(out_hw, axes)  # type: ignore[arg-type]


def _union(fields: list[_Field], hw: tuple[int, int], op: str) -> _Field:
    for f in fields:
        if f.reason is not None:
            return _Field(hw, None, reason=f.reason)
    if all(f.is_global for f in fields):
        return _Field(hw, None, is_global=True)
    local = [f for f in fields if not f.is_global]
    axes = []
    for n in range(2):
        strides = {f.axes[n].stride for f in local}  # type: ignore[index]
        if len(strides) > 1:
            return _Field(hw, None, reason=f"operation {op!r} combines maps of different strides {sorted(strides)}")
        start = min(f.axes[n].start for f in local)  # type: ignore[index]
        end = max(f.axes[n].start + f.axes[n].size for f in local)  # type: ignore[index]
        axes.append(_Axis(end - start, strides.pop(), start))
    return _Field(hw, tuple(axes))  # type: ignore[arg-type]


class _FieldTracer(TorchFunctionMode):
    """Attach a :class:`_Field` to every tensor computed from the traced input, op by op."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, _Field] = {}
        self._alive: list[torch.Tensor] = []  # keeps traced tensors alive so their ids are not reused

    def set(self, t: torch.Tensor, field: _Field) -> None:
        self.fields[id(t)] = field
        self._alive.append(t)

    def get(self, t: torch.Tensor) -> _Field | None:
        return self.fields.get(id(t))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._propagate(getattr(func, "__name__", str(func)), args, kwargs, out)
        return out

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        ins = [f for t in iter_tensors((args, kwargs)) if (f := self.get(t)) is not None]
        if not ins:
            return
        outs = [t for t in iter_tensors(out) if t.ndim >= 2]
        if name in _KERNEL_OPS:
            self._kernel_op(name, args, kwargs, outs)
        elif name == "pad":
            self._pad_op(args, kwargs, outs)
        else:
            for t in outs:
                field = self._generic_op(name, ins, t)
                if field is not None:
                    self.set(t, field)

    def _kernel_op(self, name: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        """conv2d, max_pool2d, avg_pool2d: apply the kernel rule to the input's field."""
        bound = {**dict(zip(_KERNEL_OPS[name], args)), **kwargs}
        src = self.get(bound["input"])
        if src is None:
            return
        if name == "conv2d":
            kernel = (int(bound["weight"].shape[-2]), int(bound["weight"].shape[-1]))
            dilation = int_pair(bound.get("dilation"), 1)
            stride = int_pair(bound.get("stride"), 1)
            padding = bound.get("padding", 0)
            if padding == "valid":
                padding = 0
            elif padding == "same":  # torch puts the odd pixel of an uneven padding at the end
                padding = tuple(dilation[n] * (kernel[n] - 1) // 2 for n in range(2))
        else:
            kernel = int_pair(bound["kernel_size"])
            dilation = int_pair(bound.get("dilation"), 1) if "dilation" in _KERNEL_OPS[name] else (1, 1)
            stride = int_pair(bound.get("stride"), kernel)
            padding = bound.get("padding", 0)
        for t in outs:
            if t.ndim == 4:
                hw = (int(t.shape[-2]), int(t.shape[-1]))
                self.set(t, _kernel_field(src, kernel, stride, int_pair(padding), dilation, hw))

    def _pad_op(self, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        """F.pad: (left, right, top, bottom) moves the start of the field by (top, left) units."""
        bound = {**dict(zip(("input", "pad", "mode", "value"), args)), **kwargs}
        src = self.get(bound["input"])
        if src is None or not outs:
            return
        pad = list(bound["pad"]) + [0, 0, 0, 0]
        t = outs[0]
        hw = (int(t.shape[-2]), int(t.shape[-1]))
        if src.axes is None:
            self.set(t, _Field(hw, None, src.is_global, src.reason))
            return
        h_ax, w_ax = src.axes
        self.set(t, _Field(hw, (_Axis(h_ax.size, h_ax.stride, h_ax.start - pad[2] * h_ax.stride),
                                _Axis(w_ax.size, w_ax.stride, w_ax.start - pad[0] * w_ax.stride))))

    @staticmethod
    def _generic_op(name: str, ins: list[_Field], t: torch.Tensor) -> _Field | None:
        """Any other op: union of the inputs whose spatial size the output keeps (see the module docstring)."""
        hw = (int(t.shape[-2]), int(t.shape[-1]))
        tainted = [f for f in ins if f.reason is not None]
        if tainted:
            return _Field(hw, None, reason=tainted[0].reason)
        if any(u in name for u in _UNSUPPORTED):
            return _Field(hw, None, reason=f"operation {name!r} changes the spatial layout in a way the "
                                           "receptive-field rules do not cover")
        matching = [f for f in ins if not f.is_global and _spatial_in(t.shape, f.hw)]
        if matching:
            return _union(matching, matching[0].hw, name)
        if t.ndim == 4 and hw == (1, 1):
            return _Field((1, 1), None, is_global=True)
        if any(f.axes is not None for f in ins):
            return _Field(hw, None, reason=f"operation {name!r} turns a feature map into shape {tuple(t.shape)}")
        return None


class _Stop(Exception):
    """Raised from a forward hook to end the traced forward pass once the layer has run."""


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` of timm's pretrained config, else 224 x 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (int(size[-2]), int(size[-1])) if size else (224, 224)


def receptive_field(model: nn.Module, layer: str, input_size: int | tuple[int, int] | None = None,
                    in_channels: int | None = None) -> ReceptiveField:
    """Receptive field of the units of module ``layer``'s output (a map Tensor[B,K,h,w]).

    Traced with one forward pass of a zero image Tensor[1,C,H,W] at ``input_size``
    (default: timm's configured input size, else 224); ``in_channels`` defaults to
    the first convolution's. Unknown ``layer`` names raise :class:`UnknownNameError`
    listing the candidates; layers whose output is not a traceable 4-D map, or that
    the forward pass never reaches, raise :class:`NotApplicableError`.
    """
    from .features import first_conv

    module = get_module(model, layer)
    hw = int_pair(input_size) if input_size is not None else default_input_size(model)
    c = in_channels if in_channels is not None else first_conv(model)[1].in_channels
    p = next(model.parameters(), None)
    x = torch.zeros(1, c, *hw, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    tracer = _FieldTracer()
    captured: list[tuple[torch.Tensor, _Field | None]] = []

    def hook(_m: nn.Module, _inp: object, out: Any) -> None:
        t = next(iter_tensors(out), None)
        if t is not None:
            captured.append((t, tracer.get(t)))
        raise _Stop

    with model_guard(model) as state, torch.no_grad():
        state.handles.append(module.register_forward_hook(hook))
        tracer.set(x, _Field(hw, (_Axis(1, 1, 0), _Axis(1, 1, 0))))
        try:
            with tracer:
                model(x)
        except _Stop:
            pass
    if not captured:
        raise NotApplicableError(f"layer {layer!r} was not called in the forward pass; choose another layer")
    out, field = captured[0]
    if out.ndim != 4:
        raise NotApplicableError(
            f"layer {layer!r} outputs a tensor of shape {tuple(out.shape)}, not a feature map [B,K,h,w]; "
            "choose a convolutional layer"
        )
    if field is None:
        raise NotApplicableError(f"the output of layer {layer!r} does not derive from the input image")
    if field.reason is not None:
        raise NotApplicableError(f"the receptive field of layer {layer!r} cannot be computed: {field.reason}")
    map_size = (int(out.shape[-2]), int(out.shape[-1]))
    if field.is_global:
        return ReceptiveField(hw, hw, (0, 0), map_size, hw)
    h_ax, w_ax = field.axes  # type: ignore[misc]
    return ReceptiveField((h_ax.size, w_ax.size), (h_ax.stride, w_ax.stride), (h_ax.start, w_ax.start), map_size, hw)
