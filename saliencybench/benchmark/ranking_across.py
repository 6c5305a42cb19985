"""Rankings across models and data sets (rule 7 of :mod:`.ranking`): the Friedman test and the
Nemenyi critical difference (Demsar, "Statistical Comparisons of Classifiers over Multiple Data
Sets", JMLR 2006), with compact letters from the critical-difference bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import InvalidInputError
from ..metrics.base import CRITERIA
from .ranking_stats import letter


def interval_letters(mean_ranks: Sequence[float], cd: float) -> list[str]:
    """Rule 7: letters of methods sorted by mean rank; each maximal run spanning < ``cd`` gets one."""
    r = np.asarray(mean_ranks, dtype=float)
    ends = [int(np.searchsorted(r, x + cd, side="left")) - 1 for x in r]
    out = [""] * len(r)
    k, last = 0, -1
    for i, j in enumerate(ends):
        if j > last:
            for m in range(i, j + 1):
                out[m] += letter(k)
            k, last = k + 1, j
    return out


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of k methods over n blocks (Demsar, JMLR 2006)."""
    if k < 2 or n < 1:
        return float("nan")
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n)))


ACROSS_COLUMNS = ["method", "criterion", "mean_rank", "group", "friedman_stat", "friedman_p", "cd", "k", "n_blocks",
                  "note"]


def friedman(ranks: np.ndarray) -> tuple[float, float]:
    """Friedman statistic and p of a rank matrix array[N blocks, k methods] (scipy; NaN when k < 3 or
    N < 2; 0 and 1 when every block is one complete tie)."""
    n, k = ranks.shape
    if k < 3 or n < 2:
        return float("nan"), float("nan")
    if np.all(ranks == ranks[:, :1]):
        return 0.0, 1.0
    res = stats.friedmanchisquare(*ranks.T)
    return float(res.statistic), float(res.pvalue)


def across_models(ranking: pd.DataFrame, *, alpha: float = 0.05, incomplete: str = "drop_methods") -> pd.DataFrame:
    """Rule 7: per criterion (and "overall") of a ``ranking`` table (model, method, criterion, rank),
    the methods' mean ranks over the blocks (models), Friedman statistic and p, Nemenyi CD and groups.

    ``incomplete``: ``"drop_methods"`` (methods not ranked on every block are left out, with a note)
    or ``"drop_blocks"`` (blocks lacking a method are left out). Columns: :data:`ACROSS_COLUMNS`.
    """
    if incomplete not in ("drop_methods", "drop_blocks"):
        raise InvalidInputError(f"incomplete must be 'drop_methods' or 'drop_blocks', got {incomplete!r}")
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must be in (0, 1), got {alpha!r}")
    rows = []
    present = set(ranking.criterion)
    for crit in [c for c in (*CRITERIA, "overall") if c in present]:
        t = ranking[ranking.criterion == crit].pivot(index="model", columns="method", values="rank")
        t = t.dropna(axis=0, how="all")
        t = t.dropna(axis=1) if incomplete == "drop_methods" else t.dropna(axis=0)
        dropped = sorted(set(ranking.loc[ranking.criterion == crit, "method"]) - set(t.columns))
        r = stats.rankdata(t.to_numpy(float), axis=1) if t.size else np.zeros((0, 0))
        n, k = r.shape
        stat, p = friedman(r)
        cd = nemenyi_cd(k, n, alpha)
        mean = r.mean(0) if n else np.zeros(0)
        order = np.argsort(mean, kind="stable")
        letters = interval_letters(mean[order], cd) if p < alpha else ["a"] * k
        note = "" if np.isfinite(p) else "Friedman needs >= 3 methods and >= 2 blocks: one group"
        base = {"criterion": crit, "friedman_stat": stat, "friedman_p": p, "cd": cd, "k": k, "n_blocks": n}
        rows += [{**base, "method": t.columns[i], "mean_rank": float(mean[i]), "group": letters[j], "note": note}
                 for j, i in enumerate(order)]
        rows += [{**base, "method": m, "mean_rank": float("nan"), "group": "",
                  "note": "not ranked on every block: left out"} for m in dropped]
    return pd.DataFrame(rows, columns=ACROSS_COLUMNS)
