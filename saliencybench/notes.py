"""Notes and progress from inside a computation, without passing anything down: context variables.

Methods and the fast paths leave *notes* on how they computed a result (occlusion: incremental
or full forward passes, and why; a fast path that declined); the runner collects them with
:func:`collect_notes` and writes them into the result rows. Long loops *report progress*; the
runner turns it into an inner progress bar with :func:`progress_to`. Below every other module
(no imports from the package), so the model utilities and the methods can both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_NOTES: ContextVar[list[str] | None] = ContextVar("saliencybench_method_notes", default=None)


@contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Collect, in the yielded list, the notes methods leave inside the block about how they
    computed their heatmaps (occlusion: incremental or full forward passes, and why)."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def add_note(text: str) -> None:
    """Leave a note for an enclosing :func:`collect_notes` (none: ignored)."""
    notes = _NOTES.get()
    if notes is not None and text not in notes:
        notes.append(text)


_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("saliencybench_progress", default=None)


@contextmanager
def progress_to(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Inside the block, long loops (occlusion windows, RISE masks, perturbation steps) report
    ``callback(done, total)`` after each batch; the runner turns it into an inner progress bar."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report_progress(done: int, total: int) -> None:
    """Report progress of a long loop to an enclosing :func:`progress_to` (none: ignored)."""
    callback = _PROGRESS.get()
    if callback is not None:
        callback(done, total)


__all__ = ["collect_notes", "add_note", "progress_to", "report_progress"]
