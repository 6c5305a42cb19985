"""Eval-mode batch norms folded into the convolutions that feed them, checked on a probe
(:func:`folded_batchnorm`), used by the fast inference path (:mod:`.fastpath`).
"""

from __future__ import annotations

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .core import _note, iter_tensors

class _DropAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded: drop, then act."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _norm_remainder(bn: nn.Module) -> nn.Module | None:
    """The module that replaces a folded batch norm, or ``None`` when it cannot be folded."""
    if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None
    if bn._forward_hooks or bn._forward_pre_hooks:
        return None
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "drop", None), nn.Module) \
            and isinstance(getattr(bn, "act", None), nn.Module):
        return _DropAct(bn.drop, bn.act)
    return None


# Tensor operations (``__torch_function__`` names) that only read a tensor's metadata, never its values.
METADATA_QUERIES = frozenset({"size", "dim", "__get__", "__len__", "numel", "nelement", "ndimension", "stride",
                              "is_contiguous", "data_ptr", "element_size", "is_floating_point", "is_complex",
                              "get_device", "storage_offset", "_assert", "__hash__"})


class _ValueUses(TorchFunctionMode):
    """Counts, per tensor id, the torch operations that read the tensor's values."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in METADATA_QUERIES:
            for t in iter_tensors([args, kwargs]):
                self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        return func(*args, **kwargs)


def conv_batchnorm_pairs(model: nn.Module, probe: torch.Tensor) -> tuple[list[tuple[nn.Conv2d, nn.Module]], object]:
    """The (convolution, batch norm) pairs where the norm alone reads the convolution's output,
    found on one forward pass of ``probe`` Tensor[1,3,H,W]: ``(pairs, output)``.

    A convolution whose output anything else reads too (a residual sum, an in-place
    activation before the norm), and a convolution or norm called more than once (shared
    modules), is left out: folding would change those other uses.
    """
    produced: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensors are kept alive: ids stay unique
    calls: dict[int, int] = {}
    pairs: dict[int, tuple[nn.Conv2d, nn.Module, torch.Tensor]] = {}
    handles = []
    counter = _ValueUses()

    def conv_hook(m: nn.Module, _inp: object, out: object) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (out, m)  # type: ignore[assignment]
            counter.uses[id(out)] = 0  # uses of an earlier, freed tensor with the same id do not count

    def bn_hook(m: nn.Module, inp: tuple[object, ...]) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1
        x = inp[0] if inp else None
        out, conv = produced.get(id(x), (None, None))
        if conv is not None and out is x and getattr(conv, "out_channels", None) == getattr(m, "num_features", 0):
            pairs[id(m)] = (conv, m, out)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with counter:
            out = model(probe)
    finally:
        for h in handles:
            h.remove()
    convs = [conv for conv, _, _ in pairs.values()]
    keep = [(c, bn) for c, bn, y in pairs.values()
            if calls[id(c)] == 1 and calls[id(bn)] == 1 and convs.count(c) == 1 and counter.uses.get(id(y)) == 1]
    return keep, out


def _rounding_tolerance(t: torch.Tensor) -> float:
    """Relative tolerance of float rounding for outputs of ``t``'s dtype: 1e-4 (float32 and wider),
    8 units of the last place for float16/bfloat16."""
    return max(1e-4, 8 * torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


def _outputs_close(a: object, b: object) -> bool:
    """Whether two (nested) outputs agree to float rounding: every tensor to
    :func:`_rounding_tolerance` of its largest finite value (NaN where the other has NaN)."""
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        rtol = _rounding_tolerance(y)
        x, y = x.double(), y.double()
        scale = float(y.nan_to_num(0.0, 0.0, 0.0).abs().max()) if y.numel() else 0.0
        if not torch.allclose(x, y, rtol=rtol, atol=rtol * scale + 1e-12, equal_nan=True):
            return False
    return True


def _difference(a: object, b: object) -> str:
    """How two probe outputs differ, for a note: the largest difference relative to ``b``'s largest value."""
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return "outputs of other shapes than the plain path's"
    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double(), y.double()
        d = torch.where(x.isnan() & y.isnan(), 0.0, (x - y).abs()).nan_to_num(float("inf"))
        return float(d.max() / y.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp(min=1e-12)) if d.numel() else 0.0

    worst = max((rel(x, y) for x, y in zip(ta, tb)), default=0.0)
    tol = max((_rounding_tolerance(y) for y in tb), default=1e-4)
    return f"outputs differ from the plain path's by {worst:.2g} of their largest value (tolerance {tol:.2g})"


def _has_hooks(m: nn.Module) -> bool:
    """Whether a module carries hooks (forward, pre-forward or backward) that would see its folded outputs."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    """Whether module hooks registered for every module are present (``register_module_forward_hook``)."""
    mm = nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or getattr(mm, "_global_backward_pre_hooks", None))


def _structure_key(model: nn.Module, probe: torch.Tensor) -> tuple:
    """What a probe verdict depends on: the module structure, input shape, dtype and device."""
    return (hash(tuple((name, id(m), type(m)) for name, m in model.named_modules())), tuple(probe.shape[1:]),
            probe.dtype, probe.device.type)


# model -> {(structure, input shape, dtype, device): ([(conv name, norm name)], note)}: the pairs found and
# checked on the first call (and why folding was refused, if it was), so that later calls run no probe.
_FOLDABLE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[list[tuple[str, str]], str]]] = \
    weakref.WeakKeyDictionary()
# model -> its output on the probe of the last folded_batchnorm call that probed, as the model is
# inside that block (folded, or not where refused): fast_inference's check reuses it.
_PROBE_OUTPUT: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


@contextmanager
def folded_batchnorm(model: nn.Module, probe: torch.Tensor) -> Iterator[int]:
    """Run a block with eval-mode batch norms folded into the convolutions that feed them.

    Each norm ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` right after a
    convolution becomes part of that convolution's weight and bias, and the norm is
    swapped for ``nn.Identity`` (timm's ``BatchNormAct2d``: for its drop and act), so
    inference skips one pass over every feature map; this is what compilers do.
    The pairs come from one forward pass of ``probe`` Tensor[1,3,H,W] (a norm is folded
    only if nothing else reads its convolution's output), and the folded model must
    reproduce that pass to 1e-4 of its largest output, else nothing is folded (with a
    note). The pairs are remembered per model, module structure, input shape, dtype
    and device, so later calls run no probe. A convolution or norm with hooks of its
    own, or any global module hook, is not folded (with a note): the hook sees the
    plain output. Yields the number of norms folded. Weights, biases and modules are
    restored on exit, also after an exception (which propagates:
    :func:`fast_inference` is the wrapper that falls back). Only for inference: not
    for gradients with respect to intermediate layers.
    """
    key = _structure_key(model, probe)
    known = _FOLDABLE.setdefault(model, {}).get(key)
    refused = ""
    if known is None:
        with torch.inference_mode():
            pairs, reference = conv_batchnorm_pairs(model, probe)
    else:
        modules = dict(model.named_modules())
        pairs, reference, refused = [(modules[c], modules[b]) for c, b in known[0]], None, known[1]
    names = {id(m): name for name, m in model.named_modules()}
    parents = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
    seen: dict[int, int] = {}  # modules and parameters by how many places hold them (tied weights)
    for m in [*model.modules(remove_duplicate=False), *(p for _, p in model.named_parameters(remove_duplicate=False))]:
        seen[id(m)] = seen.get(id(m), 0) + 1
    undo: list[Callable[[], None]] = []
    folded_count = 0
    # Modules with hooks of their own are left out on each call (hooks come and go); the pairs are
    # remembered only once all of them were checked (a call without such hooks).
    found = pairs
    hooked = [names[id(c)] for c, bn in pairs if _has_hooks(c) or _has_hooks(bn)]
    pairs = [(c, bn) for c, bn in pairs if not (_has_hooks(c) or _has_hooks(bn))]
    if _global_hooks() and pairs:
        hooked, pairs = ["every module (global module hooks)"], []

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        undo.clear()

    try:
        for conv, bn in pairs:
            remainder = _norm_remainder(bn)
            if remainder is None or seen.get(id(bn), 0) != 1 or id(bn) not in parents or any(
                    p is not None and seen.get(id(p), 0) != 1 for p in (conv.weight, conv.bias)):
                continue
            parent, name = parents[id(bn)]
            with torch.inference_mode(False), torch.no_grad():
                scale = bn.running_var.to(conv.weight.dtype).add(bn.eps).rsqrt()
                shift = -bn.running_mean.to(scale.dtype) * scale
                if bn.weight is not None:
                    scale = scale * bn.weight.to(scale.dtype)
                    shift = shift * bn.weight.to(scale.dtype)
                if bn.bias is not None:
                    shift = shift + bn.bias.to(scale.dtype)
                weight = conv.weight.data
                fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
                    and not weight.is_contiguous() else torch.contiguous_format
                folded = (weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=fmt)
                bias = shift if conv.bias is None else conv.bias.data * scale + shift
            old_bias = conv.bias
            old_weight, old_bias_data = weight, None if old_bias is None else old_bias.data
            conv.weight.data = folded
            if old_bias is None:
                conv.bias = nn.Parameter(bias, requires_grad=False)
                undo.append(lambda c=conv: setattr(c, "bias", None))
            else:
                old_bias.data = bias
                undo.append(lambda p=old_bias, d=old_bias_data: setattr(p, "data", d))
            undo.append(lambda c=conv, w=old_weight: setattr(c.weight, "data", w))
            setattr(parent, name, remainder)
            undo.append(lambda p=parent, n=name, m=bn: setattr(p, n, m))
            folded_count += 1
        if known is None:
            output = reference
            if folded_count:
                with torch.inference_mode():
                    output = model(probe)
                if not _outputs_close(output, reference):
                    restore()
                    refused = (f"batch-norm folding disabled: the folded model's {_difference(output, reference)}"
                               .replace("plain path's", "unfolded model's"))
                    folded_count, found, output = 0, [], reference
            if refused or len(pairs) == len(found):
                _FOLDABLE[model][key] = ([(names[id(c)], names[id(b)]) for c, b in found], refused)
            _PROBE_OUTPUT[model] = output
        if refused:
            _note(refused)
        if hooked:
            _note(f"batch-norm folding skipped where modules have hooks of their own (the hook sees the plain "
                  f"output): {', '.join(hooked[:5])}{' ...' if len(hooked) > 5 else ''}")
        yield folded_count
    finally:
        restore()
