"""The rules of the result schema, read by the recorder (`raysdpb.results.recorder`) and the report
(`raysdpb.report`): trial statuses, a task's main metric, which way a metric is better, the best trial of
each method. Plain Python: no torch, no Ray.

Statuses (trials.parquet's `status`): `pending` (not started yet), `running`, `completed` (ran all its planned
epochs), `stopped_by_asha` (ASHA stopped it at a rung), `diverged` (too many non-finite losses in a row),
`errored` (failed; `--resume` tries it again), `interrupted` (the sweep ended before the trial did; `--resume`
continues it). `TERMINAL`: how a trial's run can end. `FINISHED`: finished for good, never trained again, the
trials a report's tables use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type: raysdpb.tasks is not imported here
    from raysdpb.tasks import TaskSpec

__all__ = [
    "STATUSES", "TERMINAL", "FINISHED", "SCORE_KEY", "TRAIN_METRICS", "EVAL_LOSS", "is_number", "metric_direction",
    "eval_metric_keys", "main_metric", "best_per_method",
]

STATUSES = ("pending", "running", "completed", "stopped_by_asha", "diverged", "errored", "interrupted")
TERMINAL = frozenset({"completed", "stopped_by_asha", "diverged", "errored"})
FINISHED = frozenset({"completed", "stopped_by_asha", "diverged"})

# where a trial's time went (cumulative over its attempts, in every report and trial row): set-up, training, evaluation,
# checkpoint writing (raysdpb.recipe.Recipe.phase_seconds)
PHASE_TIME_KEYS = ("time_setup_s", "time_train_s", "time_eval_s", "time_checkpoint_s")
SCORE_KEY = "score"  # every trial's report repeats its own task's main metric under this name
# training metrics the engine reports besides eval_<metric> (ASHA may use them too, e.g. train_loss with mode min)
TRAIN_METRICS = ("train_loss", "train_ce", "train_distill", "alpha_mean", "tau_mean")


def is_number(value: Any) -> bool:
    """A value that can be a score: a finite int or float (not a bool, not None, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_direction(name: str, main_metric: str | None = None, main_mode: str = "max") -> str | None:
    """Which way is better for a reported metric: "max", "min", or None (no "best": lr, alpha_mean, ...)."""
    if name == main_metric:
        return main_mode
    lowered = name.lower()
    if any(word in lowered for word in ("loss", "error", "perplexity")) or name in ("train_ce", "train_distill"):
        return "min"
    if name.startswith("eval_"):
        return "max"
    return None


# a classifier's evaluation also reports the mean cross-entropy of the labels, `eval_<prefix>loss`, after the
# task's metrics (raysdpb.recipe.evaluation.evaluate_split)
EVAL_LOSS = "loss"


def eval_metric_keys(task: TaskSpec, eval_split: str | None = None, heldout_dev: bool | str = False) -> list[str]:
    """Every eval key a trial of `task` reports: `eval_<prefix><metric>` for each evaluation split and metric, and
    a classifier's `eval_<prefix>loss` after its split's metrics (`EVAL_LOSS`). With `eval_split` set the trial
    evaluates that one split, without a prefix (`TaskSpec.evaluation_splits`); with `heldout_dev` (True, or what
    `heldout_dev.evaluate` says: "both", "dev", "validation") it also evaluates the dev split held out from its
    training split, first, as `eval_dev_<metric>` (`raysdpb.tasks.heldout`), or that alone ("dev"), or not
    ("validation": held out of training, not evaluated)."""
    mode = "both" if heldout_dev is True else (heldout_dev or "none")
    prefixes = ["dev_"] if mode in ("both", "dev") else []
    if mode != "dev":
        prefixes += [prefix for _, prefix in task.evaluation_splits(eval_split)]
    metrics = [*task.metrics, EVAL_LOSS] if task.kind != "generation" else list(task.metrics)
    return [f"eval_{prefix}{metric}" for prefix in prefixes for metric in metrics]


def main_metric(task: TaskSpec, eval_split: str | None = None, heldout_dev: bool | str = False) -> str:
    """The main metric a trial of `task` reports: the task's first metric on its first evaluation split
    (`eval_matthews` for CoLA; prefix-less when `eval_split` is set). A trial with a held-out dev split is
    selected on it: `eval_dev_<metric>` (the validation split is then left for the final scores), unless it
    evaluates the validation split alone (`heldout_dev.evaluate: validation`)."""
    return eval_metric_keys(task, eval_split, heldout_dev)[0]


def best_per_method(rows: list[dict], metric: str, mode: str = "max") -> list[dict]:
    """The best trial of each method by `best_<metric>` (trials that never reported it are left out), best
    first. Ties go to the trial that comes first in grid order, the order of `rows` (trials.parquet lists
    the trials in grid order), so that the sweep's summary and the report pick the same trial."""
    key = f"best_{metric}"
    best: dict[str, dict] = {}
    for row in rows:
        value = row.get(key)
        if not is_number(value):
            continue
        current = best.get(row["method"])
        # strictly better only: an equal value keeps the earlier trial
        if current is None or (value > current[key] if mode == "max" else value < current[key]):
            best[row["method"]] = row
    return sorted(best.values(), key=lambda r: r[key], reverse=mode == "max")
