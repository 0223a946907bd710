"""A sweep's experiment trackers: `sweep.loggers: [mlflow, wandb]` as Ray Tune's own logger callbacks
(`ray.air.integrations.mlflow.MLflowLoggerCallback`, `ray.air.integrations.wandb.WandbLoggerCallback`), which
run in the sweep's driver process and see every trial's reports.

What they log, in both trackers:

* one run per trial, named by the sweep's trial id, grouped under the sweep (MLflow: the experiment
  `sweep.mlflow.experiment_name`, default the sweep's name, with the sweep's name as a tag; W&B: the project
  `sweep.wandb.project`, and the group `sweep.wandb.group`, both default the sweep's name);
* the trial's whole config as it ran (from `grid.json`, not Tune's one-key `{trial_id}` parameter space),
  flat (`lora.r`), with its id and label, as parameters (W&B: the run's config);
* every report as metrics: the numbers of its `curves.parquet` row (`raysdpb.results.recorder.curve_row`), at the
  trial's optimizer step (`step`), which goes on counting when a trial resumes from a checkpoint (Tune's
  `training_iteration`, Ray's default step, starts again).

`--resume` (`Tuner.restore`) restores these callbacks as the sweep pickled them when it started (Tune keeps them
in the experiment's `tuner.pkl`), so a resumed sweep logs to the trackers it started with, with the same
settings. Each trial goes on in its run: MLflow's is found again by its tags (the trial id and a random id of
this sweep, made when it started), W&B's has an id of the same two (`resume="allow"`). The reports a resumed
trial sends again (`replayed`, see `raysdpb.sweep.worker`) go to MLflow only where the run lacks their step, and
to W&B, which keeps a step once per run (online, a resumed run drops the steps below its last; offline, each
attempt is a folder of its own, and W&B may not have written a killed attempt's last records).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import uuid

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import (WandbLoggerCallback, _QueueItem, _run_wandb_process_run_info_hook,
                                        _WandbLoggingActor)

from raysdpb.results.recorder import curve_row
from raysdpb.results.storage import join, read_json
from raysdpb.sweep.callback import trial_name
from raysdpb.sweep.plan import SweepPlan
from raysdpb.sweep.searchers import read_samples
from raysdpb.trackers import (MlflowSettings, WandbSettings, mlflow_log_metrics, mlflow_log_params, mlflow_settings,
                              numeric_metrics, tracked_params, wandb_settings)

log = logging.getLogger(__name__)

__all__ = ["tracker_callbacks", "SweepMLflowCallback", "SweepWandbCallback"]


def tracker_callbacks(plan: SweepPlan) -> list:
    """The Tune callbacks of the trackers `sweep.loggers` names besides TensorBoard (the workers write that)."""
    sweep = plan.sweep
    labels = {p.trial_id: p.label for p in plan.points}
    # this sweep among others of the same name (one deleted and started again): pickled with the callbacks, so the
    # same when the sweep resumes
    sweep_uid = uuid.uuid4().hex
    callbacks: list = []
    if "mlflow" in sweep.loggers:
        callbacks.append(SweepMLflowCallback(plan.experiment_path, sweep.name, sweep_uid, labels,
                                             mlflow_settings(sweep.mlflow, sweep.name)))
    if "wandb" in sweep.loggers:
        callbacks.append(SweepWandbCallback(plan.experiment_path, sweep.name, sweep_uid, labels,
                                            wandb_settings(sweep.wandb, sweep.name, sweep.name)))
    return callbacks


class _TrialConfigs(dict):
    """Each trial's config as its workers run it: `grid.json`'s (written before Tune starts), and a searcher's
    trials from `samples.json` (written as it suggests them: read again for a trial not seen yet)."""

    def __init__(self, experiment_path: str):
        super().__init__(read_json(join(experiment_path, "grid.json"))["trials"])
        self.experiment_path = experiment_path

    def __missing__(self, trial_id: str) -> dict:
        for sample in read_samples(self.experiment_path):
            self.setdefault(sample["trial_id"], sample["config"])
        return self[trial_id] if trial_id in self.keys() else {}


def _trial_configs(experiment_path: str) -> dict[str, dict]:
    return _TrialConfigs(experiment_path)


def _label(labels: dict[str, str], experiment_path: str, trial_id: str) -> str:
    """A trial's label: the grid's, or the one its searcher recorded."""
    if trial_id not in labels:
        labels.update({s["trial_id"]: s["label"] for s in read_samples(experiment_path)})
    return labels.get(trial_id, "")


def _report(trial_id: str, result: dict) -> tuple[dict, int, bool]:
    """A Tune result as the trackers log it: its curve row (Tune's bookkeeping dropped), its step, and whether it
    is a report a resumed trial sends again."""
    row = curve_row(trial_id, result)
    replayed = bool(row.pop("replayed", None))
    row.pop("trial_id", None)
    step = row.get("step")
    return row, int(step if step is not None else result.get(TRAINING_ITERATION, 0)), replayed


class SweepMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow callback, with a run per trial named by its id that a resumed sweep finds again, the trial's
    whole config as parameters, and each report at the trial's step in one request (`log_batch`)."""

    def __init__(self, experiment_path: str, sweep_name: str, sweep_uid: str, labels: dict[str, str],
                 settings: MlflowSettings):
        self.sweep_uid = sweep_uid
        super().__init__(tracking_uri=settings.tracking_uri, experiment_name=settings.experiment_name,
                         tags={"raysdpb.sweep": sweep_name, "raysdpb.experiment_path": experiment_path,
                               "raysdpb.sweep_uid": self.sweep_uid})
        self.experiment_path = experiment_path
        self.labels = labels

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)  # sets MLflow's tracking URI, finds or creates the experiment
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        self.configs = _trial_configs(self.experiment_path)
        self.logged_steps: dict[str, set[int]] = {}
        log.info("MLflow: the sweep's runs go to experiment %r at %s", self.experiment_name, self.client.tracking_uri)

    def _find_run(self, trial_id: str) -> str | None:
        """This sweep's run of the trial, when an earlier run of the sweep made it."""
        runs = self.client.search_runs(
            [self.mlflow_util.experiment_id], max_results=1,
            filter_string=f"tags.`raysdpb.trial_id` = '{trial_id}' and tags.`raysdpb.sweep_uid` = '{self.sweep_uid}'")
        return runs[0].info.run_id if runs else None

    def log_trial_start(self, trial):
        if trial in self._trial_runs:  # the same trial started again (Tune retrying it): its run goes on
            self.client.update_run(self._trial_runs[trial], status="RUNNING")
            return
        trial_id = trial_name(trial)
        run_id = self._find_run(trial_id)
        if run_id is None:
            run = self.client.create_run(self.mlflow_util.experiment_id, run_name=trial_id,
                                         tags={**self.tags, "trial_name": trial_id, "raysdpb.trial_id": trial_id})
            run_id = run.info.run_id
            mlflow_log_params(self.client, run_id, tracked_params(
                self.configs[trial_id], trial_id=trial_id, label=_label(self.labels, self.experiment_path, trial_id)))
            self.logged_steps[trial_id] = set()
        else:  # the sweep resumed: the trial goes on in its run
            self.client.update_run(run_id, status="RUNNING")
            self.logged_steps[trial_id] = {m.step for m in self.client.get_metric_history(run_id, "step")}
        self._trial_runs[trial] = run_id

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        trial_id = trial_name(trial)
        row, step, replayed = _report(trial_id, result)
        if replayed and step in self.logged_steps[trial_id]:
            return
        mlflow_log_metrics(self.client, self._trial_runs[trial], step, numeric_metrics(row))
        self.logged_steps[trial_id].add(step)

    def log_trial_end(self, trial, failed: bool = False):
        if trial in self._trial_runs:
            self.client.set_terminated(self._trial_runs[trial], status="FAILED" if failed else "FINISHED")


class _StepLoggingActor(_WandbLoggingActor):
    """Ray's W&B logging actor (one process per trial; its loop as Ray writes it), logging each report at the
    trial's optimizer step instead of Tune's `training_iteration`."""

    def run(self):
        os.environ["WANDB_START_METHOD"] = "thread"
        run = self._wandb.init(*self.args, **self.kwargs)
        run.config.trial_log_path = self._logdir
        _run_wandb_process_run_info_hook(run)
        while True:
            item_type, item_content = self.queue.get()
            if item_type == _QueueItem.END:
                break
            if item_type == _QueueItem.CHECKPOINT:
                self._handle_checkpoint(item_content)
                continue
            metrics, config_update = self._handle_result(item_content)
            try:
                run.config.update(config_update, allow_val_change=True)
                run.log(metrics, step=int(metrics.get("step", metrics.get(TRAINING_ITERATION, 0))))
            except (urllib.error.HTTPError, FileNotFoundError) as err:  # as Ray's: a lost point, not a lost run
                log.warning("W&B: a report of %s was not logged: %s", self._trial_name, err)
        run.finish()


class SweepWandbCallback(WandbLoggerCallback):
    """Ray's W&B callback, with a run per trial named by its id (in the sweep's group), an id a resumed sweep
    continues, the trial's whole config as the run's config, and each report at the trial's step. Offline runs
    are written under `$WANDB_DIR`, else the experiment folder (`<experiment>/wandb/offline-run-*`)."""

    _logger_actor_cls = _StepLoggingActor

    def __init__(self, experiment_path: str, sweep_name: str, sweep_uid: str, labels: dict[str, str],
                 settings: WandbSettings):
        self.sweep_uid = sweep_uid
        init = {"entity": settings.entity, "mode": settings.mode,
                "dir": settings.dir or (experiment_path if "://" not in experiment_path else None)}
        super().__init__(project=settings.project, group=settings.group,
                         **{k: v for k, v in init.items() if v is not None})
        self.experiment_path = experiment_path
        self.sweep_name = sweep_name
        self.labels = labels

    def setup(self, *args, **kwargs):
        if self.kwargs.get("mode") == "online":  # Ray checks for an API key; offline and disabled need none
            super().setup(*args, **kwargs)
        self.configs = _trial_configs(self.experiment_path)

    def log_trial_start(self, trial):
        trial_id = trial_name(trial)
        config = tracked_params(self.configs[trial_id], trial_id=trial_id,
                                label=_label(self.labels, self.experiment_path, trial_id),
                                sweep=self.sweep_name)
        self._start_logging_actor(
            trial, [*self._exclude_results, *self.excludes, "config"],
            **{"id": f"{trial_id}-{self.sweep_uid[:8]}", "name": trial_id, "resume": "allow",
               "reinit": "finish_previous", "allow_val_change": True, "group": self.group, "project": self.project,
               "config": config, **self.kwargs})

    def log_trial_result(self, iteration: int, trial, result: dict):
        # a report sent again goes to W&B again, which keeps a step once per run: online, a resumed run drops the
        # steps below its last one; offline, the resumed attempt's folder holds them (the killed attempt's may not)
        row, step, _ = _report(trial_name(trial), result)
        super().log_trial_result(iteration, trial, {**row, "step": step})
