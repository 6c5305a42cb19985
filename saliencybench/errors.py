"""Exceptions raised by saliencybench.

Every error names the problem and, where one exists, the fix. All derive from
:class:`SaliencyBenchError` (itself a :class:`ValueError`) so callers and the CLI
can catch the whole family at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SaliencyBenchError(ValueError):
    """Base class of every error saliencybench raises on bad input."""


class UnknownNameError(SaliencyBenchError, KeyError):
    """A method, metric, data set, model or layer name that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = valid if len(valid) <= 40 else valid[:40] + [f"... ({len(valid) - 40} more)"]
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(shown)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]

    def __reduce__(self) -> tuple:  # picklable (worker processes send errors back to the parent)
        return (type(self), (self.kind, self.name, self.valid))


class NotApplicableError(SaliencyBenchError):
    """A method that cannot be applied to this model (for example CAM without GAP+FC)."""


class InvalidInputError(SaliencyBenchError):
    """Images, targets, heatmaps, masks or boxes of the wrong type, shape or value."""


class NotGuidedRuleWarning(UserWarning):
    """Guided backprop ran on a model whose activations are not all ReLU-family."""


class ConstantHeatmapWarning(UserWarning):
    """A heatmap without a unique maximum or without positive mass."""


class BoxClippedWarning(UserWarning):
    """A ground-truth box reached outside its image and was clipped to it."""
