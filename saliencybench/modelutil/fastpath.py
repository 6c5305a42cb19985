"""The fast inference paths (:func:`fast_inference`: channels_last weights and inputs, batch norms
folded into convolutions) may only change the speed: each is probed against the plain model once
per model structure and input, declines with a note where it raises or differs, and can be switched
off (:func:`fast_paths`).
"""

from __future__ import annotations

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidInputError
from .core import _note, describe_error, fast_layout, is_out_of_memory, iter_tensors
from .folding import _PROBE_OUTPUT, _difference, _outputs_close, _structure_key, folded_batchnorm

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
