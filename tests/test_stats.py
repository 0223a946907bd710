"""raysdpb.report.stats against hand-made data with known answers: bootstrap distributions whose moments
and quantiles follow from the resampling, exact sign-flip enumerations, Holm by hand, the MDE against
printed t and normal tables, and the confusion-count metrics against raysdpb.metrics (scikit-learn)."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from raysdpb import metrics
from raysdpb.report import stats


# --- metrics from confusion counts ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", stats.CONFUSION_METRICS)
def test_confusion_metrics_equal_scikit_learns_on_random_and_degenerate_predictions(name):
    rng = np.random.default_rng(3)
    cases = []
    for classes in (2, 3):
        for _ in range(40):
            n = int(rng.integers(1, 40))
            cases.append((rng.integers(0, classes, n), rng.integers(0, classes, n), classes))
    cases += [(np.zeros(6, int), np.zeros(6, int), 2), (np.ones(5, int), np.zeros(5, int), 2),
              (np.zeros(4, int), np.array([0, 1, 0, 1]), 2), (np.array([2, 2, 2]), np.array([0, 1, 2]), 3)]
    for predictions, labels, classes in cases:
        confusion = stats.confusion_counts(predictions, labels, np.ones((1, len(labels))), classes)
        got = stats.metric_from_confusion(name, confusion)[0]
        assert got == pytest.approx(metrics.METRICS[name](predictions, labels), abs=1e-12), (predictions, labels)


def test_weighted_counts_are_the_metric_of_the_repeated_examples():
    """A bootstrap resample's weights count an example as often as it was drawn."""
    rng = np.random.default_rng(5)
    labels, predictions = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
    weights = rng.integers(0, 4, (7, 30)).astype(float)
    weights[:, 0] += 1  # no empty resample
    got = stats.metric_from_confusion("matthews", stats.confusion_counts(predictions, labels, weights, 2))
    for row, value in zip(weights.astype(int), got):
        expanded = np.repeat(np.arange(30), row)
        assert value == pytest.approx(metrics.matthews(predictions[expanded], labels[expanded]), abs=1e-12)


# --- the per-task bootstrap -----------------------------------------------------------------------------------

def test_equal_differences_give_a_point_interval():
    result = stats.paired_bootstrap([0.7, 0.8, 0.6], [0.6, 0.7, 0.5], n_boot=500)
    assert result.mean_diff == pytest.approx(0.1)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.1, 0.1))
    assert result.se == pytest.approx(0.0, abs=1e-12) and result.n_examples == 0


def test_two_seeds_interval_is_the_enumerated_bootstrap_distribution():
    """Differences {0, 1}: the resampled mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 (variance 1/8);
    the 95% percentile interval is [0, 1], a 40% one [0.5, 0.5]."""
    wide = stats.paired_bootstrap([1.0, 2.0], [1.0, 1.0], n_boot=20000, seed=1)
    assert (wide.ci_low, wide.ci_high) == (0.0, 1.0)
    assert wide.se == pytest.approx(math.sqrt(0.125), rel=0.02)
    narrow = stats.paired_bootstrap([1.0, 2.0], [1.0, 1.0], n_boot=20000, seed=1, level=0.4)
    assert (narrow.ci_low, narrow.ci_high) == (0.5, 0.5)


def test_seed_bootstrap_moments_are_the_sample_mean_and_population_variance_over_s():
    d = np.array([0.03, -0.01, 0.02, 0.05, 0.0])
    result = stats.paired_bootstrap(d + 0.5, np.full(5, 0.5), n_boot=40000, seed=2)
    assert result.mean_diff == pytest.approx(d.mean())
    assert result.se == pytest.approx(math.sqrt(d.var(ddof=0) / 5), rel=0.02)
    assert result.ci_low < d.mean() < result.ci_high


def test_bootstrap_is_seeded():
    args = ([0.7, 0.8, 0.65, 0.9], [0.6, 0.75, 0.7, 0.8])
    assert stats.paired_bootstrap(*args, seed=4) == stats.paired_bootstrap(*args, seed=4)
    assert stats.paired_bootstrap(*args, seed=4) != stats.paired_bootstrap(*args, seed=5)


def test_example_bootstrap_without_seed_variance_has_the_binomial_standard_error():
    """Every seed gives the same predictions: the only variance is the examples'. A is right on 60 of 100
    examples where B is wrong, both right elsewhere: the per-example difference is 1 on 60, 0 on 40, so
    the resampled accuracy difference has mean 0.6 and SD sqrt(0.6 * 0.4 / 100)."""
    labels = np.ones(100, int)
    a = np.ones(100, int)
    b = np.r_[np.zeros(60, int), np.ones(40, int)]
    seeds = 3
    result = stats.paired_bootstrap([1.0] * seeds, [0.4] * seeds, predictions_a=np.tile(a, (seeds, 1)),
                                    predictions_b=np.tile(b, (seeds, 1)), labels=labels, n_boot=6000, seed=0)
    assert result.mean_diff == pytest.approx(0.6) and result.n_examples == 100
    assert result.se == pytest.approx(math.sqrt(0.24 / 100), rel=0.05)
    half = 1.959964 * math.sqrt(0.24 / 100)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.6 - half, 0.6 + half), abs=0.012)


def test_two_level_variance_adds_the_seeds_and_the_examples():
    """Seed s of A is right on k_s of N examples where B (always right on the same others) is wrong: the
    two-level replicate's variance is var_pop(k/N)/S (seeds) + E over seeds of the examples' term, here
    computed from the law of total variance for these fixed matrices and checked against the replicates."""
    n, seeds = 200, 4
    k = np.array([20, 60, 100, 140])  # A right on the first k_s examples, B never
    labels = np.ones(n, int)
    pa = np.array([np.r_[np.ones(ks, int), np.zeros(n - ks, int)] for ks in k])
    pb = np.zeros((seeds, n), int)
    result = stats.paired_bootstrap(k / n, np.zeros(seeds), predictions_a=pa, predictions_b=pb, labels=labels,
                                    n_boot=8000, seed=3)
    assert result.mean_diff == pytest.approx((k / n).mean())
    # exact variance by simulation-free algebra: D[s, i] = 1 for i < k_s. A replicate is
    # (1/S) sum_j (1/N) sum_i c_i D[pick_j, i] with c ~ Multinomial(N, 1/N) and pick_j iid uniform seeds.
    # Var = E_c[Var_pick] + Var_c[E_pick] = E_c[var_s(m_s(c))]/S + Var_c[mean_s m_s(c)], m_s(c) = sum_{i<k_s} c_i / N.
    # With cov(c_i, c_j) = -1/N (i != j), var(c_i) = 1 - 1/N: cov(m_s, m_t) = (min(k_s,k_t) - k_s k_t / N) / N^2 * ... :
    def cov(ks, kt):
        return (min(ks, kt) * (1 - 1 / n) - (ks * kt - min(ks, kt)) / n) / n ** 2
    sigma = np.array([[cov(ks, kt) for kt in k] for ks in k])
    mu = k / n
    var_of_mean = sigma.mean()
    expected_var_s = (np.mean(mu ** 2) - mu.mean() ** 2) + (np.trace(sigma) / seeds - var_of_mean)
    expected = expected_var_s / seeds + var_of_mean
    assert result.se == pytest.approx(math.sqrt(expected), rel=0.05)


def test_the_fast_and_the_general_metric_agree_for_accuracy():
    """With one validation example every example resample is that example: the two-level bootstrap is the
    seeds-only one (the same seed picks, drawn first)."""
    result = stats.paired_bootstrap([1.0, 0.0], [0.0, 0.0], predictions_a=[[1], [0]], predictions_b=[[0], [0]],
                                    labels=[1], n_boot=2000, seed=0)
    seeds_only = stats.paired_bootstrap([1.0, 0.0], [0.0, 0.0], n_boot=2000, seed=0)
    assert result.se == pytest.approx(seeds_only.se) and result.mean_diff == seeds_only.mean_diff


def test_bad_shapes_are_one_clear_error():
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="seeds, examples"):
        stats.paired_bootstrap([1, 2], [1, 2], predictions_a=[[1, 0]], predictions_b=[[1, 0]], labels=[1, 0])
    with pytest.raises(ValueError, match="both methods"):
        stats.paired_bootstrap([1], [1], predictions_a=[[1]], labels=[1])


# --- pooled -----------------------------------------------------------------------------------------------

def test_pooled_is_the_weighted_mean_of_the_tasks_with_the_stratified_variance():
    x = np.array([0.02, 0.04, 0.00, 0.06])
    y = np.array([-0.01, 0.01, 0.03])
    tasks = {"cb": {"scores_a": x, "scores_b": np.zeros(4)}, "rte": {"scores_a": y, "scores_b": np.zeros(3)}}
    equal, w = stats.pooled_bootstrap(tasks, n_boot=40000, seed=0)
    assert w == {"cb": 0.5, "rte": 0.5}
    assert equal.mean_diff == pytest.approx(0.5 * x.mean() + 0.5 * y.mean())
    assert equal.se == pytest.approx(math.sqrt(0.25 * x.var() / 4 + 0.25 * y.var() / 3), rel=0.02)
    weighted, w = stats.pooled_bootstrap(tasks, {"cb": 3, "rte": 1}, n_boot=40000, seed=0)
    assert w == {"cb": 0.75, "rte": 0.25}
    assert weighted.mean_diff == pytest.approx(0.75 * x.mean() + 0.25 * y.mean())
    assert weighted.se == pytest.approx(math.sqrt(0.75 ** 2 * x.var() / 4 + 0.25 ** 2 * y.var() / 3), rel=0.02)
    assert (weighted.n_seeds, weighted.n_examples) == (7, 0)


def test_pooled_constant_tasks_give_a_point_interval_and_accept_examples():
    labels = np.array([1, 1, 0, 0])
    tasks = {"a": {"scores_a": [0.2, 0.2], "scores_b": [0.1, 0.1]},
             "b": {"scores_a": [1.0, 1.0], "scores_b": [1.0, 1.0], "predictions_a": [[1, 1, 0, 0]] * 2,
                   "predictions_b": [[1, 1, 0, 0]] * 2, "labels": labels, "metric": "matthews"}}
    result, _ = stats.pooled_bootstrap(tasks, n_boot=300)
    assert (result.mean_diff, result.ci_low, result.ci_high) == pytest.approx((0.05, 0.05, 0.05))
    assert result.n_examples == 4
    with pytest.raises(ValueError, match="unknown keys"):
        stats.pooled_bootstrap({"a": {"scores_a": [1], "scores_b": [1], "extra": 1}})


# --- p-values --------------------------------------------------------------------------------------------

def test_sign_flip_p_values_by_hand():
    # |±1 ±2 ±3 ±0.5| >= 5.5 for (+,+,+,±) and its mirror: 4 of 16 patterns
    assert stats.sign_flip_p_value([1, 2, 3, -0.5]) == 0.25
    # every difference positive: only the observed pattern and its mirror reach it, 2 / 2^S
    assert stats.sign_flip_p_value([0.1, 0.2, 0.3, 0.4, 0.5]) == 2 / 32
    assert stats.sign_flip_p_value([0.0, 0.0]) == 1.0
    assert math.isnan(stats.sign_flip_p_value([]))


def test_sign_flip_enumeration_against_brute_force_and_monte_carlo():
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.normal(0.2, 1.0, int(rng.integers(2, 9)))
        brute = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in product((1, -1), repeat=len(d))])
        assert stats.sign_flip_p_value(d) == pytest.approx(brute)
    d = rng.normal(0.15, 1.0, 18)  # past 16 seeds the patterns are sampled: within Monte Carlo error
    signs = np.array(list(product((1.0, -1.0), repeat=18)))
    exact = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))
    sampled = stats.sign_flip_p_value(d, n_permutations=20000, seed=1)
    assert sampled == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4)
    assert stats.sign_flip_p_value(d, n_permutations=20000, seed=1) == sampled


def test_pooled_sign_flip_by_hand():
    # two tasks of one seed, +1 each, equal weights: |±0.5 ±0.5| >= 1 in 2 of 4 patterns
    assert stats.pooled_sign_flip_p_value({"a": [1.0], "b": [1.0]}) == 0.5
    # weights 3:1 and differences (+1) and (-1): statistic 0.75 - 0.25 = 0.5; |±0.75 ±0.25| >= 0.5 always
    assert stats.pooled_sign_flip_p_value({"a": [1.0], "b": [-1.0]}, {"a": 3, "b": 1}) == 1.0
    # one task with seeds [1, 2, 3, -0.5] pools to the per-task test
    assert stats.pooled_sign_flip_p_value({"a": [1, 2, 3, -0.5]}) == 0.25
    # 4 tasks x 5 seeds, all positive: sampled, close to the floor
    p = stats.pooled_sign_flip_p_value({t: [0.1, 0.2, 0.1, 0.3, 0.2] for t in "abcd"}, n_permutations=5000)
    assert p == pytest.approx(1 / 5001, abs=2 / 5001)


def test_holm_by_hand():
    # sorted 0.001, 0.012, 0.02, 0.04, 0.3 (m = 5): 0.005, 0.048, 0.06, 0.08, 0.3
    p = [0.02, 0.3, 0.001, 0.04, 0.012]
    assert stats.holm_adjusted(p) == pytest.approx([0.06, 0.3, 0.005, 0.08, 0.048])
    # a non-monotone step is carried forward: 0.01*3 = 0.03, 0.011*2 = 0.022 -> 0.03, 0.5
    assert stats.holm_adjusted([0.011, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5])
    adjusted = stats.holm_adjusted([float("nan"), 0.2])
    assert math.isnan(adjusted[0]) and adjusted[1] == pytest.approx(0.2)


def test_a_verdict_needs_the_adjusted_p_value_and_the_interval_on_one_side():
    assert stats.verdict(0.01, 0.03, 0.04) == "A > B"
    assert stats.verdict(-0.03, -0.01, 0.05) == "A < B"  # at alpha exactly: rejected, as Holm's rule reads
    assert stats.verdict(0.01, 0.03, 0.06) == "not shown"  # the interval alone is not the family's test
    assert stats.verdict(-0.01, 0.03, 0.001) == "not shown"  # nor the p-value alone
    assert stats.verdict(0.0, 0.03, 0.001) == "not shown"  # an interval that touches zero
    assert stats.verdict(0.01, 0.03, 0.08, alpha=0.1) == "A > B"
    assert stats.verdict(float("nan"), 0.03, 0.001) == "not shown"


# --- the minimum detectable effect --------------------------------------------------------------------------

def test_mde_against_printed_tables():
    # normal quantiles z_0.975 = 1.959964, z_0.80 = 0.841621: (1.959964 + 0.841621) * 1 / sqrt(16) = 0.700396
    assert stats.minimum_detectable_effect(1.0, 16, distribution="z").mde == pytest.approx(0.700396, abs=1e-6)
    # Student t, 4 df: t_0.975 = 2.776, t_0.80 = 0.941 (printed tables, 3 decimals)
    mde = stats.minimum_detectable_effect(0.02, 5, n_examples=277)
    assert mde.mde == pytest.approx((2.776 + 0.941) * 0.02 / math.sqrt(5), abs=2e-5)
    assert mde.one_example == pytest.approx(1 / 277) and mde.mde_examples == pytest.approx(mde.mde * 277)
    assert (mde.sign_flip_floor, mde.sign_flip_can_reject) == (2 / 32, False)
    eight = stats.minimum_detectable_effect(0.02, 8)
    assert eight.sign_flip_can_reject and eight.mde < mde.mde
    # 90% power at 1% (two-sided), normal: (2.575829 + 1.281552) = 3.857381
    assert stats.minimum_detectable_effect(2.0, 4, alpha=0.01, power=0.9, distribution="z").mde == pytest.approx(
        3.857381, abs=1e-5)
    with pytest.raises(ValueError):
        stats.minimum_detectable_effect(1.0, 1)


@pytest.mark.parametrize("metric", ["accuracy", "matthews", "f1", "macro_f1"])
def test_one_examples_worth_is_the_mean_change_from_changing_each_examples_prediction(metric):
    """Against brute force with sklearn's metrics over many random runs: change each example's prediction in turn
    (a wrong one to its label, a right one to the next class), recompute the metric, average the absolute changes.
    Accuracy's is exactly 1/N; an unbalanced binary task's Matthews about twice that."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    score = {"accuracy": accuracy_score, "matthews": matthews_corrcoef,
             "f1": lambda y, p: f1_score(y, p, zero_division=0),
             "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0)}[metric]
    rng = np.random.default_rng(7)
    for trial in range(25):
        k = 3 if metric in ("accuracy", "macro_f1") and trial % 2 else 2
        n = int(rng.integers(20, 60))
        y = rng.choice(k, size=n, p=[0.7, 0.3] if k == 2 else None)
        p = np.where(rng.random(n) < 0.75, y, rng.integers(0, k, size=n))
        base, changes = score(y, p), []
        for i in range(n):
            q = p.copy()
            q[i] = y[i] if p[i] != y[i] else (p[i] + 1) % k
            changes.append(abs(score(y, q) - base))
        assert stats.one_example_effect(metric, p, y, classes=k) == pytest.approx(np.mean(changes), abs=1e-12)
        if metric == "accuracy":
            assert stats.one_example_effect(metric, p, y, classes=k) == pytest.approx(1 / n)
    # CoLA-like: 1,043 examples, 69% acceptable, 80% right: Matthews' example is worth about twice accuracy's
    y = (rng.random(1043) < 0.69).astype(int)
    p = np.where(rng.random(1043) < 0.8, y, 1 - y)
    if metric == "matthews":
        assert 1.5 / 1043 < stats.one_example_effect("matthews", p, y) < 3 / 1043
    # the MDE in examples uses that worth
    mde = stats.minimum_detectable_effect(0.01, 5, n_examples=1043, one_example=0.004)
    assert mde.one_example == 0.004 and mde.mde_examples == pytest.approx(mde.mde / 0.004)


def test_pooled_mde_is_the_z_mde_of_the_pooled_standard_error():
    got = stats.pooled_minimum_detectable_effect({"a": 0.02, "b": 0.04}, {"a": 5, "b": 5})
    se = math.sqrt(0.25 * 0.02 ** 2 / 5 + 0.25 * 0.04 ** 2 / 5)
    assert got == pytest.approx(2.801585 * se, rel=1e-6)
    one = stats.pooled_minimum_detectable_effect({"a": 0.02}, {"a": 16})
    assert one == pytest.approx(stats.minimum_detectable_effect(0.02, 16, distribution="z").mde)
