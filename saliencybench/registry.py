"""Name registries: one decorator per kind, so adding a method or metric is one file.

A :class:`Registry` maps a name to a spec object that carries the callable and its
metadata (paper, parameters with defaults, score direction). The CLI, the config
file and the leaderboard all speak these names.

:func:`check_params` validates a parameter mapping against a function's keyword-only
parameters before any work starts: unknown names (with the closest valid name),
values of the wrong type (from the annotations), NaN and infinities, and the ranges
or choices a spec declares in its ``constraints``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import InvalidInputError, UnknownNameError

T = TypeVar("T")


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Return ``{name: default}`` for the keyword-only parameters of ``fn``."""
    sig = inspect.signature(fn)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def keyword_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Type annotations of ``fn``'s keyword-only parameters (unresolvable ones are left out)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - annotations naming unavailable types: check nothing
        return {}
    names = keyword_defaults(fn)
    return {k: v for k, v in hints.items() if k in names}


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


# ---- parameter checks ----------------------------------------------------------------------

Constraint = str | tuple[Any, ...] | Callable[[Any], str | None]


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits annotation ``hint`` (int, float, bool, str, None, unions, Literal,
    tuples/lists, dicts; anything else, such as tensors, is accepted)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(any(_type_ok(v, a) for a in args) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _hint_text(hint: Any) -> str:
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "")


def _check_range(value: Any, rule: str) -> str | None:
    """``rule``: ``">=1"``, ``">0"``, ``"(0,1]"``, ``"[0,1)"`` ...; returns the problem or None."""
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    rule = rule.replace(" ", "")
    if rule[:2] in (">=", "<="):
        bound = float(rule[2:])
        ok = value >= bound if rule[0] == ">" else value <= bound
    elif rule[0] in "<>":
        bound = float(rule[1:])
        ok = value > bound if rule[0] == ">" else value < bound
    else:
        lo_s, hi_s = rule[1:-1].split(",")
        lo, hi = float(lo_s), float(hi_s)
        ok = (value >= lo if rule[0] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)
    return None if ok else f"must be {rule}"


def check_params(kind: str, name: str, params: Mapping[str, Any], fn: Callable[..., Any] | None,
                 defaults: Mapping[str, Any], constraints: Mapping[str, Constraint] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`InvalidInputError` naming the first problem in ``params`` of ``kind`` ``name``.

    ``defaults``: the valid names; ``fn``: whose annotations give the types;
    ``constraints``: per name a range rule (``">=1"``, ``"(0,1]"``), a tuple of
    choices, or a callable returning a problem text (or None); ``extra``: further
    valid names with their default (their types follow the default's).
    """
    if not isinstance(params, Mapping):
        raise InvalidInputError(f"parameters of {kind} {name!r} must be a mapping of names to values, "
                                f"got {type(params).__name__}")
    valid = {**defaults, **(extra or {})}
    hints = keyword_hints(fn) if fn is not None else {}
    for key, value in params.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInputError(f"{kind} {name!r} has no parameter {key!r}{hint}; its parameters are "
                                    f"{sorted(valid)}")
        where = f"{kind} {name!r} parameter {key!r}"
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{where} must be a finite number, got {value!r}")
        hint = hints.get(key)
        if hint is None and key in (extra or {}) and extra[key] is not None:
            hint = type(extra[key])
        if hint is not None and not _type_ok(value, hint):
            raise InvalidInputError(f"{where} must be of type {_hint_text(hint)}, got {value!r} "
                                    f"({type(value).__name__})")
        rule = (constraints or {}).get(key)
        problem = None
        if isinstance(rule, tuple):
            problem = None if value in rule else f"must be one of {list(rule)}"
        elif isinstance(rule, str):
            problem = _check_range(value, rule)
        elif callable(rule):
            problem = rule(value)
        if problem:
            raise InvalidInputError(f"{where} {problem}, got {value!r}")
