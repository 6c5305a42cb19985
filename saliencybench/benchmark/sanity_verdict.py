"""Sanity-check verdicts (rule 8 of :mod:`.ranking`; Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018): pass / fail / not run per (model, method), shown beside the ranks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from .ranking import _quantiles, _weights


SANITY_COLUMNS = ["model", "method", "verdict", "stage", "mean", "ci_low", "ci_high", "n", "threshold", "rule"]


def sanity_verdicts(rows: pd.DataFrame, methods: Iterable[tuple[str, str]] = (), *, threshold: float = 0.5,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Rule 8: ``pass`` / ``fail`` / ``not run`` per (model, method) of ``rows`` (columns model, method,
    image_id, stage, value: the per-image Spearman of absolute values at each cascade stage, stage 0
    the original model) and of ``methods`` ((model, method) pairs to report even without rows)."""
    need = {"model", "method", "image_id", "stage", "value"}
    if not need <= set(rows.columns):
        raise InvalidInputError(f"sanity rows need columns {sorted(need)}; missing {sorted(need - set(rows.columns))}")
    if not -1 <= threshold <= 1:
        raise InvalidInputError(f"threshold must be a rank correlation in [-1, 1], got {threshold!r}")
    groups = {k: g for k, g in rows.groupby(["model", "method"])}
    out = []
    for model, method in sorted(set(groups) | set(methods)):
        g = groups.get((model, method))
        base = {"model": model, "method": method, "threshold": threshold}
        last = g.stage.max() if g is not None and len(g) else 0
        v = g.value[g.stage == last].to_numpy(float) if g is not None else np.zeros(0)
        v = v[np.isfinite(v)]
        if last == 0 or len(v) < 2:
            out.append({**base, "verdict": "not run", "n": len(v),
                        "rule": "no values at a randomised stage (needs >= 2 images)"})
            continue
        w = _weights(f"{model}/{method}", len(v), n_boot, seed)
        lo, hi = _quantiles((w @ v / w.sum(1))[:, None], level)
        mean = float(v.mean())
        ok = mean < threshold and hi[0] < threshold
        out.append({**base, "verdict": "pass" if ok else "fail", "stage": int(last), "mean": mean,
                    "ci_low": lo[0], "ci_high": hi[0], "n": len(v),
                    "rule": f"mean and {level:.0%} CI upper bound of spearman_abs at the last stage < {threshold}"})
    return pd.DataFrame(out, columns=SANITY_COLUMNS)
