"""The statistics behind :mod:`.ranking`'s rules (pure functions of arrays): Holm's step-down
adjustment, average ranks, group letters, and the paired Wilcoxon and bootstrap p values.
The rules they serve, with their papers, are in :mod:`.ranking`'s docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["average_ranks", "bootstrap_p", "holm", "letter", "walk_letters", "wilcoxon_p"]


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p values of one family: array like ``p`` (NaN kept, not counted)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def average_ranks(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks (1 = best) along the last axis, exact ties averaged; a row with a NaN is all NaN."""
    s = np.asarray(scores, dtype=float)
    return stats.rankdata(-s if higher_is_better else s, method="average", axis=-1, nan_policy="propagate")


def letter(i: int) -> str:
    """The i-th group letter: a..z, then aa, ab, ..."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(97 + r) + s
    return s


def walk_letters(separated: Sequence[bool]) -> list[str]:
    """Rule 5: letters of len(separated)+1 methods in rank order; a new letter after each separated pair."""
    out, k = [letter(0)], 0
    for sep in separated:
        k += bool(sep)
        out.append(letter(k))
    return out


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p of arrays[N] (Pratt zeros; NaN pairs dropped; all equal: 1)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    if not d.any():
        return 1.0
    return float(stats.wilcoxon(d, zero_method="pratt", alternative="two-sided").pvalue)


def bootstrap_p(diff: np.ndarray) -> float:
    """Two-sided paired bootstrap p of differences array[B] (rule 4); NaN resamples dropped."""
    d = np.asarray(diff, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    return float(min(1.0, 2 * min((d <= 0).sum() + 1, (d >= 0).sum() + 1) / (len(d) + 1)))
