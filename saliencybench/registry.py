"""Name registries: one decorator per kind, so adding a method or metric is one file.

A :class:`Registry` maps a name to a spec object that carries the callable and its
metadata (paper, parameters with defaults, score direction). The CLI, the config
file and the leaderboard all speak these names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Return ``{name: default}`` for the keyword-only parameters of ``fn``."""
    sig = inspect.signature(fn)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


@dataclass
class Registry(Generic[T]):
    """A name -> spec mapping for one kind of thing (``"method"``, ``"metric"`` ...)."""

    kind: str
    entries: dict[str, T] = field(default_factory=dict)

    def add(self, name: str, spec: T) -> T:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self.entries[name] = spec
        return spec

    def get(self, name: str) -> T:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.entries) from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries
