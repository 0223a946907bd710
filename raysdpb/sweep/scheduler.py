"""ASHA per group of comparable trials.

One `ASHAScheduler` over a whole grid compares every trial with every other at each rung: a CoLA trial's
Matthews correlation with an RTE trial's accuracy, a 6-layer student with a 12-layer model, and (the
comparison the sweep exists for) one method with another. A distillation method whose soft targets help
only after the first epoch would be stopped at the first rung by a finetune trial that starts faster.

`GroupedASHA` keeps one ASHA per group of trials that share the values of `group_by` (by default the task,
the model, its depth and the method), so that a rung only ever compares the hyperparameters (lr, alpha, tau,
seed, ...) of one method on one task with one model. Trials report `score` (their own task's main metric),
so a grid over tasks with different main metrics needs no common metric.

Its ASHAs know a trial by the sweep's own trial id (a hash of its config), not by Tune's, so that a resumed
sweep decides as the uninterrupted one would: Tune does not save a scheduler's rungs, so on `--resume` the
sweep hands back every result it recorded (`record_past_results`), and a resumed trial re-sending its reports
up to its checkpoint finds them already in the rungs it passed, instead of being judged again against rungs
that filled in a different order (which stopped a trial that had passed its first rung before the resume).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Hashable, Iterable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raysdpb.config import ASHA_GROUP_BY


class GroupedASHA(FIFOScheduler):
    """An `ASHAScheduler` per group; `group_of` maps each trial id (the `trial_id` entry of the Tune trial
    config, as `raysdpb.sweep.driver` sets it) to its group (one group for all: ASHA over the whole grid). Plain
    data, so Tune can pickle the scheduler."""

    def __init__(self, group_of: dict[str, Hashable], *, group_by: Iterable[str] = (), base: dict | None = None,
                 **asha_kwargs):
        super().__init__()
        self.group_of = dict(group_of)
        # a searcher's trials are not known in advance: one not in `group_of` gets the group of its `group_by` values,
        # from its Tune config (the values sampled for it) over `base` (the sweep's base trial)
        self.group_by, self.base = tuple(group_by), dict(base or {})
        self.asha_kwargs = asha_kwargs
        self.groups: dict[Hashable, ASHAScheduler] = {}
        self._metric = asha_kwargs.get("metric")
        self._mode = asha_kwargs.get("mode")

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric and self._metric != metric) or (self._mode and mode and self._mode != mode):
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return all(s.set_search_properties(metric, mode, **spec) for s in self.groups.values())

    def group(self, trial_id: str, values: dict | None = None) -> Hashable:
        """The trial's group: given, or (a sampled trial) from its sampled `values` over the base trial."""
        if trial_id not in self.group_of:
            self.group_of[trial_id] = group_key({**self.base, **(values or {})}, self.group_by)
        return self.group_of[trial_id]

    def scheduler_of(self, trial_id: str, values: dict | None = None) -> ASHAScheduler:
        key = self.group(trial_id, values)
        if key not in self.groups:
            scheduler = ASHAScheduler(**self.asha_kwargs)
            scheduler.set_search_properties(self._metric, self._mode)
            self.groups[key] = scheduler
        return self.groups[key]

    def _inner(self, trial) -> tuple[ASHAScheduler, SimpleNamespace]:
        """The trial's group's ASHA, and the trial as that ASHA knows it: by the sweep's trial id."""
        trial_id = trial.config["trial_id"]
        return self.scheduler_of(trial_id, trial.config), SimpleNamespace(trial_id=trial_id)

    def record_past_results(self, trial_id: str, results: Iterable[dict], values: dict | None = None) -> None:
        """On a resume: put the results a trial reported before (in order) into its rungs, as if just
        reported; their decisions were taken then. A later report at a rung it is in continues the trial.
        `values`: a sampled trial's values (its group)."""
        scheduler = self.scheduler_of(trial_id, values)
        trial = SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        for result in results:
            scheduler.on_trial_result(None, trial, result)

    def on_trial_add(self, tune_controller, trial) -> None:
        scheduler, key = self._inner(trial)
        scheduler.on_trial_add(tune_controller, key)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        scheduler, key = self._inner(trial)
        return scheduler.on_trial_result(tune_controller, key, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        scheduler, key = self._inner(trial)
        scheduler.on_trial_complete(tune_controller, key, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        scheduler, key = self._inner(trial)
        scheduler.on_trial_remove(tune_controller, key)

    def on_trial_error(self, tune_controller, trial) -> None:
        scheduler, key = self._inner(trial)
        scheduler.on_trial_error(tune_controller, key)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self.groups)} group(s)\n" + "\n".join(
            f"  {key}: {s.debug_string()}" for key, s in self.groups.items())


def group_key(config: dict, group_by: tuple[str, ...] | list[str]) -> tuple:
    """A trial's group: the values of the `group_by` keys in its (flat) config."""
    return tuple(repr(config.get(k)) for k in group_by)


__all__ = ["ASHA_GROUP_BY", "GroupedASHA", "group_key"]
