"""Fair rankings of explanation methods with confidence intervals and significance (pure: no I/O).

Inputs
------
``pools``: ``{(model, metric, method): MethodPool}``, one entry per model, metric and method: the
metric's per-image results pooled over the run's images (:class:`~saliencybench.metrics.base.Pooled`:
``values`` array[N], ``stats`` array[N,...] for data-set-level metrics, ``labels``, ``n_classes``),
the parallel ``image_ids`` (N distinct ids; methods are aligned by id, not by position) and ``note``
(``"n/a: ..."`` marks a method that does not apply). A "model" is one block of the comparison: pass
``"voc/resnet50"`` to rank over (data set, model) pairs. ``metrics``: ``{metric: MetricInfo}``
(:meth:`MetricInfo.from_spec` takes a registered ``MetricSpec`` and its params). ``pools_from_rows``
builds ``pools`` from the runner's long rows for image-level metrics.

Rules
-----
1. *Score and CI.* Per (model, metric) the methods are compared on the images every one of them was
   scored on (the intersection of their ids). The score is ``reduce(pool, params)`` (the mean for
   image-level metrics; a dict-valued reduce gives its ``score_key`` entry). The 95% CI is the
   percentile bootstrap (Efron & Tibshirani, An Introduction to the Bootstrap, 1993): ``n_boot``
   (1000) resamples of the model's image positions with replacement (``numpy.random.default_rng(
   [seed, zlib.crc32(model)])``, positions in order of first appearance), one resample per model shared by every method and metric, so all comparisons are
   paired. A metric scored on a subset of the model's images (a schedule's ``n_images``) takes the
   same resample restricted to its images (a Poisson-like bootstrap of random size).
2. *Ranks.* In the metric's direction, exact ties get the average rank (``scipy.stats.rankdata``).
3. *Rank terms.* Methods whose every value on a model is NaN with an ``n/a`` note do not apply and
   are left out of that model's ranking (reported as n/a). A ranked metric gives a rank term on a
   model only when every remaining method has it (an entry with a finite value); otherwise it is
   reported in ``missing`` and has no rank term there. Unranked metrics (diagnostics) get scores,
   per-metric ranks and tests but never a rank term.
4. *Per-metric significance.* Two-sided paired Wilcoxon signed-rank tests (Wilcoxon, Biometrics
   Bulletin 1945; ``scipy.stats.wilcoxon`` with its default ``method="auto"``) on the per-image values
   of each method against the random baseline (the method named ``baseline``, "random") and of
   each pair adjacent in rank, images with a NaN on either side dropped. ``zero_method="pratt"``
   (Pratt, JASA 1959): our metrics give many exact zero differences (binary pointing hits, IoUs
   clipped at 0, methods that coincide on some images); Pratt ranks them with the rest and then
   drops their ranks, so the images on which two methods agree still weigh against a difference,
   while ``"wilcox"`` discards them and tests only the images where the methods differ (and Pratt
   showed that discarding zeros makes the verdict non-monotone in the data). All differences zero
   gives p = 1. Data-set-level metrics (no per-image values) use the paired bootstrap of the
   difference of reduces, d_b = score_b(A) - score_b(B) on the shared resamples: p = min(1,
   2 min(#{d_b <= 0} + 1, #{d_b >= 0} + 1) / (n_boot + 1)) (Davison & Hinkley, Bootstrap Methods
   and their Application, 1997: the smallest level whose percentile interval excludes 0, with the
   +1 that keeps p > 0). The p values of one (model, metric) family (each distinct pair once) are
   Holm-corrected (Holm, Scand. J. Statistics 1979); the table reports the corrected ones.
5. *Group letters (walk-down rule).* Sort by rank; the first method gets "a"; walking down, a new
   letter starts after each adjacent pair whose corrected p < alpha (0.05) and whose ranks differ.
   Methods with equal ranks are never separated. So a group is a run of methods no adjacent test
   could separate; each method has one letter.
6. *Criteria and overall (LATEC, Klein et al., NeurIPS 2024 D&B).* A method's criterion score is the
   mean of its ranks over that criterion's rank-term metrics (each metric once); the overall score
   is the mean of its criterion scores; both are re-ranked into final ranks (average ranks for
   ties). Groups: the whole pipeline (scores, ranks, criterion means) is recomputed on every
   bootstrap resample; for two methods adjacent in the final order the share of resamples in which
   their order flips or ties (or is undefined) is a one-sided bootstrap p of the observed order;
   these are Holm-corrected over the adjacent pairs and a pair is separable when the corrected share
   < alpha; letters as in rule 5.
7. *Across models (Demsar, JMLR 2006; in :mod:`.ranking_across`).* Per criterion and overall, over the blocks (models) on
   which every compared method is ranked (methods missing on a block are dropped and noted, or
   blocks with ``incomplete="drop_blocks"``), the methods' final ranks are re-ranked within each
   block; the Friedman test (Friedman, JASA 1937; ``scipy.stats.friedmanchisquare``, tie-corrected)
   needs k >= 3 methods and N >= 2 blocks, otherwise its statistic and p are NaN and every method
   shares one group (as when p >= alpha: Demsar's post hoc runs only after the Friedman test
   rejects; a complete tie in every block gives statistic 0, p = 1). The Nemenyi critical
   difference (Nemenyi 1963) is CD = q_alpha sqrt(k(k+1)/(6N)) with q_alpha =
   ``studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)``. Two methods whose mean ranks differ by
   less than CD are not separated: each maximal run of methods (in mean-rank order) spanning less
   than CD gets a letter, a method carries the letters of every run it is in (a compact letter
   display of the bars of the CD diagram, Piepho, J. Comput. Graph. Stat. 2004).
8. *Sanity verdicts (Adebayo et al., NeurIPS 2018; in :mod:`.sanity_verdict`).* Per (model, method), at the last stage of the
   cascading randomisation (all blocks re-initialised): ``pass`` when the mean Spearman rank
   correlation of absolute values between original and randomised maps is below ``threshold``
   (0.5) and so is the upper end of its 95% percentile bootstrap CI (the similarity is
   significantly below the threshold, hence below stage 0's 1); ``fail`` otherwise; ``not run``
   when there is no value at a randomised stage (the method was not scheduled) or fewer than 2.
   0.5 is the midpoint between the original map (1) and no rank association (0): a correlation
   below it explains under a quarter of the original's rank variance; methods that fail in the paper
   (guided backprop) stay close to the original, those that pass fall towards 0, so the verdict
   does not hinge on the exact cut. The CI resamples the images with ``default_rng([seed,
   crc32("model/method")])``. Shown beside the ranks, never a rank term.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from ..metrics.base import CRITERIA, LEVELS, MetricSpec, Pooled, mean_reduce
from .ranking_stats import average_ranks, bootstrap_p, holm, walk_letters, wilcoxon_p

METRIC_COLUMNS = ["model", "method", "metric", "criterion", "score", "ci_low", "ci_high", "n", "rank", "group",
                  "p_vs_random", "p_vs_next", "p_vs_random_raw", "p_vs_next_raw", "rank_term", "note"]
RANKING_COLUMNS = ["model", "method", "criterion", "rank", "group", "score", "n_metrics", "p_vs_next", "note"]


@dataclass(frozen=True)
class MetricInfo:
    """What the ranking needs to know of a metric: direction, criterion (one of ``CRITERIA``), level
    (``"image"`` | ``"dataset"``), ``reduce(pool, params) -> float | dict``, whether it has a rank
    term, its params, and the key of the score when ``reduce`` returns a dict (default: the name)."""

    name: str
    higher_is_better: bool
    criterion: str
    level: str = "image"
    reduce: Callable[[Pooled, Mapping[str, Any]], float | dict[str, float]] = mean_reduce
    ranked: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)
    score_key: str | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise InvalidInputError(f"metric {self.name!r}: criterion {self.criterion!r} is not one of {CRITERIA}")
        if self.level not in LEVELS:
            raise InvalidInputError(f"metric {self.name!r}: level {self.level!r} is not one of {LEVELS}")

    @classmethod
    def from_spec(cls, spec: MetricSpec, params: Mapping[str, Any] | None = None) -> MetricInfo:
        """The info of a registered metric, with the params its ``reduce`` gets."""
        return cls(spec.name, spec.higher_is_better, spec.criterion, spec.level, spec.reduce, spec.ranked,
                   dict(params or {}))

    def score(self, pool: Pooled) -> float:
        """The data-set score of ``pool``: ``reduce`` (its ``score_key`` entry when it returns a dict)."""
        out = self.reduce(pool, self.params)
        if isinstance(out, Mapping):
            key = self.score_key or self.name
            if key not in out:
                raise InvalidInputError(f"metric {self.name!r}: reduce returned keys {sorted(out)}; set score_key")
            out = out[key]
        return float(out)


@dataclass
class MethodPool:
    """One (model, metric, method): the pooled results and the id of each of its N images."""

    pool: Pooled
    image_ids: Sequence[Hashable]
    note: str = ""

    def has_data(self) -> bool:
        """Whether any value (or, for data-set-level metrics, any statistic) is finite."""
        s = self.pool.stats
        return bool(np.isfinite(np.asarray(self.pool.values, float)).any()
                    or (s is not None and np.isfinite(np.asarray(s, float)).any()))

    def is_na(self) -> bool:
        """A method that does not apply: an ``n/a`` note and no finite value."""
        return self.note.startswith("n/a") and not self.has_data()


@dataclass
class Ranking:
    """Outputs of :func:`rank_methods`: ``metrics`` (per model, metric and method: score, CI, rank,
    group, p values), ``ranking`` (per model, method and criterion, "overall" included: final rank,
    group, score = mean rank, n_metrics), ``not_applicable`` (model, method, reason) and ``missing``
    (model, metric, methods: ranked metrics without a rank term on that model)."""

    metrics: pd.DataFrame
    ranking: pd.DataFrame
    not_applicable: pd.DataFrame
    missing: pd.DataFrame


def pools_from_rows(rows: pd.DataFrame, metrics: Iterable[str]) -> dict[tuple[str, str, str], MethodPool]:
    """``pools`` of image-level ``metrics`` from long rows (model, method, metric, image_id, value, note)."""
    need = {"model", "method", "metric", "image_id", "value"}
    if not need <= set(rows.columns):
        raise InvalidInputError(f"rows need columns {sorted(need)}; missing {sorted(need - set(rows.columns))}")
    out = {}
    for (model, metric, method), g in rows[rows.metric.isin(list(metrics))].groupby(["model", "metric", "method"]):
        notes = g["note"].fillna("").astype(str) if "note" in g else pd.Series([""])
        note = next((n for n in notes if n.startswith("n/a")), "")
        out[(model, metric, method)] = MethodPool(Pooled(g.value.to_numpy(float)), list(g.image_id), note)
    return out


def _check(pools: Mapping[tuple[str, str, str], MethodPool], metrics: Mapping[str, MetricInfo],
           alpha: float, n_boot: int) -> None:
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha must be in (0, 1), got {alpha!r}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidInputError(f"n_boot must be a positive integer, got {n_boot!r}")
    for key, mp in pools.items():
        if not (isinstance(key, tuple) and len(key) == 3):
            raise InvalidInputError(f"pools keys must be (model, metric, method) tuples, got {key!r}")
        if key[1] not in metrics:
            raise InvalidInputError(f"metric {key[1]!r} has pools but no MetricInfo; add it to metrics")
        n = len(mp.pool.values)
        if len(mp.image_ids) != n or len(set(mp.image_ids)) != n:
            raise InvalidInputError(f"{key}: need {n} distinct image ids, one per value, got {len(mp.image_ids)} "
                                    f"({len(set(mp.image_ids))} distinct)")
        if metrics[key[1]].level == "dataset" and (mp.pool.stats is None or len(mp.pool.stats) != n):
            raise InvalidInputError(f"{key}: a data-set-level metric needs stats array[N,...] in its pool")


def _weights(model: str, n: int, n_boot: int, seed: int) -> np.ndarray:
    """Resample counts array[n_boot, n] of the model's n image positions (rule 1)."""
    rng = np.random.default_rng([seed, zlib.crc32(str(model).encode())])
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _boot_scores(info: MetricInfo, pools: list[Pooled], w: np.ndarray) -> np.ndarray:
    """Scores array[B, M] of M aligned pools under resample counts w array[B, N].

    Fast path (image-level mean): weighted means by matrix products over the distinct value rows, so
    methods with identical values get bit-identical scores; else ``reduce`` on each resample.
    """
    if info.level == "image" and info.reduce is mean_reduce:
        v = np.stack([p.values for p in pools]).astype(float)
        ok = np.isfinite(v)
        rows, inv = np.unique(np.concatenate([np.where(ok, v, 0.0), ok], axis=1), axis=0, return_inverse=True)
        n = v.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (w @ rows[:, :n].T) / (w @ rows[:, n:].T)
        return means[:, inv.ravel()]
    out = np.empty((len(w), len(pools)))
    pos = np.arange(w.shape[1])
    for b, counts in enumerate(w.astype(int)):
        idx = np.repeat(pos, counts)
        out[b] = [info.score(p.take(idx)) if len(idx) else np.nan for p in pools]
    return out


def _align(mp: MethodPool, ids: list[Hashable]) -> Pooled:
    pos = {i: j for j, i in enumerate(mp.image_ids)}
    return mp.pool.take(np.array([pos[i] for i in ids], dtype=int))


def _quantiles(boot: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - level) / 2
    ok = np.isfinite(boot).any(0)
    lo, hi = np.full(boot.shape[1], np.nan), np.full(boot.shape[1], np.nan)
    if ok.any():
        lo[ok], hi[ok] = np.nanquantile(boot[:, ok], [a, 1 - a], axis=0)
    return lo, hi


def _metric_tests(info: MetricInfo, names: list[str], pools: list[Pooled], boot: np.ndarray, rank: np.ndarray,
                  baseline: str, alpha: float) -> dict[str, Any]:
    """Rules 4-5 for one (model, metric): raw and Holm p vs the baseline and vs the next, and letters."""
    m = len(names)
    order = sorted(range(m), key=lambda i: (rank[i], names[i]))
    pairs = [(order[i], order[i + 1]) for i in range(m - 1)]
    if baseline in names:
        r = names.index(baseline)
        pairs += [(i, r) for i in range(m) if i != r]
    family = list(dict.fromkeys(tuple(sorted(p)) for p in pairs))

    def test(i: int, j: int) -> float:
        if info.level == "image":
            return wilcoxon_p(pools[i].values, pools[j].values)
        return bootstrap_p(boot[:, i] - boot[:, j])

    raw = np.array([test(i, j) for i, j in family])
    adj = holm(raw)
    look = {p: (raw[k], adj[k]) for k, p in enumerate(family)}
    out = {k: np.full(m, np.nan) for k in ("p_vs_random_raw", "p_vs_random", "p_vs_next_raw", "p_vs_next")}
    for i, j in pairs[: m - 1]:
        out["p_vs_next_raw"][i], out["p_vs_next"][i] = look[tuple(sorted((i, j)))]
    if baseline in names:
        for i in range(m):
            if i != names.index(baseline):
                out["p_vs_random_raw"][i], out["p_vs_random"][i] = look[tuple(sorted((i, names.index(baseline))))]
    sep = [bool(out["p_vs_next"][order[i]] < alpha and rank[order[i]] != rank[order[i + 1]]) for i in range(m - 1)]
    letters = walk_letters(sep)
    out["group"] = [letters[order.index(i)] for i in range(m)]
    return out


def _aggregate(model: str, names: list[str], point: dict[str, np.ndarray], boot: dict[str, np.ndarray],
               metrics: Mapping[str, MetricInfo], alpha: float) -> list[dict[str, Any]]:
    """Rule 6 on one model: criterion and overall mean ranks, final ranks, bootstrap flip shares, letters."""
    crit: dict[str, list[str]] = {}
    for metric in point:
        crit.setdefault(metrics[metric].criterion, []).append(metric)
    if not crit:
        return []
    pm = {c: np.mean([point[x] for x in ms], 0) for c, ms in crit.items()}
    bm = {c: np.mean([boot[x] for x in ms], 0) for c, ms in crit.items()}
    count = {c: len(ms) for c, ms in crit.items()}
    cs = [c for c in CRITERIA if c in crit]
    pm["overall"], bm["overall"] = np.mean([pm[c] for c in cs], 0), np.mean([bm[c] for c in cs], 0)
    count["overall"] = len(point)
    rows = []
    for c in [*cs, "overall"]:
        final = average_ranks(pm[c], False)
        order = sorted(range(len(names)), key=lambda i: (final[i], names[i]))
        shares = [1.0 if final[u] == final[v] else float(np.mean(~(bm[c][:, u] < bm[c][:, v])))
                  for u, v in zip(order, order[1:])]
        adj = holm(shares)
        letters = walk_letters([bool(p < alpha) for p in adj])
        for pos, i in enumerate(order):
            rows.append({"model": model, "method": names[i], "criterion": c, "rank": float(final[i]),
                         "group": letters[pos], "score": float(pm[c][i]), "n_metrics": count[c],
                         "p_vs_next": float(adj[pos]) if pos < len(adj) else float("nan"), "note": ""})
    return rows


def _rank_model(model: str, entries: dict[tuple[str, str], MethodPool], metrics: Mapping[str, MetricInfo],
                baseline: str, alpha: float, n_boot: int, seed: int, level: float) -> tuple[list, list, list, list]:
    methods = sorted({m for _, m in entries})
    na = {m: next(e.note for (_, mm), e in entries.items() if mm == m) for m in methods
          if all(e.is_na() for (_, mm), e in entries.items() if mm == m)}
    ranked = [m for m in methods if m not in na]
    ids = list(dict.fromkeys(i for key in sorted(entries) for i in entries[key].image_ids))
    where = {i: j for j, i in enumerate(ids)}
    w_all = _weights(model, len(ids), n_boot, seed)
    rows: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    point: dict[str, np.ndarray] = {}
    boot_ranks: dict[str, np.ndarray] = {}
    for metric in sorted({k for k, _ in entries}):
        info = metrics[metric]
        base = {"model": model, "metric": metric, "criterion": info.criterion}
        rows += [{**base, "method": m, "n": 0, "rank_term": False, "note": na[m]} for m in na if (metric, m) in entries]
        have = [m for m in ranked if (metric, m) in entries and entries[metric, m].has_data()]
        if not have:
            missing += [{**base, "methods": ", ".join(ranked)}] if info.ranked and ranked else []
            continue
        common = set.intersection(*(set(entries[metric, m].image_ids) for m in have))
        cids = [i for i in ids if i in common]
        pools = [_align(entries[metric, m], cids) for m in have]
        score = np.array([info.score(p) for p in pools])
        boot = _boot_scores(info, pools, w_all[:, [where[i] for i in cids]])
        lo, hi = _quantiles(boot, level)
        lacking = [m for m in ranked if m not in have or not np.isfinite(score[have.index(m)])]
        if lacking and info.ranked:
            missing.append({**base, "methods": ", ".join(lacking)})
        res: dict[str, Any] = {k: np.full(len(have), np.nan) for k in METRIC_COLUMNS[10:14]}
        rank, res["group"] = np.full(len(have), np.nan), [""] * len(have)
        if not lacking:
            rank = average_ranks(score, info.higher_is_better)
            res = _metric_tests(info, have, pools, boot, rank, baseline, alpha)
            if info.ranked:
                point[metric], boot_ranks[metric] = rank, average_ranks(boot, info.higher_is_better)
        note = "" if not lacking else f"no rank term: missing for {', '.join(lacking)}"
        for i, m in enumerate(have):
            n = int(np.isfinite(pools[i].values).sum()) if info.level == "image" else len(cids)
            rows.append({**base, "method": m, "score": score[i], "ci_low": lo[i], "ci_high": hi[i], "n": n,
                         "rank": rank[i], "group": res["group"][i], "rank_term": bool(info.ranked and not lacking),
                         "note": note, **{k: res[k][i] for k in METRIC_COLUMNS[10:14]}})
    ranking = _aggregate(model, ranked, point, boot_ranks, metrics, alpha)
    ranking += [{"model": model, "method": m, "criterion": "overall", "group": "n/a", "n_metrics": 0, "note": r}
                for m, r in na.items()]
    return rows, ranking, [{"model": model, "method": m, "reason": r} for m, r in na.items()], missing


def rank_methods(pools: Mapping[tuple[str, str, str], MethodPool], metrics: Mapping[str, MetricInfo], *,
                 baseline: str = "random", alpha: float = 0.05, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Ranking:
    """Rules 1-6 of this module on every model of ``pools`` ``{(model, metric, method): MethodPool}``.

    ``metrics``: ``{metric: MetricInfo}``; ``baseline``: the method every other one is tested against
    (absent: no such tests); ``alpha``: the level of every group; ``n_boot`` resamples seeded by ``seed``
    and the model name; ``level``: of the CIs. Returns a :class:`Ranking`.
    """
    _check(pools, metrics, alpha, n_boot)
    if not 0 < level < 1:
        raise InvalidInputError(f"level must be in (0, 1), got {level!r}")
    out: tuple[list, list, list, list] = ([], [], [], [])
    for model in sorted({k[0] for k in pools}, key=str):
        entries = {(k[1], k[2]): v for k, v in pools.items() if k[0] == model}
        for acc, part in zip(out, _rank_model(model, entries, metrics, baseline, alpha, n_boot, seed, level)):
            acc += part
    return Ranking(pd.DataFrame(out[0], columns=METRIC_COLUMNS), pd.DataFrame(out[1], columns=RANKING_COLUMNS),
                   pd.DataFrame(out[2], columns=["model", "method", "reason"]),
                   pd.DataFrame(out[3], columns=["model", "metric", "criterion", "methods"]))
