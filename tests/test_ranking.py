"""Rankings with significance (saliencybench.benchmark.ranking) and the CD diagram, on hand-made pools."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats

from saliencybench.benchmark.cd_diagram import cd_diagram
from saliencybench.benchmark.ranking import (
    MethodPool, MetricInfo, bootstrap_p, holm, pools_from_rows, rank_methods, walk_letters,
)
from saliencybench.benchmark.ranking_across import across_models, friedman, interval_letters, nemenyi_cd
from saliencybench.benchmark.sanity_verdict import sanity_verdicts
from saliencybench.errors import InvalidInputError
from saliencybench.metrics.base import Pooled, get_metric, mean_reduce

N = 48
IDS = [f"img{i}" for i in range(N)]


def pools_of(values: dict[tuple[str, str, str], np.ndarray], notes: dict | None = None) -> dict:
    return {k: MethodPool(Pooled(np.asarray(v, float)), IDS[: len(v)], (notes or {}).get(k, ""))
            for k, v in values.items()}


def noisy(seed: int, shift: float, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, n)


def hand_holm(p: list[float]) -> np.ndarray:
    """Holm 1979 from its definition: the i-th smallest p times (m - i + 1), running max, capped at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    adj, run = np.zeros(len(p)), 0.0
    for pos, i in enumerate(order):
        run = max(run, min(1.0, (len(p) - pos) * p[i]))
        adj[i] = run
    return adj


def test_identical_methods_share_rank_and_group_everywhere():
    base = {m: noisy(s, 0.1 * s) for s, m in enumerate(["random", "saliency", "cam", "smoothgrad"])}
    base["gradcam"] = base["cam"].copy()
    metrics = {"d": MetricInfo("d", True, "faithfulness"), "p": MetricInfo("p", False, "localisation")}
    values = {(model, metric, m): (v + 0.01 * j if metric == "d" else -v)
              for model in ("a", "b", "c") for j, metric in enumerate(metrics) for m, v in base.items()}
    r = rank_methods(pools_of(values), metrics, n_boot=200)
    for key, g in r.metrics.groupby(["model", "metric"]):
        cam, grad = g.set_index("method").loc["cam"], g.set_index("method").loc["gradcam"]
        assert cam["rank"] == grad["rank"] and cam["rank"] % 1 == 0.5  # average of two tied ranks
        assert cam.group == grad.group and cam.ci_low == grad.ci_low and cam.ci_high == grad.ci_high
    for _, g in r.ranking.groupby(["model", "criterion"]):
        g = g.set_index("method")
        assert g.loc["cam", "rank"] == g.loc["gradcam", "rank"] and g.loc["cam", "group"] == g.loc["gradcam", "group"]
    a = across_models(r.ranking).set_index(["criterion", "method"])
    assert a.loc[("overall", "cam"), "mean_rank"] == a.loc[("overall", "gradcam"), "mean_rank"]
    assert a.loc[("overall", "cam"), "group"] == a.loc[("overall", "gradcam"), "group"]


def test_clearly_better_method_gets_its_own_group():
    metrics = {f"m{j}": MetricInfo(f"m{j}", True, "faithfulness") for j in range(3)}
    values = {("a", metric, m): noisy(10 * j + s, 5.0 if m == "best" else 0.0)
              for j, metric in enumerate(metrics) for s, m in enumerate(["best", "random", "x", "y"])}
    r = rank_methods(pools_of(values), metrics, n_boot=500)
    for _, g in r.metrics.groupby("metric"):
        g = g.set_index("method")
        assert g.loc["best", "rank"] == 1 and g.loc["best", "p_vs_next"] < 1e-6 and g.loc["best", "p_vs_random"] < 1e-6
        assert list(g.group[g.index != "best"]).count(g.loc["best", "group"]) == 0
    overall = r.ranking[r.ranking.criterion == "overall"].set_index("method")
    assert overall.loc["best", "rank"] == 1 and overall.loc["best", "group"] == "a"
    assert set(overall.group.drop("best")) == {"b"}  # the three noise methods cannot be separated
    assert overall.loc["best", "p_vs_next"] == 0.0


def test_bootstrap_ci_contains_mean_is_seeded_and_follows_the_documented_resampling():
    values = {("m", "d", meth): noisy(s, s * 0.2) for s, meth in enumerate(["random", "u", "v"])}
    metrics = {"d": MetricInfo("d", True, "faithfulness")}
    r1 = rank_methods(pools_of(values), metrics, n_boot=300, seed=7)
    r2 = rank_methods(pools_of(values), metrics, n_boot=300, seed=7)
    r3 = rank_methods(pools_of(values), metrics, n_boot=300, seed=8)
    pd.testing.assert_frame_equal(r1.metrics, r2.metrics)
    assert not np.allclose(r1.metrics.ci_low, r3.metrics.ci_low)
    t = r1.metrics.set_index("method")
    assert ((t.ci_low < t.score) & (t.score < t.ci_high)).all()
    rng = np.random.default_rng([7, zlib.crc32(b"m")])  # one resample per model, shared by the methods
    idx = rng.integers(0, N, size=(300, N))
    for meth in ("random", "u", "v"):
        v = values[("m", "d", meth)]
        means = v[idx].mean(1)
        assert t.loc[meth, "score"] == pytest.approx(v.mean())
        assert t.loc[meth, "ci_low"] == pytest.approx(np.quantile(means, 0.025), abs=1e-12)
        assert t.loc[meth, "ci_high"] == pytest.approx(np.quantile(means, 0.975), abs=1e-12)


def test_fast_mean_path_equals_the_plain_reduce_path_with_nans():
    values = {("m", "d", meth): noisy(s, s * 0.2) for s, meth in enumerate(["random", "u", "v"])}
    values[("m", "d", "u")][[3, 9, 20]] = np.nan
    fast = rank_methods(pools_of(values), {"d": MetricInfo("d", True, "faithfulness")}, n_boot=200)
    slow_info = MetricInfo("d", True, "faithfulness", reduce=lambda p, params: mean_reduce(p, params))
    slow = rank_methods(pools_of(values), {"d": slow_info}, n_boot=200)
    for col in ("score", "ci_low", "ci_high", "rank", "p_vs_random", "p_vs_next"):
        np.testing.assert_allclose(fast.metrics[col], slow.metrics[col], rtol=0, atol=1e-12)
    assert fast.metrics.set_index("method").loc["u", "n"] == N - 3


def test_missing_metric_has_no_rank_term_and_is_reported():
    metrics = {"d": MetricInfo("d", True, "faithfulness"), "e": MetricInfo("e", True, "faithfulness")}
    values = {("a", metric, m): noisy(7 * j + s, s) for j, metric in enumerate(metrics)
              for s, m in enumerate(["random", "u", "v"])}
    del values[("a", "e", "v")]
    r = rank_methods(pools_of(values), metrics, n_boot=100)
    assert list(r.missing.metric) == ["e"] and r.missing.methods.iloc[0] == "v"
    e = r.metrics[r.metrics.metric == "e"]
    assert e["rank"].isna().all() and not e.rank_term.any() and e.note.str.contains("missing for v").all()
    overall = r.ranking[r.ranking.criterion == "overall"].set_index("method")
    assert (overall.n_metrics == 1).all()
    d = r.metrics[r.metrics.metric == "d"].set_index("method")
    np.testing.assert_array_equal(overall.loc[d.index, "score"], d["rank"])


def test_not_applicable_method_is_excluded_and_reported():
    metrics = {"d": MetricInfo("d", True, "faithfulness")}
    values = {("a", "d", m): noisy(s, s) for s, m in enumerate(["random", "u", "v"])}
    values[("a", "d", "cam")] = np.full(N, np.nan)
    r = rank_methods(pools_of(values, {("a", "d", "cam"): "n/a: no GAP + FC head"}), metrics, n_boot=100)
    assert r.not_applicable.to_dict("records") == [{"model": "a", "method": "cam", "reason": "n/a: no GAP + FC head"}]
    d = r.metrics.set_index("method")
    assert sorted(d["rank"].dropna()) == [1, 2, 3] and np.isnan(d.loc["cam", "rank"])
    cam = r.ranking[r.ranking.method == "cam"]
    assert list(cam.group) == ["n/a"] and cam["rank"].isna().all()
    assert r.missing.empty


def test_criteria_aggregation_by_hand():
    # 3 methods, 3 metrics: f1 and f2 (faithfulness, higher better), l1 (localisation, lower better)
    shifts = {"f1": {"u": 3, "v": 2, "w": 1}, "f2": {"u": 1, "v": 3, "w": 2}, "l1": {"u": 1, "v": 2, "w": 3}}
    metrics = {"f1": MetricInfo("f1", True, "faithfulness"), "f2": MetricInfo("f2", True, "faithfulness"),
               "l1": MetricInfo("l1", False, "localisation")}
    values = {("a", metric, m): np.full(N, float(s)) + np.linspace(0, 0.1, N) for metric, d in shifts.items()
              for m, s in d.items()}
    r = rank_methods(pools_of(values), metrics, n_boot=100, baseline="none")
    t = r.ranking.set_index(["criterion", "method"])
    # per-metric ranks: f1 u1 v2 w3; f2 v1 w2 u3; l1 u1 v2 w3
    faith = {"u": (1 + 3) / 2, "v": (2 + 1) / 2, "w": (3 + 2) / 2}
    loc = {"u": 1.0, "v": 2.0, "w": 3.0}
    for m in "uvw":
        assert t.loc[("faithfulness", m), "score"] == faith[m]
        assert t.loc[("localisation", m), "score"] == loc[m]
        assert t.loc[("overall", m), "score"] == (faith[m] + loc[m]) / 2
    assert [t.loc[("faithfulness", m), "rank"] for m in "uvw"] == [2.0, 1.0, 3.0]
    assert [t.loc[("overall", m), "rank"] for m in "uvw"] == [1.0, 2.0, 3.0]  # 1.5, 1.75, 2.75
    assert (t.loc["overall", "n_metrics"] == 3).all() and (t.loc["faithfulness", "n_metrics"] == 2).all()


def test_pipeline_bootstrap_and_subset_metric_match_a_slow_reference():
    """Rule 6 re-done the slow way: per resample, metric means (a metric on 8 of the 48 images takes the
    resampled positions that fall in its images), ranks, criterion means, flip shares, Holm."""
    names = ["random", "u", "v", "w"]
    metrics = {"f1": MetricInfo("f1", True, "faithfulness"), "f2": MetricInfo("f2", False, "faithfulness"),
               "l1": MetricInfo("l1", True, "localisation")}
    values = {("a", metric, m): noisy(10 * j + s, 0.25 * s * (1 if metric != "f2" else -1), 8 if metric == "l1" else N)
              for j, metric in enumerate(metrics) for s, m in enumerate(names)}
    r = rank_methods(pools_of(values), metrics, n_boot=400, seed=3)
    idx = np.random.default_rng([3, zlib.crc32(b"a")]).integers(0, N, size=(400, N))
    boot_rank = {}
    for metric, info in metrics.items():
        v = np.stack([values[("a", metric, m)] for m in names])  # [M, n]
        means = np.array([[row[i[i < v.shape[1]]].mean() for row in v] for i in idx])  # [B, M]
        lo, hi = np.quantile(means, [0.025, 0.975], axis=0)
        t = r.metrics[r.metrics.metric == metric].set_index("method").loc[names]
        np.testing.assert_allclose(t.ci_low, lo, atol=1e-12)
        np.testing.assert_allclose(t.ci_high, hi, atol=1e-12)
        boot_rank[metric] = np.array([stats.rankdata(-x if info.higher_is_better else x) for x in means])
    crit = {"faithfulness": (boot_rank["f1"] + boot_rank["f2"]) / 2, "localisation": boot_rank["l1"]}
    crit["overall"] = (crit["faithfulness"] + crit["localisation"]) / 2
    for c, b in crit.items():
        t = r.ranking[r.ranking.criterion == c].set_index("method").sort_values("rank")
        pos = [names.index(m) for m in t.index]
        shares = [np.mean(b[:, i] >= b[:, j]) for i, j in zip(pos, pos[1:])]
        np.testing.assert_allclose(t.p_vs_next.iloc[:-1], hand_holm(shares), atol=1e-12)
    assert (r.metrics[r.metrics.metric == "l1"].n == 8).all()


def test_wilcoxon_and_holm_equal_direct_computations():
    names = ["random", "u", "v", "w"]
    vals = {m: noisy(s, 0.3 * s) for s, m in enumerate(names)}
    vals["w"] = np.round(vals["w"], 1)
    vals["v"][:10] = vals["random"][:10]  # zero differences: Pratt's treatment
    r = rank_methods(pools_of({("a", "d", m): v for m, v in vals.items()}), {"d": MetricInfo("d", True, "faithfulness")},
                     n_boot=100)
    t = r.metrics.set_index("method")
    order = list(t.sort_values("rank").index)
    family = sorted({tuple(sorted(p)) for p in [*zip(order, order[1:]), *[(m, "random") for m in names[1:]]]})
    raw = [stats.wilcoxon(vals[a] - vals[b], zero_method="pratt").pvalue for a, b in family]
    adj = dict(zip(family, hand_holm(raw)))
    np.testing.assert_allclose(holm(raw), hand_holm(raw), atol=1e-15)
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:  # the hand Holm above is the reference then
        multipletests = None
    if multipletests is not None:
        np.testing.assert_allclose(holm(raw), multipletests(raw, method="holm")[1], atol=1e-12)
    for m in names[1:]:
        key = tuple(sorted((m, "random")))
        assert t.loc[m, "p_vs_random_raw"] == pytest.approx(raw[family.index(key)], abs=1e-14)
        assert t.loc[m, "p_vs_random"] == pytest.approx(adj[key], abs=1e-14)
    for a, b in zip(order, order[1:]):
        assert t.loc[a, "p_vs_next"] == pytest.approx(adj[tuple(sorted((a, b)))], abs=1e-14)


def test_letters_rules():
    assert walk_letters([False, True, False, True]) == ["a", "a", "b", "b", "c"]
    assert walk_letters([True] * 27)[-1] == "ab"
    # mean ranks 1, 1.5, 2.6, 3, 5 with CD 1.2: runs {1,1.5}, {1.5,2.6}, {2.6,3}, {5}
    assert interval_letters([1, 1.5, 2.6, 3, 5], 1.2) == ["a", "ab", "bc", "c", "d"]
    assert interval_letters([1, 2, 3], 10) == ["a", "a", "a"]
    assert bootstrap_p(np.zeros(99)) == 1.0 and bootstrap_p(np.ones(99)) == pytest.approx(0.02)


def test_friedman_and_nemenyi_against_scipy_demsar_and_peers():
    demsar_q05 = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]  # Demsar 2006, Table 5(a)
    demsar_q10 = [1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920]  # Table 5(b)
    for k, q05, q10 in zip(range(2, 11), demsar_q05, demsar_q10):
        assert nemenyi_cd(k, 1, 0.05) / np.sqrt(k * (k + 1) / 6) == pytest.approx(q05, abs=1e-3)
        assert nemenyi_cd(k, 1, 0.10) / np.sqrt(k * (k + 1) / 6) == pytest.approx(q10, abs=1e-3)
    rng = np.random.default_rng(3)
    k, n = 6, 8
    ranks = np.stack([stats.rankdata(np.arange(k) * 0.8 + rng.normal(0, 1.5, k)) for _ in range(n)])
    rows = [{"model": f"b{i}", "method": f"m{j}", "criterion": "overall", "rank": ranks[i, j]}
            for i in range(n) for j in range(k)]
    a = across_models(pd.DataFrame(rows))
    ref = stats.friedmanchisquare(*ranks.T)
    assert a.friedman_stat.iloc[0] == pytest.approx(ref.statistic) and a.friedman_p.iloc[0] == pytest.approx(ref.pvalue)
    mean = ranks.mean(0)  # Demsar's chi2_F (no ties): 12N/(k(k+1)) (sum R_j^2 - k(k+1)^2/4)
    assert friedman(ranks)[0] == pytest.approx(12 * n / (k * (k + 1)) * ((mean**2).sum() - k * (k + 1) ** 2 / 4))
    cd = a.cd.iloc[0]
    assert cd == pytest.approx(stats.studentized_range.ppf(0.95, k, np.inf) / np.sqrt(2) * np.sqrt(k * (k + 1) / (6 * n)))
    try:  # peer checks: autorank's CD (statsmodels' qsturng), scikit-posthocs' Nemenyi p values
        from autorank._util import _critical_distance
        import scikit_posthocs as sp
    except ImportError:
        _critical_distance = sp = None
    if sp is not None:
        assert cd == pytest.approx(_critical_distance(0.05, k, n), abs=2e-3)
        p = sp.posthoc_nemenyi_friedman(ranks).to_numpy()
        for i, j in itertools.combinations(range(k), 2):
            if abs(abs(mean[i] - mean[j]) - cd) > 0.05:
                assert (p[i, j] < 0.05) == (abs(mean[i] - mean[j]) >= cd)
    t = a.set_index("method")
    for i, j in itertools.combinations(range(k), 2):  # same letter exactly when closer than CD
        share = bool(set(t.loc[f"m{i}", "group"]) & set(t.loc[f"m{j}", "group"]))
        assert share == (abs(mean[i] - mean[j]) < cd)


def test_across_models_small_cases_and_missing_methods():
    rows = [{"model": b, "method": m, "criterion": "overall", "rank": r}
            for b in ("x", "y") for m, r in (("u", 1.0), ("v", 2.0))]
    a = across_models(pd.DataFrame(rows))
    assert a.friedman_p.isna().all() and list(a.group) == ["a", "a"] and a.note.str.contains(">= 3 methods").all()
    rows = [{"model": b, "method": m, "criterion": "overall", "rank": r}
            for b in ("x", "y", "z") for m, r in (("u", 1.0), ("v", 2.0), ("w", 3.0))]
    rows.append({"model": "x", "method": "cam", "criterion": "overall", "rank": 4.0})
    a = across_models(pd.DataFrame(rows)).set_index("method")
    assert np.isnan(a.loc["cam", "mean_rank"]) and "left out" in a.loc["cam", "note"]
    assert list(a.loc[["u", "v", "w"], "mean_rank"]) == [1.0, 2.0, 3.0] and (a.n_blocks == 3).all()
    b = across_models(pd.DataFrame(rows), incomplete="drop_blocks").set_index("method")
    assert (b.n_blocks == 1).all() and b.loc["cam", "mean_rank"] == 4.0


def test_dataset_level_metric_with_custom_reduce():
    # MaxBoxAcc-like: stats[N, T] per-threshold hits; score = max over thresholds of the mean hit rate
    def reduce(pool: Pooled, params: dict) -> dict:
        acc = pool.stats.mean(0)
        return {"maxacc": float(acc.max()), "best_t": float(acc.argmax())}

    rng = np.random.default_rng(0)
    stats_of = {"random": rng.random((N, 5)) < 0.3, "good": rng.random((N, 5)) < np.array([.4, .9, .95, .9, .5])}
    stats_of["good2"] = stats_of["good"].copy()
    info = MetricInfo("maxacc", True, "localisation", level="dataset", reduce=reduce, score_key="maxacc")
    pools = {("a", "maxacc", m): MethodPool(Pooled(np.full(N, np.nan), s.astype(float)), IDS)
             for m, s in stats_of.items()}
    r = rank_methods(pools, {"maxacc": info}, n_boot=300, seed=1)
    t = r.metrics.set_index("method")
    assert t.loc["good", "score"] == pytest.approx(stats_of["good"].mean(0).max()) and t.loc["good", "n"] == N
    assert t.loc["good", "rank"] == t.loc["good2", "rank"] == 1.5 and t.loc["good", "group"] == t.loc["good2", "group"]
    assert t.loc["random", "group"] != t.loc["good", "group"]
    rng = np.random.default_rng([1, zlib.crc32(b"a")])
    idx = rng.integers(0, N, size=(300, N))
    boot = {m: np.array([s[i].mean(0).max() for i in idx]) for m, s in stats_of.items()}
    d = boot["good"] - boot["random"]
    p = min(1, 2 * min((d <= 0).sum() + 1, (d >= 0).sum() + 1) / 301)
    assert t.loc["good", "p_vs_random_raw"] == pytest.approx(p)
    assert t.loc["good", "ci_high"] == pytest.approx(np.quantile(boot["good"], 0.975))


def test_sanity_verdicts_pass_fail_not_run():
    rng = np.random.default_rng(0)
    rows = []
    for method, last in (("gradcam", 0.1), ("guided_backprop", 0.85), ("borderline", 0.45)):
        for stage in range(4):
            v = np.ones(8) if stage == 0 else np.clip(rng.normal(last if stage == 3 else 0.7, 0.25, 8), -1, 1)
            rows += [{"model": "r", "method": method, "image_id": i, "stage": stage, "value": x} for i, x in enumerate(v)]
    rows += [{"model": "r", "method": "lime", "image_id": i, "stage": 0, "value": 1.0} for i in range(8)]
    v = sanity_verdicts(pd.DataFrame(rows), [("r", "occlusion")]).set_index("method")
    assert v.loc["gradcam", "verdict"] == "pass" and v.loc["guided_backprop", "verdict"] == "fail"
    assert v.loc["lime", "verdict"] == "not run" and v.loc["occlusion", "verdict"] == "not run"
    b = v.loc["borderline"]
    assert b.verdict == ("pass" if b.ci_high < 0.5 and b["mean"] < 0.5 else "fail") and b.stage == 3
    assert v.loc["gradcam", "ci_low"] <= v.loc["gradcam", "mean"] <= v.loc["gradcam", "ci_high"] < 0.5


def test_bad_inputs_name_the_problem():
    metrics = {"d": MetricInfo("d", True, "faithfulness")}
    with pytest.raises(InvalidInputError, match="distinct image ids"):
        rank_methods({("a", "d", "u"): MethodPool(Pooled(np.zeros(3)), ["x", "x", "y"])}, metrics)
    with pytest.raises(InvalidInputError, match="no MetricInfo"):
        rank_methods({("a", "zz", "u"): MethodPool(Pooled(np.zeros(3)), ["x", "y", "z"])}, metrics)
    with pytest.raises(InvalidInputError, match="alpha"):
        rank_methods({}, metrics, alpha=1.5)
    with pytest.raises(InvalidInputError, match="stats"):
        rank_methods({("a", "q", "u"): MethodPool(Pooled(np.zeros(3)), ["x", "y", "z"])},
                     {"q": MetricInfo("q", True, "localisation", level="dataset", reduce=mean_reduce)})
    with pytest.raises(InvalidInputError, match="criterion"):
        MetricInfo("d", True, "speed")
    with pytest.raises(InvalidInputError, match="incomplete"):
        across_models(pd.DataFrame(columns=["model", "method", "criterion", "rank"]), incomplete="x")
    with pytest.raises(InvalidInputError, match="columns"):
        sanity_verdicts(pd.DataFrame({"model": []}))


def test_pools_from_rows_and_metric_spec():
    rows = pd.DataFrame([{"model": "a", "method": m, "metric": "deletion", "image_id": i, "value": float(i + j),
                          "note": "n/a: x" if m == "cam" else ""} for j, m in enumerate(["u", "cam"]) for i in range(4)])
    rows.loc[rows.method == "cam", "value"] = np.nan
    pools = pools_from_rows(rows, ["deletion"])
    assert pools[("a", "deletion", "cam")].is_na() and not pools[("a", "deletion", "u")].is_na()
    info = MetricInfo.from_spec(get_metric("deletion"))
    assert not info.higher_is_better and info.criterion == get_metric("deletion").criterion
    r = rank_methods(pools, {"deletion": info}, n_boot=50)
    assert list(r.not_applicable.method) == ["cam"]


def test_default_sizes_run_quickly():
    """14 methods x 10 metrics x 48 images, 1000 resamples: must finish (kept fast by vectorising)."""
    methods = ["random", *[f"m{i}" for i in range(13)]]
    crits = ["faithfulness"] * 4 + ["localisation"] * 3 + ["robustness", "complexity", "model_use"]
    metrics = {f"x{j}": MetricInfo(f"x{j}", j % 2 == 0, crits[j]) for j in range(10)}
    values = {("a", f"x{j}", m): noisy(100 * j + i, 0.1 * i) for j in range(10) for i, m in enumerate(methods)}
    r = rank_methods(pools_of(values), metrics)
    assert len(r.metrics) == 140 and set(r.ranking.criterion) == {*crits, "overall"}
    assert r.ranking.groupby("criterion").size().eq(14).all()


def test_cd_diagram_labels_never_overlap():
    names = ["gradcam", "cam", "saliency", "guided_backprop", "integrated_gradients", "smoothgrad", "random",
             "occlusion", "rise", "lime", "scorecam", "gradcam_plus_plus", "deconvnet", "input_x_gradient"]
    rng = np.random.default_rng(1)
    rows = []
    for b in range(5):
        r = stats.rankdata(np.arange(14) * 0.5 + rng.normal(0, 1, 14))
        rows += [{"model": f"b{b}", "method": m, "criterion": "overall", "rank": x} for m, x in zip(names, r)]
    a = across_models(pd.DataFrame(rows))
    fig = cd_diagram(a, "overall")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in fig.axes[0].texts]
    boxes = [t.get_window_extent(renderer) for t in texts]
    fig_box = fig.bbox
    for b in boxes:  # inside the figure
        assert b.x0 >= fig_box.x0 - 1 and b.x1 <= fig_box.x1 + 1 and b.y0 >= fig_box.y0 - 1 and b.y1 <= fig_box.y1 + 1
    for (t1, b1), (t2, b2) in itertools.combinations(zip(texts, boxes), 2):
        assert not b1.overlaps(b2), (t1.get_text(), t2.get_text())
    title = [t.get_text() for t in texts if "N = " in t.get_text()]
    assert title == [f"overall: N = 5 blocks, k = 14 methods, Friedman p = {a.friedman_p.iloc[0]:.3g}"]
    assert sum(any(f"{m} (" in t.get_text() for t in texts) for m in names) == 14
    groups = [[m for m, g in zip(a.method, a.group) if c in g] for c in sorted(set("".join(a.group)))]
    bars = [ln for ln in fig.axes[0].lines if ln.get_linewidth() == 3]
    assert len(bars) == sum(len(g) > 1 for g in groups) > 0
    with pytest.raises(InvalidInputError, match="criterion"):
        cd_diagram(a, "faithfulness")
