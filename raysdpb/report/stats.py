"""Statistics of a paired comparison of methods over seeds (and validation examples): pure numpy/scipy
functions, no files. `benchmarks/quality.py --protocol v2` and the report call them; docs/method.md section
"Comparing methods" states the design.

The design: on a task, methods A and B are each trained at their selected configuration with the same S
seeds (seed s of A and seed s of B share the data order and initialisation seed), and scored on the same
N validation examples. The quantity is the mean over seeds of score_A(s) - score_B(s).

* **Per task, a two-level bootstrap** (`paired_bootstrap`): a replicate resamples the S seeds with
  replacement and, when per-example predictions are given, the N validation examples with replacement
  (one resample of examples per replicate, shared by every seed and both methods, because every run is
  scored on the same validation set); each resampled seed's score is recomputed on the resampled examples
  from its confusion counts (accuracy, F1, macro-F1, Matthews correlation: `metric_from_confusion`), and
  the replicate is the mean of the paired differences. The interval is the percentile interval of the
  replicates. Resampling seeds alone treats the validation set as fixed (the difference on these
  examples); resampling the examples too makes the interval about the task's population of examples,
  which is what a claim about the task needs. With few seeds the percentile interval is too narrow (the
  bootstrap variance of a mean is (S-1)/S of the usual estimate); the report states S next to it.
* **Pooled over tasks, a stratified bootstrap** (`pooled_bootstrap`): each replicate resamples within
  each task as above (tasks are strata, never resampled: the tasks are the ones chosen, not a sample) and
  takes the weighted mean of the per-task differences. The weights are stated, equal by default (each task
  one vote, as the GLUE score averages its tasks; the tasks' metrics are all on a 0-1 scale). Inverse-variance
  weights would be more efficient but let the task with the steadiest seeds decide the pooled answer, and
  would be chosen after seeing the data; a mixed-effects model would need distributional assumptions
  that 5 seeds per task cannot check.
* **p-values from a paired sign-flip permutation test** (`sign_flip_p_value`, `pooled_sign_flip_p_value`):
  under the null hypothesis that A and B are exchangeable within a seed, each seed's difference is as
  likely to have either sign; the p-value is the share of the 2^S sign patterns (all of them when there
  are few, else a seeded Monte Carlo sample with the +1 correction) whose |mean| is at least the observed
  one. It is exact at any S, with no normality assumption (a paired t-test at 5 seeds leans on one), and
  it tests the seeds' differences on this validation set (the examples are the bootstrap interval's job).
  Its floor is 2 / 2^S: at 5 seeds no per-task p-value is below 0.0625, so per task only the interval can
  say much; pooled over four tasks the units are the 20 (task, seed) pairs and the floor is 2 / 2^20.
* **Holm's step-down correction** (`holm_adjusted`) over the pre-declared family of comparisons.
* **The minimum detectable effect** (`minimum_detectable_effect`): the true mean difference a two-sided
  paired t-test at level alpha detects with the given power, (t_{1-alpha/2, S-1} + t_{power, S-1}) * sd / sqrt(S),
  sd the between-seed SD of the paired differences; next to it the granularity of one validation example
  (1/N: a difference smaller than that is not one more example right) and the sign-flip floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Iterable, Mapping

import numpy as np

__all__ = [
    "CONFUSION_METRICS", "metric_from_confusion", "confusion_counts", "PairedResult", "paired_bootstrap",
    "pooled_bootstrap", "sign_flip_p_value", "pooled_sign_flip_p_value", "holm_adjusted",
    "MinimumDetectableEffect", "minimum_detectable_effect", "pooled_minimum_detectable_effect", "one_example_effect",
    "verdict",
]

CONFUSION_METRICS = ("accuracy", "f1", "macro_f1", "matthews")
_EXACT_UP_TO = 16  # units (seeds, or task-seed pairs): all 2^units sign patterns up to this many, else sampled
_CHUNK = 256       # bootstrap replicates per matrix product (memory: chunk x examples counts)


# --- metrics from confusion counts (vectorised over replicates) ----------------------------------------------

def confusion_counts(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray, classes: int) -> np.ndarray:
    """Confusion matrices `[..., true, predicted]` of one run's predictions with each row of `weights` (how
    often each example is counted: a bootstrap resample; shape (R, N)) -> (R, classes, classes)."""
    cell = np.asarray(labels, dtype=np.int64) * classes + np.asarray(predictions, dtype=np.int64)
    onehot = np.zeros((len(cell), classes * classes))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (np.atleast_2d(weights) @ onehot).reshape(-1, classes, classes)


def metric_from_confusion(name: str, confusion: np.ndarray) -> np.ndarray:
    """A metric of `raysdpb.metrics` from confusion matrices `[..., true, predicted]` (counts, possibly
    weighted), with its degenerate values (0.0 where undefined, as there)."""
    c = np.asarray(confusion, dtype=float)
    total = c.sum(axis=(-2, -1))
    diag = np.diagonal(c, axis1=-2, axis2=-1)
    true, pred = c.sum(axis=-1), c.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "accuracy":
            out = diag.sum(-1) / total
        elif name == "f1":  # class 1
            tp = c[..., 1, 1]
            out = 2 * tp / (true[..., 1] + pred[..., 1])  # 2 tp / (2 tp + fp + fn)
        elif name == "macro_f1":  # over the classes present in labels or predictions
            per_class = 2 * diag / (true + pred)
            present = (true + pred) > 0
            out = np.where(present, np.nan_to_num(per_class), 0.0).sum(-1) / present.sum(-1)
        elif name == "matthews":  # Gorodkin's multiclass form, = sklearn's matthews_corrcoef
            num = diag.sum(-1) * total - (pred * true).sum(-1)
            den = np.sqrt((total ** 2 - (pred ** 2).sum(-1)) * (total ** 2 - (true ** 2).sum(-1)))
            out = num / den
        else:
            raise ValueError(f"metric {name!r} has no confusion-count form; allowed: {', '.join(CONFUSION_METRICS)}")
    return np.nan_to_num(np.asarray(out, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)


def one_example_effect(metric: str, predictions, labels, classes: int | None = None) -> float:
    """What one validation example is worth in `metric` for one run: the mean absolute change of the metric when a
    single example's prediction changes (a wrong one made right; a right one made wrong, to the next class), over
    the run's examples. Exactly 1/N for accuracy; for Matthews correlation or F1 it depends on the confusion matrix
    (about twice 1/N on a CoLA-like task), so "within one example" means this there."""
    p, y = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    k = max(2, classes or int(max(p.max(initial=0), y.max(initial=0)) + 1))
    base_confusion = confusion_counts(p, y, np.ones(len(y)), k)[0]
    base = float(metric_from_confusion(metric, base_confusion))
    total = 0.0
    for true in range(k):  # every example of a cell (true, predicted) changes the matrix the same way
        for predicted in range(k):
            count = base_confusion[true, predicted]
            if count == 0:
                continue
            changed = base_confusion.copy()
            changed[true, predicted] -= 1
            changed[true, true if predicted != true else (predicted + 1) % k] += 1
            total += count * abs(float(metric_from_confusion(metric, changed)) - base)
    return total / len(y)


# --- the per-task bootstrap ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedResult:
    """A paired difference (A - B) with its bootstrap interval: `mean_diff` (the mean over seeds; from the
    predictions on every example where they were given), `ci_low`/`ci_high` (percentile interval at
    `level`), `se` (the SD of the replicates), `n_seeds`, `n_examples` (0: seeds resampled alone)."""

    mean_diff: float
    ci_low: float
    ci_high: float
    se: float
    level: float
    n_seeds: int
    n_examples: int
    n_boot: int


def _task_arrays(scores_a, scores_b, predictions_a, predictions_b, labels):
    a, b = np.asarray(scores_a, dtype=float).ravel(), np.asarray(scores_b, dtype=float).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same seeds on both sides: {a.size} and {b.size}")
    if (predictions_a is None) != (predictions_b is None) or (predictions_a is not None and labels is None):
        raise ValueError("per-example data needs predictions of both methods and the labels")
    if predictions_a is None:
        return a, b, None, None, None
    pa, pb = np.atleast_2d(np.asarray(predictions_a)), np.atleast_2d(np.asarray(predictions_b))
    y = np.asarray(labels).ravel()
    if pa.shape != (a.size, y.size) or pb.shape != pa.shape:
        raise ValueError(f"predictions must be (seeds, examples) = ({a.size}, {y.size}); got {pa.shape}, {pb.shape}")
    return a, b, pa, pb, y


def _observed(a, b, pa, pb, y, metric) -> np.ndarray:
    """Each seed's difference: from the predictions on every example where given, else from the scores."""
    if pa is None:
        return a - b
    classes = int(max(pa.max(), pb.max(), y.max())) + 1
    ones = np.ones((1, y.size))
    return np.array([metric_from_confusion(metric, confusion_counts(pa[s], y, ones, classes))[0]
                     - metric_from_confusion(metric, confusion_counts(pb[s], y, ones, classes))[0]
                     for s in range(a.size)])


def _replicates(a, b, pa, pb, y, metric: str, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`n_boot` bootstrap replicates of the mean paired difference (seeds, and examples where given)."""
    seeds = a.size
    pick = rng.integers(0, seeds, size=(n_boot, seeds))
    if pa is None:
        return (a - b)[pick].mean(axis=1)
    n = y.size
    classes = int(max(pa.max(), pb.max(), y.max())) + 1
    out = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - start)
        drawn = rng.integers(0, n, size=(m, n))
        weights = np.bincount((drawn + n * np.arange(m)[:, None]).ravel(), minlength=m * n).reshape(m, n)
        per_seed = np.empty((m, seeds))
        for s in range(seeds):
            per_seed[:, s] = (metric_from_confusion(metric, confusion_counts(pa[s], y, weights, classes))
                              - metric_from_confusion(metric, confusion_counts(pb[s], y, weights, classes)))
        out[start:start + m] = np.take_along_axis(per_seed, pick[start:start + m], axis=1).mean(axis=1)
    return out


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(scores_a, scores_b, *, predictions_a=None, predictions_b=None, labels=None,
                     metric: str = "accuracy", n_boot: int = 4000, level: float = 0.95,
                     seed: int = 0) -> PairedResult:
    """The paired difference A - B over seeds on one task, with a seeded bootstrap interval: seeds resampled
    (and, given `predictions_a`/`predictions_b` (seeds x examples) and `labels`, the validation examples
    too, each seed's `metric` recomputed on them). Seed s of A is paired with seed s of B."""
    a, b, pa, pb, y = _task_arrays(scores_a, scores_b, predictions_a, predictions_b, labels)
    replicates = _replicates(a, b, pa, pb, y, metric, n_boot, np.random.default_rng(seed))
    low, high = _interval(replicates, level)
    return PairedResult(float(_observed(a, b, pa, pb, y, metric).mean()), low, high,
                        float(replicates.std(ddof=1)), level, a.size, 0 if y is None else y.size, n_boot)


def pooled_bootstrap(tasks: Mapping[str, Mapping], weights: Mapping[str, float] | None = None, *,
                     n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[PairedResult, dict[str, float]]:
    """The weighted mean over tasks of the per-task paired differences, with a stratified bootstrap interval
    (each task resampled within itself, as `paired_bootstrap` does; tasks are never resampled). `tasks`: task
    -> the keyword arguments of `paired_bootstrap` (`scores_a`, `scores_b`, optionally `predictions_a`,
    `predictions_b`, `labels`, `metric`). `weights`: task -> weight, normalised to sum 1; default equal.
    Returns the result (n_seeds, n_examples: totals over tasks) and the normalised weights."""
    names = list(tasks)
    if not names:
        raise ValueError("no tasks to pool")
    raw = {t: 1.0 for t in names} if weights is None else {t: float(weights[t]) for t in names}
    total = sum(raw.values())
    if total <= 0 or any(w < 0 for w in raw.values()):
        raise ValueError(f"weights must be non-negative and not all zero: {raw}")
    w = {t: raw[t] / total for t in names}
    streams = np.random.SeedSequence(seed).spawn(len(names))  # one stream per task: adding a task moves no other
    pooled, observed, seeds_n, examples_n = np.zeros(n_boot), 0.0, 0, 0
    for task, stream in zip(names, streams):
        spec = dict(tasks[task])
        metric = spec.pop("metric", "accuracy")
        arrays = _task_arrays(spec.pop("scores_a"), spec.pop("scores_b"), spec.pop("predictions_a", None),
                              spec.pop("predictions_b", None), spec.pop("labels", None))
        if spec:
            raise ValueError(f"{task}: unknown keys {sorted(spec)}")
        pooled += w[task] * _replicates(*arrays, metric, n_boot, np.random.default_rng(stream))
        observed += w[task] * float(_observed(*arrays, metric).mean())
        seeds_n += arrays[0].size
        examples_n += 0 if arrays[4] is None else arrays[4].size
    low, high = _interval(pooled, level)
    return PairedResult(observed, low, high, float(pooled.std(ddof=1)), level, seeds_n, examples_n, n_boot), w


# --- p-values ----------------------------------------------------------------------------------------------

def _sign_flip(units: np.ndarray, coefficients: np.ndarray, n_permutations: int, seed: int) -> float:
    """P(|sum of coefficient * sign * unit| >= observed) over independent random signs."""
    contributions = coefficients * units
    observed = abs(contributions.sum())
    tolerance = 1e-12 * max(1.0, np.abs(contributions).sum())
    k = contributions.size
    if k <= _EXACT_UP_TO:
        signs = np.array(list(product((1.0, -1.0), repeat=k)))
        return float(np.mean(np.abs(signs @ contributions) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_permutations, 4096):
        m = min(4096, n_permutations - start)
        signs = rng.choice((-1.0, 1.0), size=(m, k))
        hits += int((np.abs(signs @ contributions) >= observed - tolerance).sum())
    return (hits + 1) / (n_permutations + 1)


def sign_flip_p_value(differences: Iterable[float], *, n_permutations: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of the mean of per-seed differences
    (exact over the 2^S sign patterns up to 16 seeds; else a seeded Monte Carlo estimate). NaN for no seeds."""
    d = np.asarray(list(differences), dtype=float)
    if d.size == 0:
        return float("nan")
    return _sign_flip(d, np.ones_like(d), n_permutations, seed)


def pooled_sign_flip_p_value(differences: Mapping[str, Iterable[float]], weights: Mapping[str, float] | None = None,
                             *, n_permutations: int = 20000, seed: int = 0) -> float:
    """The sign-flip test of the pooled statistic sum_t w_t mean_s d_ts: each (task, seed) difference's sign
    flipped independently (the null: no difference on any task, each seed's difference symmetric)."""
    names = [t for t in differences]
    raw = {t: 1.0 for t in names} if weights is None else {t: float(weights[t]) for t in names}
    total = sum(raw.values())
    units, coefficients = [], []
    for t in names:
        d = np.asarray(list(differences[t]), dtype=float)
        units.append(d)
        coefficients.append(np.full(d.size, raw[t] / total / max(d.size, 1)))
    if not units or sum(u.size for u in units) == 0:
        return float("nan")
    return _sign_flip(np.concatenate(units), np.concatenate(coefficients), n_permutations, seed)


def holm_adjusted(p_values: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaNs are not in the family and stay NaN): the
    i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the adjusted
    value is <= alpha keeps the family-wise error rate at alpha under any dependence between the tests."""
    p = np.asarray(list(p_values), dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(ci_low: float, ci_high: float, p_adjusted: float, *, alpha: float = 0.05) -> str:
    """The rule a comparison A - B is read by: "A > B" where the family-adjusted p-value is at most `alpha` and
    the interval lies above zero, "A < B" where it lies below, and otherwise "not shown" (no difference shown: the
    interval then says which differences the data still allow). Both must agree: an interval that excludes zero
    is one more test, and without the family's correction it would not be one."""
    if not all(math.isfinite(x) for x in (ci_low, ci_high, p_adjusted)):
        return "not shown"
    if p_adjusted <= alpha and ci_low > 0:
        return "A > B"
    if p_adjusted <= alpha and ci_high < 0:
        return "A < B"
    return "not shown"


# --- the minimum detectable effect ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MinimumDetectableEffect:
    """`mde`: the smallest true mean difference detected with `power` by a two-sided paired test at `alpha`;
    `one_example`: what one validation example is worth (1/N, accuracy's; `one_example_effect` for another
    metric); `mde_examples`: the MDE in examples (mde / one_example); `sign_flip_floor`: the smallest sign-flip
    p-value S seeds allow (2 / 2^S); `sign_flip_can_reject`: whether that floor is at most alpha."""

    mde: float
    sd: float
    n_seeds: int
    alpha: float
    power: float
    one_example: float | None
    mde_examples: float | None
    sign_flip_floor: float
    sign_flip_can_reject: bool


def minimum_detectable_effect(sd: float, n_seeds: int, *, alpha: float = 0.05, power: float = 0.8,
                              n_examples: int | None = None, distribution: str = "t",
                              one_example: float | None = None) -> MinimumDetectableEffect:
    """(q_{1-alpha/2} + q_{power}) * sd / sqrt(S): q the quantiles of Student's t with S-1 degrees of freedom
    (`distribution="t"`) or of the normal (`"z"`); `sd` the between-seed SD (ddof=1) of the paired differences.
    `one_example` (default 1/`n_examples`) is what one validation example is worth in the metric."""
    from scipy import stats

    if n_seeds < 2:
        raise ValueError("the minimum detectable effect needs at least 2 seeds")
    if distribution == "t":
        q = stats.t.ppf(1 - alpha / 2, n_seeds - 1) + stats.t.ppf(power, n_seeds - 1)
    elif distribution == "z":
        q = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    else:
        raise ValueError(f"distribution {distribution!r}; allowed: t, z")
    mde = float(q * sd / math.sqrt(n_seeds))
    floor = 2.0 / 2 ** n_seeds
    worth = one_example if one_example is not None else (1.0 / n_examples if n_examples else None)
    return MinimumDetectableEffect(mde, float(sd), n_seeds, alpha, power, worth,
                                   mde / worth if worth else None, floor, floor <= alpha)


def pooled_minimum_detectable_effect(sds: Mapping[str, float], n_seeds: Mapping[str, int],
                                     weights: Mapping[str, float] | None = None, *, alpha: float = 0.05,
                                     power: float = 0.8) -> float:
    """The MDE of the weighted mean over tasks: (z_{1-alpha/2} + z_{power}) * sqrt(sum_t w_t^2 sd_t^2 / S_t)
    (normal quantiles: the pooled statistic has many (task, seed) units)."""
    from scipy import stats

    names = list(sds)
    raw = {t: 1.0 for t in names} if weights is None else {t: float(weights[t]) for t in names}
    total = sum(raw.values())
    se = math.sqrt(sum((raw[t] / total) ** 2 * sds[t] ** 2 / n_seeds[t] for t in names))
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)
