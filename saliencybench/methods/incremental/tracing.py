"""Incremental occlusion, part 1: the model's stages and their locality.

:func:`split_stages` cuts a timm CNN into stages whose composition is its forward pass
(checked on a probe), :func:`open_blocks` splits timm ``BasicBlock`` stages into their
two convolutions, and :func:`trace_stage` traces a stage op by op
(:class:`_LocalityTracer`) to the geometry along each axis of what its outputs read
(:class:`AxisGeometry`), or the reason it is not a local, translation-equivariant
function of its input. The method and its paper: :mod:`saliencybench.methods.incremental`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...errors import NotApplicableError
from ...modelutil import METADATA_QUERIES, has_feature_head_split, int_pair, iter_tensors

_KERNEL_ARGS = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool2d_with_indices": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
}
_POINTWISE = frozenset({
    "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__",
    "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__",
    "__rtruediv__", "true_divide", "neg", "__neg__", "relu", "relu_", "relu6", "hardtanh", "hardtanh_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "sigmoid_",
    "hardsigmoid", "hardswish", "tanh", "tanh_", "softplus", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
    "abs", "exp", "sqrt", "rsqrt", "pow", "__pow__", "minimum", "maximum", "threshold", "prelu",
    "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "detach", "dropout", "dropout2d",
    "feature_dropout", "alpha_dropout",
})
_DROPOUTS = frozenset({"dropout", "dropout2d", "feature_dropout", "alpha_dropout"})
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp",
                         "adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"})


@dataclass(frozen=True)
class AxisGeometry:
    """Along one axis, output unit ``o`` of a stage reads input positions
    ``o * stride - padding ... o * stride - padding + size - 1``."""

    size: int
    stride: int
    padding: int

    def then(self, nxt: AxisGeometry) -> AxisGeometry:
        """The geometry of this stage followed by ``nxt``."""
        return AxisGeometry(self.size + (nxt.size - 1) * self.stride, self.stride * nxt.stride,
                            self.padding + nxt.padding * self.stride)

    def changed(self, lo: int, hi: int, n_out: int) -> tuple[int, int]:
        """The output units ``[lo', hi')`` (of ``n_out``) that read any input position of ``[lo, hi)``."""
        if hi <= lo:
            return (0, 0)
        first = max(0, (lo + self.padding - self.size) // self.stride + 1)
        end = min(n_out, -(-(hi + self.padding) // self.stride))
        return (first, end) if end > first else (0, 0)


IDENTITY = AxisGeometry(1, 1, 0)
Geometry = tuple[AxisGeometry, AxisGeometry]


@dataclass(frozen=True)
class ConvRecord:
    """One convolution inside a stage: its output's geometry in the stage input
    (``None`` once a global operation feeds it), output size ``(h, w)``, and per image
    its multiply-accumulates and output elements."""

    geometry: Geometry | None
    out_hw: tuple[int, int]
    macs: int
    numel: int


@dataclass(frozen=True)
class Stage:
    """A run of the model's modules (or the halves of an opened block), applied in order
    to Tensor[N,C,h,w].

    ``geometry`` is ``None`` when the stage is not local and translation-equivariant
    (``reason`` says why); ``in_shape``/``out_shape`` are ``(C, h, w)`` at the traced
    input size; ``convs`` its convolutions there.
    """

    name: str
    modules: tuple[nn.Module, ...]
    geometry: Geometry | None
    reason: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    convs: tuple[ConvRecord, ...]
    whole: nn.Module | None = None  # first stage of an opened block: the block (run whole where both run in full)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules:
            x = m(x)
        return x

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the stage's convolutions per image, at the traced size."""
        return sum(c.macs for c in self.convs)


# ---- locality tracing -------------------------------------------------------------------

def _union(fields: Sequence[Geometry]) -> Geometry | str:
    """The geometry reading every input any of ``fields`` reads (a residual block's paths)."""
    axes = []
    for n in range(2):
        strides = {f[n].stride for f in fields}
        if len(strides) > 1:
            return f"an operation combines maps of strides {sorted(strides)}"
        start = min(-f[n].padding for f in fields)
        end = max(-f[n].padding + f[n].size for f in fields)
        axes.append(AxisGeometry(end - start, strides.pop(), -start))
    return (axes[0], axes[1])


class _LocalityTracer(TorchFunctionMode):
    """Attach to every tensor computed from the traced input its geometry, or the reason
    it is not a local, translation-equivariant function of it; count convolution work."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, Geometry | str] = {}
        self.alive: list[torch.Tensor] = []  # keeps traced tensors alive so their ids are not reused
        self.convs: list[ConvRecord] = []
        self.failure: str | None = None

    def set(self, t: torch.Tensor, field: Geometry | str) -> None:
        self.fields[id(t)] = field
        self.alive.append(t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._propagate(getattr(func, "__name__", str(func)), args, kwargs, out)
        return out

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        traced = [t for t in iter_tensors((args, kwargs)) if id(t) in self.fields]
        if not traced:
            return
        outs = list(iter_tensors(out))
        if not outs:
            if name == "__setitem__":
                self.set(args[0], "it writes into a feature map in place (__setitem__)")
            elif name not in METADATA_QUERIES:
                self.failure = (f"it reads feature-map values into Python ({name!r}), so its control flow "
                                "may depend on them")
            return
        tainted = [f for t in traced if isinstance(f := self.fields[id(t)], str)]
        field = tainted[0] if tainted else self._rule(name, args, kwargs, traced, outs)
        for t in outs:
            self.set(t, field)
        if name == "conv2d" and outs[0].ndim == 4:
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            out = outs[0]
            macs = out[0].numel() * int(weight.shape[1]) * int(weight.shape[-2]) * int(weight.shape[-1])
            geometry = field if isinstance(field, tuple) else None
            hw = (int(out.shape[-2]), int(out.shape[-1]))
            self.convs.append(ConvRecord(geometry, hw, macs, out[0].numel()))

    def _rule(self, name: str, args: tuple, kwargs: dict, traced: list[torch.Tensor],
              outs: list[torch.Tensor]) -> Geometry | str:
        if name in _KERNEL_ARGS:
            return self._kernel(name, {**dict(zip(_KERNEL_ARGS[name], args)), **kwargs})
        if name in _REDUCTIONS:
            if all(_same_grid(o, traced[0]) for o in outs):
                return self._pointwise(name, args, kwargs, traced, outs)
            return f"it pools globally ({name!r}, e.g. squeeze-excitation or attention)"
        if name == "batch_norm":
            bound = {**dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training"), args)),
                     **kwargs}
            if bound.get("training", False) or bound.get("running_mean") is None:
                return "it normalises with batch statistics (batch norm in training mode)"
            return self._pointwise(name, (bound["input"],), {}, traced, outs)
        if name == "cat":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim not in (1, -3):
                return f"it concatenates along dimension {dim}, not channels"
            return self._pointwise(name, (), {}, traced, outs)
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if len(index) > 4 or any(i is Ellipsis for i in index) or not all(
                    isinstance(i, slice) and (n == 1 or i == slice(None)) for n, i in enumerate(index)):
                return "it indexes a feature map other than by channel"
            return self._pointwise(name, (), {}, traced, outs)
        if name in _POINTWISE:
            if name in _DROPOUTS and (kwargs.get("training", args[2] if len(args) > 2 else True)):
                return "it applies dropout in training mode"
            return self._pointwise(name, args, kwargs, traced, outs)
        return f"operation {name!r} is not known to be local and translation-equivariant"

    def _pointwise(self, name: str, args: tuple, kwargs: dict, traced: list[torch.Tensor],
                   outs: list[torch.Tensor]) -> Geometry | str:
        ref = traced[0]
        if any(not _same_grid(t, ref) for t in traced + outs):
            return f"operation {name!r} mixes maps of different sizes or batch entries"
        if name != "prelu":
            ids = {id(t) for t in traced}
            for t in iter_tensors((args, kwargs)):
                if id(t) not in ids and t.numel() > 1 and (t.ndim < 2 or tuple(t.shape[-2:]) != (1, 1)):
                    return f"operation {name!r} combines the map with a position-dependent tensor"
        return _union([self.fields[id(t)] for t in traced])  # type: ignore[misc]

    def _kernel(self, name: str, bound: dict) -> Geometry | str:
        src = self.fields.get(id(bound["input"]))
        if not isinstance(src, tuple):
            return "a convolution or pooling reads a non-local input" if src is None else src
        if name == "conv2d":
            weight = bound["weight"]
            kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
            dilation = int_pair(bound.get("dilation"), 1)
            stride = int_pair(bound.get("stride"), 1)
            padding = bound.get("padding", 0)
            if padding == "valid":
                padding = 0
            elif padding == "same":
                padding = tuple(dilation[n] * (kernel[n] - 1) // 2 for n in range(2))
        else:
            kernel = int_pair(bound["kernel_size"])
            dilation = int_pair(bound.get("dilation"), 1) if name != "avg_pool2d" else (1, 1)
            stride = int_pair(bound.get("stride"), kernel)
            padding = bound.get("padding", 0)
        padding = int_pair(padding)
        step = [AxisGeometry(dilation[n] * (kernel[n] - 1) + 1, stride[n], padding[n]) for n in range(2)]
        return (src[0].then(step[0]), src[1].then(step[1]))


def _same_grid(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``t`` is a map Tensor[N,*,h,w] on the batch and grid of ``ref``."""
    return t.ndim == 4 and ref.ndim == 4 and t.shape[0] == ref.shape[0] and t.shape[-2:] == ref.shape[-2:]


def trace_stage(modules: Sequence[nn.Module],
                x: torch.Tensor) -> tuple[torch.Tensor, Geometry | str, list[ConvRecord]]:
    """Run ``modules`` on ``x``[N,C,h,w] under the locality tracer.

    Returns ``(output, geometry or the reason it is not local, convolutions)``.
    """
    tracer = _LocalityTracer()
    x = x.clone()
    tracer.set(x, (IDENTITY, IDENTITY))
    with tracer:
        y = x
        for m in modules:
            y = m(y)
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        return y, "it does not return a feature map [N,C,h,w]", tracer.convs
    field = tracer.fields.get(id(y), "its output does not derive from its input through traced operations")
    return y, (tracer.failure or field), tracer.convs


# ---- the stage split ------------------------------------------------------------------

def _leaf_children(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Children in registration order, with plain ``nn.Sequential`` containers opened."""
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
            yield from _leaf_children(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    tol = min(1e3 * torch.finfo(b.dtype).eps, 1e-2)
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp(min=1e-12))


def split_stages(model: nn.Module,
                 probe: torch.Tensor) -> tuple[list[Stage], Callable[[torch.Tensor], torch.Tensor]]:
    """Split a timm CNN into ``(stages, head)`` with ``head(stages(x)) == model(x)``.

    probe: Tensor[1,C,H,W] at the size the stages will run at; the split is checked on
    it and each stage's geometry traced there. Raises :class:`NotApplicableError`
    naming the reason when no such split is found.
    """
    name = type(model).__name__
    if not has_feature_head_split(model):
        raise NotApplicableError(f"{name} has no forward_features/forward_head (timm) split to cut into stages")
    feats = model.forward_features(probe)
    logits = model(probe)
    units: list[tuple[str, nn.Module, tuple[int, int, int], torch.Tensor, Geometry | str, list[ConvRecord]]] = []
    x, n_feats = probe, 0
    for child_name, child in _leaf_children(model):
        try:
            y, field, convs = trace_stage([child], x)
        except Exception:  # noqa: BLE001 - a head module that cannot run on a map ends the features
            break
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            break
        units.append((child_name, child, tuple(x.shape[1:]), y, field, convs))  # type: ignore[arg-type]
        x = y
        if _close(y, feats):
            n_feats = len(units)
    if n_feats == 0:
        raise NotApplicableError(
            f"{name}'s children run one after another in registration order do not reproduce forward_features"
        )
    units = units[:n_feats]
    x = units[-1][3]
    if not _close(model.forward_head(x), logits):
        raise NotApplicableError(f"{name}'s forward_head(forward_features(x)) differs from model(x)")
    stages: list[Stage] = []
    for child_name, child, in_shape, y, field, convs in units:
        out_shape = tuple(y.shape[1:])
        if isinstance(field, tuple) and not convs and stages and stages[-1].geometry is not None:
            # Without multiply-adds (norms, activations, pooling) a stage is not worth its own gather.
            prev = stages[-1]
            geometry = (prev.geometry[0].then(field[0]), prev.geometry[1].then(field[1]))
            stages[-1] = Stage(f"{prev.name}+{child_name}", prev.modules + (child,), geometry, "",
                               prev.in_shape, out_shape, prev.convs)  # type: ignore[arg-type]
            continue
        geometry, reason = (field, "") if isinstance(field, tuple) else (None, field)
        stages.append(Stage(child_name, (child,), geometry, reason, in_shape, out_shape,  # type: ignore[arg-type]
                            tuple(convs)))
    return stages, model.forward_head


class _BasicBlockPart:
    """One half of a timm ``BasicBlock`` (``conv1``, ``conv2``, a residual add), so that each
    of its two 3x3 convolutions gets a crop of its own. ``head``: ``x`` -> channels
    ``[conv1 branch (c), shortcut]``; ``tail``: that -> the block's output. The block's
    submodules are looked up at each call (a context may swap its norms meanwhile)."""

    def __init__(self, block: nn.Module, part: str, c: int) -> None:
        self.block, self.part, self.c = block, part, c

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if self.part == "head":
            h = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
            return torch.cat([h, x if b.downsample is None else b.downsample(x)], 1)
        h = b.bn2(b.conv2(x[:, :self.c]))
        if b.se is not None:
            h = b.se(h)
        if b.drop_path is not None:
            h = b.drop_path(h)
        return b.act2(h + x[:, self.c:])


def _basic_block(module: nn.Module) -> bool:
    """Whether ``module`` runs timm's ``BasicBlock.forward``."""
    try:
        from timm.models.resnet import BasicBlock
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return getattr(type(module), "forward", None) is BasicBlock.forward


def open_blocks(stages: list[Stage], probe: torch.Tensor) -> list[Stage]:
    """``stages`` with each single-block stage of a timm ``BasicBlock`` split into its two
    convolutions (:class:`_BasicBlockPart`) where both halves are local and together
    reproduce the block on ``probe``'s activations; other stages as they are."""
    out: list[Stage] = []
    x = probe
    for st in stages:
        y = st(x)
        if len(st.modules) == 1 and st.geometry is not None and _basic_block(st.modules[0]):
            block = st.modules[0]
            c = int(block.conv1.out_channels)
            head, tail = _BasicBlockPart(block, "head", c), _BasicBlockPart(block, "tail", c)
            mid, f1, convs1 = trace_stage([head], x)
            z, f2, convs2 = trace_stage([tail], mid)
            if isinstance(f1, tuple) and isinstance(f2, tuple) and _close(z, y):
                out.append(Stage(f"{st.name}.conv1", (head,), f1, "", st.in_shape, tuple(mid.shape[1:]),
                                 tuple(convs1), block))  # type: ignore[arg-type]
                out.append(Stage(st.name, (tail,), f2, "", tuple(mid.shape[1:]), st.out_shape,  # type: ignore[arg-type]
                                 tuple(convs2)))
                x = y
                continue
        out.append(st)
        x = y
    return out
