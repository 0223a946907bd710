"""Experiment trackers besides TensorBoard: MLflow and Weights & Biases.

TensorBoard is always written (`raysdpb.report` reads its events); `loggers: [mlflow, wandb]` adds the others.
This module holds what both modes share (which package each tracker needs, the settings with their environment
defaults) and the trackers of a local run (`python -m raysdpb.train`), which log through the trackers' own client
libraries: the trial's config as parameters, every step scalar and every report as metrics at the run's optimizer
step. A sweep logs through Ray Tune's logger callbacks instead (`raysdpb.sweep.trackers`). No Ray here.
"""

from __future__ import annotations

import importlib
import json
import logging
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysdpb.config import TRACKER_KEYS, MlflowConfig, TrialConfig, WandbConfig
from raysdpb.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["check_installed", "check_wandb_login", "MlflowSettings", "WandbSettings", "mlflow_settings",
           "wandb_settings", "tracked_params", "numeric_metrics", "LocalTrackers", "open_local_trackers", "EXTRA",
           "STATE_FILE"]

# the pip extra that installs every tracker's package (pyproject.toml)
EXTRA = "trackers"
# logger -> the module it needs
_MODULES = {"mlflow": "mlflow", "wandb": "wandb"}
# a local run's tracker run ids, in its output folder: `--resume` continues the same runs
STATE_FILE = "trackers.json"
# MLflow's batch limits (log_batch): 100 parameters, 1000 metrics per call
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def check_installed(loggers: list[str], key: str, source: str = "<config>") -> None:
    """Every logger's package imports; else one `UserError` naming the pip extra to install."""
    for name in loggers:
        module = _MODULES.get(name)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"{source}: {key}: logger {name!r} needs the {module} package, which is not installed "
                            f"({err}); install it with pip install 'raysdpb[{EXTRA}]' (or pip install {module}), "
                            f"or remove {name} from {key}") from None


def check_wandb_login(settings: "WandbSettings", key: str, source: str = "<config>") -> None:
    """Online W&B needs an API key ($WANDB_API_KEY, or one `wandb login` saved); checked without the network, so
    that a sweep without one stops before Ray starts instead of when its first trial does."""
    if settings.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    if not wandb.login(prompt=False, verify=False):
        raise UserError(f"{source}: {key}: W&B is online but has no API key: set WANDB_API_KEY or run `wandb login`, "
                        f"or log offline ({key}.mode: offline, or WANDB_MODE=offline) and upload with `wandb sync`")


# --- settings: the config, else the tracker's environment variables -----------------------------------------

@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str | None  # None: MLflow's own default
    experiment_name: str


@dataclass(frozen=True)
class WandbSettings:
    project: str
    entity: str | None
    group: str | None
    mode: str            # online, offline or disabled
    dir: str | None      # where W&B keeps its run files ($WANDB_DIR); None: the tracker's default


def mlflow_settings(config: MlflowConfig, default_name: str) -> MlflowSettings:
    """The tracking URI (the config's, else $MLFLOW_TRACKING_URI, else MLflow's default) and the experiment."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    return MlflowSettings(uri, config.experiment_name or default_name)


def wandb_settings(config: WandbConfig, default_project: str, default_group: str | None) -> WandbSettings:
    """Project, entity, group, and the mode: the config's, else $WANDB_MODE (W&B's own `dryrun` and `run` read as
    offline and online), else online."""
    mode = config.mode or os.environ.get("WANDB_MODE") or "online"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        raise UserError(f"$WANDB_MODE={mode!r} is not a W&B mode; allowed: online, offline, disabled")
    return WandbSettings(config.project or default_project, config.entity, config.group or default_group, mode,
                         os.environ.get("WANDB_DIR") or None)


# --- what is logged ------------------------------------------------------------------------------------------

def tracked_params(config: TrialConfig | dict, **extra: Any) -> dict[str, Any]:
    """A trial's config as tracker parameters: flat (`lora.r`), without the keys that say where metrics go."""
    from raysdpb.sweep.grid import flatten_config

    flat = flatten_config(config)
    return {**{k: v for k, v in flat.items() if k.split(".")[0] not in TRACKER_KEYS}, **extra}


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a report or of a step's scalars (booleans and text are not metrics; NaN is kept: a diverged
    trial's loss is what it is)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def mlflow_log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def mlflow_log_metrics(client, run_id: str, step: int, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in metrics.items()]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH])


def mlflow_experiment_id(client, name: str) -> str:
    """The experiment of that name, created if there is none."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def mlflow_last_steps(client, run_id: str) -> dict[str, int]:
    """The last step each metric of a run was logged at: a resumed run does not log those steps again."""
    run = client.get_run(run_id)
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


# --- the trackers of a local run ------------------------------------------------------------------------------

class LocalTrackers:
    """The MLflow and W&B runs of one `python -m raysdpb.train` run. The run ids are kept in
    `<output_dir>/trackers.json`, so `--resume` continues the same runs. The steps after the checkpoint are
    trained again: MLflow does not get again a metric at a step its run has (it would keep both values); W&B
    itself drops a step lower than the run's (online; offline, each attempt is a run folder of its own, and a
    process killed outright may leave its folder without the records W&B had not yet written)."""

    def __init__(self, config: TrialConfig, output_dir: str | Path, *, resume: bool) -> None:
        self.output_dir = Path(output_dir)
        self.loggers = [n for n in config.loggers if n != "tensorboard"]
        state_path = self.output_dir / STATE_FILE
        state = {}
        if resume and state_path.is_file():
            state = json.loads(state_path.read_text())
        run_name = self.output_dir.resolve().name
        params = tracked_params(config, output_dir=str(self.output_dir.resolve()))
        self.mlflow_logged: dict[str, int] = {}  # metric -> the last step the run this one resumes logged it at
        self._mlflow = self._wandb = None
        if "mlflow" in self.loggers:
            self._mlflow = self._open_mlflow(mlflow_settings(config.mlflow, "raysdpb"), run_name, params,
                                             state.get("mlflow_run_id"))
            state["mlflow_run_id"] = self._mlflow[1]
        if "wandb" in self.loggers:
            settings = wandb_settings(config.wandb, "raysdpb", None)
            self._wandb = self._open_wandb(settings, run_name, params, state.get("wandb_run_id"))
            state["wandb_run_id"] = self._wandb.id
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1))

    def _open_mlflow(self, settings: MlflowSettings, run_name: str, params: dict, run_id: str | None):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=settings.tracking_uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            self.mlflow_logged = mlflow_last_steps(client, run_id)
            log.info("MLflow: continuing run %s (%s)", run_id, client.tracking_uri)
            return client, run_id
        experiment_id = mlflow_experiment_id(client, settings.experiment_name)
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={"raysdpb.output_dir": str(self.output_dir.resolve())})
        mlflow_log_params(client, run.info.run_id, params)
        log.info("MLflow: run %s in experiment %r (%s)", run.info.run_id, settings.experiment_name,
                 client.tracking_uri)
        return client, run.info.run_id

    def _open_wandb(self, settings: WandbSettings, run_name: str, params: dict, run_id: str | None):
        import wandb

        run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group, name=run_name,
                         id=run_id, resume="allow" if run_id else None, mode=settings.mode,
                         dir=settings.dir or str(self.output_dir), config=params, reinit="create_new")
        log.info("W&B: run %s in project %r (%s)", run.id, settings.project, settings.mode)
        return run

    def log_metrics(self, step: int, values: dict[str, Any]) -> None:
        """Numbers at the run's optimizer step; several calls at one step (the step's scalars, then a report)
        make one row in W&B."""
        metrics = numeric_metrics(values)
        if self._mlflow is not None:
            client, run_id = self._mlflow
            new = {k: v for k, v in metrics.items() if step > self.mlflow_logged.get(k, -1)}
            if new:
                mlflow_log_metrics(client, run_id, step, new)
        if self._wandb is not None and metrics:
            self._wandb.log(metrics, step=step)

    def finish(self, status: str) -> None:
        """End the runs: `completed` as finished, `interrupted` (Ctrl-C) as killed, anything else (diverged,
        failed) as failed."""
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, status={"completed": "FINISHED", "interrupted": "KILLED"}.get(status,
                                                                                                     "FAILED"))
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if status == "completed" else 1)
            self._wandb = None


def open_local_trackers(config: TrialConfig, output_dir: str | Path, *, resume: bool,
                        source: str = "<config>") -> LocalTrackers | None:
    """The trackers a local run's `loggers` ask for besides TensorBoard (None for TensorBoard alone)."""
    if config.loggers == ["tensorboard"]:
        return None
    check_installed(config.loggers, "loggers", source)
    if "wandb" in config.loggers:
        check_wandb_login(wandb_settings(config.wandb, "raysdpb", None), "wandb", source)
    return LocalTrackers(config, output_dir, resume=resume)
