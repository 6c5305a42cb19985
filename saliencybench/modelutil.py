"""Model plumbing shared by methods and metrics: state guard, scores, layers, heads.

Nothing here keeps state on the model: :func:`model_guard` puts the model in eval
mode and freezes its parameters for the duration of a call, and restores training
flags, ``requires_grad`` and ``inplace`` flags and removes every hook on exit, also
when an exception is raised midway.

The fast inference paths (:func:`fast_inference`: channels_last weights and inputs,
batch norms folded into convolutions) may only change the speed: each is probed
against the plain model once per model structure and input, declines with a note
where it raises or differs, and can be switched off (:func:`fast_paths`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import InvalidInputError, NotApplicableError, UnknownNameError
from .notes import add_note

SCORES = ("logit", "probability", "log_probability")


@dataclass
class GuardState:
    """Handles and attribute changes registered during a guarded call, undone on exit."""

    handles: list = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def model_guard(model: nn.Module, *, freeze: bool = True) -> Iterator[GuardState]:
    """Run a block with ``model`` in eval mode (and frozen parameters); restore it after.

    Yields a :class:`GuardState` whose ``handles`` (hook handles) are removed and
    whose ``restore`` callables are run when the block exits, whatever happens.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    state = GuardState()
    try:
        model.eval()
        if freeze:
            for p, _ in requires:
                p.requires_grad_(False)
        yield state
    finally:
        for h in state.handles:
            h.remove()
        for undo in reversed(state.restore):
            undo()
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


# ---- fast inference paths --------------------------------------------------------------
# Every speed-up here may only change the speed: it declines (its precondition false, its
# probe failing) and the plain forward pass runs instead, with a note saying why.

_FAST_PATHS: ContextVar[bool] = ContextVar("saliencybench_fast_paths", default=True)


@contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Switch the inference speed-ups on or off inside the block (on by default).

    Off, :func:`fast_inference` runs the plain model (no channels_last layout, no folded
    batch norms, no probe) and occlusion's automatic choice (``incremental=None``)
    takes full forward passes: the reference every fast path is checked against (the
    tests and ``benchmarks/zoo_coverage.py`` compare both). Explicit requests
    (``incremental=True``, :func:`channels_last`, :func:`folded_batchnorm`) still run.
    """
    if not isinstance(enabled, bool):
        raise InvalidInputError(f"fast_paths takes True or False, got {enabled!r}")
    token = _FAST_PATHS.set(enabled)
    try:
        yield
    finally:
        _FAST_PATHS.reset(token)


def fast_paths_enabled() -> bool:
    """Whether the speed-ups are on here (see :func:`fast_paths`)."""
    return _FAST_PATHS.get()


def _note(text: str) -> None:
    """Leave a note for the enclosing :func:`~saliencybench.notes.collect_notes`."""
    add_note(text)


def describe_error(error: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 200 characters), for notes."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:200]}"


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D Tensor[B,C,H,W] in channels_last memory format; any other rank unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def channels_last(model: nn.Module, enabled: bool = True) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run a block with the model's 4-D weights in channels_last memory format; restore them after.

    Only 4-D parameters and buffers are converted (``model.to(memory_format=...)``
    refuses 5-D weights, e.g. Conv3d's); others keep their layout. Yields the function
    that puts an input batch Tensor[B,3,H,W] in the same format (:func:`to_channels_last`).
    The values computed are the same up to float summation order for models that use
    only layout-agnostic operations; on CPU (oneDNN) and GPU convolutions run faster in
    this layout, depthwise ones much faster. Models that call ``.view()`` on feature maps
    or custom ops that assume contiguous memory can fail or differ: :func:`fast_inference`
    probes for that. ``enabled=False`` changes nothing and yields the identity.
    """
    if not enabled:
        yield _identity
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.ndim == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                    saved.append((t, t.data))
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
        yield to_channels_last
    finally:
        for t, data in reversed(saved):
            t.data = data


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


@dataclass(frozen=True)
class _Verdict:
    """What :func:`fast_inference`'s probe found for one model structure and input: which speed-ups run,
    and the notes saying why the others do not."""

    channels_last: bool
    fold: bool
    notes: tuple[str, ...] = ()


# model -> {(structure, input shape, dtype, device, fold requested): verdict}, found on the first call.
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Verdict]] = weakref.WeakKeyDictionary()
# model -> the fast run it is inside now: a nested fast_inference on the same model changes nothing.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, "_FastRun"] = weakref.WeakKeyDictionary()


class _FastRun:
    """One :func:`fast_inference` block on a model: the speed-ups entered (undone by :meth:`close`,
    which may run early) and the input format, which turns plain when the block falls back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack = ExitStack()
        self.is_channels_last = False
        self.fast = False

    def enter(self, use_channels_last: bool, fold: bool, probe: torch.Tensor) -> int:
        """Enter the speed-ups; returns the number of norms folded. Raises what they raise (then :meth:`close`)."""
        self.fast = use_channels_last or fold
        self.is_channels_last = use_channels_last
        self.stack.enter_context(channels_last(self.model, use_channels_last))
        if not fold:
            return 0
        _PROBE_OUTPUT.pop(self.model, None)
        return self.stack.enter_context(folded_batchnorm(self.model, self.fmt(probe)))

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        """Put a batch in the format the model runs in now."""
        return to_channels_last(x) if self.is_channels_last else x

    def close(self) -> None:
        """Undo every speed-up (idempotent)."""
        self.fast = self.is_channels_last = False
        self.stack.close()

    @contextmanager
    def guard(self, on_failure: Callable[[str], None]) -> Iterator[None]:
        """Inside the block, a forward pass that fails on the fast path (any error but running out of
        memory) undoes the speed-ups and reruns on the plain path; ``on_failure`` gets the reason."""
        inner = self.model.forward
        own = self.model.__dict__.get("forward")

        def forward(*args: object, **kwargs: object) -> object:
            if self.fast:
                try:
                    return inner(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - any failure of the fast path falls back
                    if is_out_of_memory(err):
                        raise
                    self.close()
                    args, kwargs = _plain_inputs(args), _plain_inputs(kwargs)  # type: ignore[assignment]
                    out = inner(*args, **kwargs)  # the plain path's own errors propagate
                    on_failure(f"fast paths disabled after a failure on a batch of "
                               f"{_shapes(args)}: {describe_error(err)}")
                    return out
            return inner(*args, **kwargs)

        try:
            self.model.forward = forward  # type: ignore[method-assign]
        except Exception:  # noqa: BLE001 - a module that refuses the attribute (scripted) runs unguarded
            yield
            return
        try:
            yield
        finally:
            if own is None:
                self.model.__dict__.pop("forward", None)
            else:
                self.model.forward = own  # type: ignore[method-assign]


def _plain_inputs(obj: object) -> object:
    """Tensors of a (nested) argument structure in contiguous memory, as the plain path gets them."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_inputs(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _plain_inputs(v) for k, v in obj.items()}
    return obj


def _shapes(args: object) -> str:
    return ", ".join(str(tuple(t.shape)) for t in iter_tensors(args)) or "no tensors"


def _probe_verdict(model: nn.Module, probe: torch.Tensor, fold: bool) -> _Verdict | None:
    """Which speed-ups reproduce the plain model on ``probe`` Tensor[1,...] (``None``: the plain
    model itself fails there, so there is nothing to compare with).

    Tried in order until one passes: channels_last and folding (when ``fold``),
    channels_last alone, folding alone; a try passes when it raises nothing and its
    output equals the plain one to float rounding (:func:`_outputs_close`: 1e-4 of the
    largest output in float32). The first try shares the folding probe's passes.
    """
    try:
        with torch.inference_mode():
            reference = model(probe)
    except Exception:  # noqa: BLE001 - the plain path's own error surfaces in the method itself
        return None
    tries = [(True, True), (True, False), (False, True)] if fold else [(True, False)]
    reasons: dict[tuple[bool, bool], str] = {}
    for use_cl, use_fold in tries:
        run = _FastRun(model)
        try:
            run.enter(use_cl, use_fold, probe)
            output = _PROBE_OUTPUT.pop(model, None) if use_fold else None
            if output is None:
                with torch.inference_mode():
                    output = model(run.fmt(probe))
            reasons[(use_cl, use_fold)] = "" if _outputs_close(output, reference) else _difference(output, reference)
        except Exception as err:  # noqa: BLE001 - any failure of a speed-up means it declines
            reasons[(use_cl, use_fold)] = describe_error(err)
        finally:
            run.close()
        if not reasons[(use_cl, use_fold)]:
            notes = []
            if use_fold is False and fold:
                notes.append(f"batch-norm folding disabled: {reasons[(True, True)]}")
            if not use_cl:
                notes.append(f"channels_last disabled: {reasons[(True, False)]}")
            return _Verdict(use_cl, use_fold, tuple(notes))
    notes = [f"channels_last disabled: {reasons[(True, False)]}"]
    if fold:
        notes.append(f"batch-norm folding disabled: {reasons[(False, True)]}")
    return _Verdict(False, False, tuple(notes))


def runs_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` runs channels_last now, inside a :func:`fast_inference` block that chose it."""
    run = _ACTIVE.get(model)
    return run is not None and run.is_channels_last


@contextmanager
def fast_inference(model: nn.Module, images: torch.Tensor, *, fold: bool = True
                   ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run many inference forward passes on inputs like ``images`` Tensor[B,3,H,W] fast.

    For float32/16 inputs (:func:`fast_layout`) and with :func:`fast_paths` on: 4-D
    weights channels_last (:func:`channels_last`) and, with ``fold`` (eval-mode
    models), batch norms folded into their convolutions (:func:`folded_batchnorm`).
    Yields the function that puts a batch in the model's memory format.

    Every speed-up may only change the speed. On the first call per model structure,
    input shape, dtype and device, one image (``images[:1]``) runs on the plain model
    and on the fast one; a speed-up that raises or changes the output beyond float
    rounding (1e-4 of the largest output) is left out, and a note (``add_note``, which
    the runner writes into result rows) says why, e.g. ``channels_last disabled:
    RuntimeError: view size is not compatible ...``. The verdict is remembered, so later
    calls run no probe (and repeat the note). A forward pass of the model that still
    fails on the fast path inside the block (a batch shape the probe did not cover)
    undoes the speed-ups, reruns on the plain path, notes it and remembers it. Outputs
    equal plain forward passes up to float rounding (about 1e-6 relative). The model is
    restored on exit. Nested on the same model, it changes nothing and yields the
    enclosing block's format.
    """
    active = _ACTIVE.get(model)
    if active is not None:
        yield active.fmt
        return
    if not fast_layout(images) or not fast_paths_enabled():
        yield _identity
        return
    fold = fold and not any(m.training for m in model.modules())
    probe = images[:1]
    key = (*_structure_key(model, probe), fold)
    verdicts = _VERDICTS.setdefault(model, {})
    verdict = verdicts.get(key)
    if verdict is None:
        verdict = _probe_verdict(model, probe, fold)
        if verdict is not None:
            verdicts[key] = verdict
    if verdict is None:  # the plain model fails on the probe: the method meets that error itself
        yield _identity
        return
    for text in verdict.notes:
        _note(text)
    run = _FastRun(model)

    def failed(reason: str) -> None:
        _note(reason)
        verdicts[key] = _Verdict(False, False, (reason,))

    try:
        try:
            run.enter(verdict.channels_last, verdict.fold, probe)
        except Exception as err:  # noqa: BLE001 - passed its probe, fails now: the plain path
            run.close()
            failed(f"fast paths disabled: {describe_error(err)}")
        _ACTIVE[model] = run
        with run.guard(failed):
            yield run.fmt
    finally:
        _ACTIVE.pop(model, None)
        run.close()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU allocator)."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def safe_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for a batch Tensor[N,...]; on an out-of-memory error the batch is split
    in halves (recursively, down to one input) and the outputs concatenated."""
    try:
        return model(x)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e) or x.shape[0] == 1:
            raise
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    return torch.cat([safe_forward(model, x[:half]), safe_forward(model, x[half:])])


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def auto_batch_size(model: nn.Module, image: torch.Tensor, fraction: float = 0.25, limit: int = 256) -> int:
    """A batch size for inference of inputs like ``image`` Tensor[3,H,W] that uses at most
    ``fraction`` of the free memory: the sum of all module outputs' sizes of one
    probe forward bounds the memory per input (inference keeps fewer alive at once)."""
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(image[None])
    finally:
        for h in handles:
            h.remove()
    per_input = max(sum(sizes), image.numel() * image.element_size())
    return int(max(1, min(limit, fraction * free_memory_bytes(image.device) // per_input)))


def resolve_batch_size(batch_size: int | str, model: nn.Module, images: torch.Tensor) -> int:
    """``batch_size`` itself, or :func:`auto_batch_size` for ``"auto"``."""
    if batch_size == "auto":
        return auto_batch_size(model, images[0])
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(images: torch.Tensor, precision: str = "float32"):
    """A context running the forward passes in ``precision`` (torch.autocast), or a no-op for float32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return nullcontext()
    return torch.autocast(images.device.type, dtype=PRECISIONS[precision])


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (of autocast) as float32; others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def fast_layout(images: torch.Tensor) -> bool:
    """Whether many forward passes on ``images`` should run channels_last: float32/16 only
    (oneDNN has no float64 kernels, so float64 references keep the plain layout)."""
    return images.dtype in (torch.float32, torch.float16, torch.bfloat16)


def iter_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tensor, list, tuple or dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)


def int_pair(v: object, default: object = None) -> tuple[int, int]:
    """A module's (h, w) setting as two ints: a scalar, a pair, or the last two of a longer tuple."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[-2]), int(v[-1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def target_score(logits: torch.Tensor, targets: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Select the target class score from ``logits[B,C]``: Tensor[B].

    ``score`` is ``"logit"`` (pre-softmax, the default of every method),
    ``"probability"`` (softmax) or ``"log_probability"`` (log-softmax).
    """
    if score == "logit":
        vals = logits
    elif score == "probability":
        vals = logits.softmax(-1)
    elif score == "log_probability":
        vals = logits.log_softmax(-1)
    else:
        raise InvalidInputError(f"unknown score {score!r}; use one of {SCORES}")
    if logits.ndim != 2:
        raise InvalidInputError(f"the model returned outputs of shape {tuple(logits.shape)}; a classifier's "
                                "logits [B, classes] are needed")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise InvalidInputError(f"targets {sorted(set(targets.tolist()))} out of range for the model's "
                                f"{logits.shape[1]} classes")
    return vals.gather(1, targets.view(-1, 1)).squeeze(1)


def num_classes(model: nn.Module) -> int | None:
    """Number of output classes of a timm-style model, or ``None`` if it cannot be told."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; an unknown name lists the candidates."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise UnknownNameError("layer", name, [n for n in modules if n])
    return modules[name]


def has_feature_head_split(model: nn.Module) -> bool:
    """Whether the model exposes timm's ``forward_features`` / ``forward_head`` split."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


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


ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All activation modules of the model (torch's and timm's), with their names."""
    found = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, ACTIVATION_TYPES) or cls in {"Swish", "HardSwish", "HardSigmoid", "GELUTanh", "QuickGELU"}:
            found.append((name, m))
    return found


def non_relu_activations(model: nn.Module) -> list[str]:
    """Class names of the model's activation modules that are not ReLU or ReLU6."""
    return sorted({type(m).__name__ for _, m in activation_modules(model) if not isinstance(m, RELU_TYPES)})
