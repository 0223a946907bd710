"""The Tune driver of a sweep and its trials: `run_sweep` runs (or resumes) the plan's grid as Tune trials on the
connected Ray. Each Tune trial is `trial_driver`. A single-worker trial (`sweep.warm_trials`, the default) runs the
recipe right there, in Tune's trial actor, which Tune reuses for the next trial (`raysdpb.sweep.trial_actor`); it
reserves the worker's CPUs and GPU share. Otherwise the trial is a thin driver that builds a
`ray.train.torch.TorchTrainer` for its config (workers per trial, CPUs and GPUs per worker) and calls `fit()`;
every worker runs `raysdpb.sweep.worker.train_worker`, and the driver reserves no CPU (only a little memory), so
a trial's CPUs and GPUs are exactly its Train workers'."""

from __future__ import annotations

import logging
import os

from raysdpb.config import TrialConfig, absolute_path
from raysdpb.errors import UserError
from raysdpb.results.recorder import read_finished_marker
from raysdpb.results.storage import join, read_json, read_rows, write_json
from raysdpb.sweep.callback import ResultsCallback, trial_name
from raysdpb.sweep.checks import check_experiment, check_resources, max_concurrent_trials
from raysdpb.sweep.console import ConsoleCallback
from raysdpb.sweep.plan import SWEEP_FORMAT, SweepPlan, search_record
from raysdpb.sweep.scheduler import GroupedASHA
from raysdpb.sweep.searchers import make_searcher, sampled_config
from raysdpb.sweep.worker import train_worker

log = logging.getLogger(__name__)

__all__ = ["run_sweep", "trial_driver", "runs_warm", "trial_resources", "connect", "localize", "make_scheduler",
           "search_settings"]

# what each Tune trial (the Train driver) reserves: no CPU, so that the trial's CPUs are its workers'
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
# environment variables a worker on any node needs to see as the driver does: raysdpb's, the HF libraries', and
# where an S3-compatible store is (an endpoint such as MinIO's, the region; not credentials: runtime_env variables
# are visible to whoever sees the cluster's dashboard, so each node brings its own, an instance role on AWS)
_PROPAGATED_ENV_PREFIXES = ("RAYSDPB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "RAY_TRAIN_V2_ENABLED",
                            "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "S3_ENDPOINT")


# --- the Tune trial: a thin driver of one Train run ---------------------------------------------------------

def trial_driver(config: dict, settings: dict) -> None:
    """One Tune trial: the recipe in this actor (a warm single-worker trial), or a `TorchTrainer` for the trial's
    config, its results forwarded to Tune."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = config["trial_id"]
    experiment = settings["experiment_path"]
    # a grid's (or random search's) trial is in grid.json; a searcher's is made from its sampled values
    grid = read_json(join(experiment, "grid.json"))
    trial_config = grid["trials"].get(trial_id) or sampled_config(
        grid, trial_id, {k: v for k, v in config.items() if k != "trial_id"}, localize)
    finished = read_finished_marker(experiment, trial_id)
    if finished is not None:
        # finished in an earlier run whose Tune state was lost (a killed driver): announce, do not retrain
        ray.tune.report({**finished["last_result"], "replayed": 1})
        return
    loop_config = {"trial": trial_config, "trial_id": trial_id,
                   "score_metric": settings["score_metrics"].get(trial_id, settings.get("score_metric")),
                   "tensorboard_path": join(experiment, "tensorboard", trial_id),
                   "run_path": join(experiment, "train_runs", trial_id),
                   "artifacts_path": join(experiment, "artifacts", trial_id)}
    if runs_warm(settings):  # one worker: the recipe right here, in Tune's trial actor (raysdpb.sweep.trial_actor)
        from raysdpb.sweep.trial_actor import run_in_trial_actor

        run_in_trial_actor(loop_config, settings)
        return
    resources = {"CPU": settings["cpus_per_worker"]}
    if settings["use_gpu"]:
        resources["GPU"] = settings["gpus_per_worker"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=settings["num_workers"], use_gpu=settings["use_gpu"],
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # same (storage_path, name) on every attempt: Train resumes from the trial's latest checkpoint
            name=trial_id,
            storage_path=join(experiment, "train_runs"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings["keep_checkpoints"],
                                                         checkpoint_score_attribute=settings["metric"],
                                                         checkpoint_score_order=settings["mode"]),
            failure_config=ray.train.FailureConfig(max_failures=settings["max_failures"]),
        ),
    )
    trainer.fit()  # what the run leaves when it ends, its way or stopped by Tune: raysdpb.sweep.cleanup


def runs_warm(settings: dict) -> bool:
    """Whether the sweep's trials run in Tune's trial actor (`sweep.warm_trials`, one worker per trial)."""
    return bool(settings.get("warm_trials")) and settings["num_workers"] == 1


def trial_resources(settings: dict) -> dict:
    """What each Tune trial reserves: a warm trial its worker's CPUs and GPU share; a Train run's driver only a
    little memory (its workers reserve their own)."""
    if not runs_warm(settings):
        return DRIVER_RESOURCES
    resources = {"CPU": settings["cpus_per_worker"]}
    if settings["use_gpu"]:
        resources["GPU"] = settings["gpus_per_worker"]
    return resources


# --- the sweep: Ray, then Tune over the grid ------------------------------------------------------------------

def connect(address: str | None, worker_logs: bool = True) -> None:
    """Connect to the Ray cluster at `address`, or start a local Ray. `worker_logs`: forward the output of the
    trials' processes (Ray Train's controllers and workers, the libraries they load) to this console; without it
    Ray's own INFO lines are hidden too (the sweep's console reports the trials' events)."""
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(_PROPAGATED_ENV_PREFIXES)}
    options = {"runtime_env": {"env_vars": env} if env else None, "log_to_driver": worker_logs,
               "logging_level": logging.INFO if worker_logs else logging.WARNING}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        try:
            context = ray.init(address=address, **options)
        except ConnectionError as err:
            raise UserError(f"could not connect to the Ray cluster at {address!r} ({err}); start it "
                            "(`ray up cluster.yaml`, `ray start --head`) or unset RAY_ADDRESS / sweep.address "
                            "for a local Ray") from None
    else:
        log.info("starting a local Ray instance")
        # "local": a new instance, never a cluster some earlier `ray start` left recorded in /tmp/ray
        context = ray.init(address="local", **options)
    if not getattr(context, "dashboard_url", None):
        log.warning("the Ray dashboard is not running (pip install 'ray[default]'): Ray Train's placement-group "
                    "cleaner cannot see stopped trials, so each trial ASHA stops leaves an idle Ray process "
                    "until the sweep ends (its CPUs/GPUs are released by raysdpb)")


def localize(config: TrialConfig) -> dict:
    """The trial config as the workers run it: local paths absolute (workers run in their own folder), no
    progress bars in the worker logs. None of these keys is part of the trial id."""
    data = config.model_dump(mode="json")
    data["progress_bar"] = False
    # (load_experiment made the top-level paths absolute already; these may come from the search block)
    data["data_dir"] = absolute_path(data.get("data_dir"), "data_dir")
    if data.get("custom_task"):
        data["custom_task"]["files"] = {k: absolute_path(v, f"custom_task.files.{k}")
                                        for k, v in data["custom_task"]["files"].items()}
    if os.path.isdir(data["model"]):
        data["model"] = os.path.abspath(data["model"])
    return data


def make_scheduler(plan: SweepPlan):
    """The plan's Tune scheduler: HyperBandForBOHB for a bohb search, else ASHA per group of comparable trials
    (`GroupedASHA`), or None without ASHA. What `run_sweep` runs, and what benchmarks/searcher_replay.py replays."""
    sweep = plan.sweep
    if sweep.search == "bohb":
        from ray.tune.schedulers import HyperBandForBOHB

        # BOHB's HyperBand instead of ASHA (one over every trial: plan_sweep refuses a bohb search over groups)
        return HyperBandForBOHB(time_attr=sweep.asha.time_attr, max_t=plan.max_t,
                                reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
    if sweep.asha is None:
        return None
    # stop_last_trials=False: a trial that reaches max_t ends by itself; Tune stopping it there would
    # end its Train run abruptly (see raysdpb.sweep.cleanup)
    asha = dict(time_attr=sweep.asha.time_attr, max_t=plan.max_t, grace_period=sweep.asha.grace_period,
                reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
    # one ASHA per group of comparable trials (raysdpb.sweep.scheduler), or one over the grid (group_by: []);
    # a searcher's trials join their group as they are suggested
    if plan.space is not None:
        return GroupedASHA({}, group_by=sweep.asha.group_by, base=plan.space.base, **asha)
    return GroupedASHA(plan.asha_groups or {p.trial_id: () for p in plan.points}, **asha)


def search_settings(plan: SweepPlan, localize=localize) -> tuple[dict, dict]:
    """Tune's `param_space` and the `TuneConfig` settings of the plan's search: the grid's (or random search's
    drawn) trial ids, or the searcher (`search_alg`) and its `num_samples`."""
    from ray import tune

    if plan.space is None:
        # one grid point per trial: the search space is already expanded (raysdpb.sweep.grid; random search's
        # draws, raysdpb.sweep.space)
        return {"trial_id": tune.grid_search([p.trial_id for p in plan.points])}, {}
    # the searcher's suggestions, each the trial id and values of a sampled trial (raysdpb.sweep.searchers)
    return {}, {"search_alg": make_searcher(plan, localize), "num_samples": plan.sweep.num_samples}


def run_sweep(plan: SweepPlan, *, resume: bool = False, source: str = "<config>", verbose: int = 1) -> list[dict]:
    """Run (or resume) the sweep on the connected Ray; returns the rows of trials.parquet. `verbose`: 0 prints
    nothing while it runs, 1 a line per trial event and a periodic summary (`raysdpb.sweep.console`), 2 also
    Tune's status tables."""
    import ray
    from ray import tune

    # a diverged trial's last report may lack the metric
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if verbose < 2:
        # Tune's new output engine prints its experiment box and a TensorBoard line for its own driver artifacts
        # even when silent; the legacy engine at verbosity 0 prints nothing (raysdpb.sweep.console reports)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    nodes = ray.nodes()
    check_resources(plan.sweep, nodes, source)
    concurrent = max_concurrent_trials(plan.sweep, nodes)
    if sum(1 for n in nodes if n.get("Alive")) > 1 and "://" not in plan.storage_path:
        log.warning("sweep.storage_path %s is a local path on a multi-node cluster: it must be a shared "
                    "file system (NFS), or use a cloud URI (s3://...)", plan.storage_path)
    check_experiment(plan, resume, source)
    sweep = plan.sweep
    if not resume:
        # the trials' configs as the workers run them; Tune's own trial config is just the id and label. A searcher's
        # trials are recorded as it suggests them (samples.json); grid.json holds what it samples.
        grid = {"format": SWEEP_FORMAT, "trial_ids": [p.trial_id for p in plan.points],
                "trials": {p.trial_id: localize(p.config) for p in plan.points}}
        if sweep.search != "grid":
            grid |= {"search": search_record(plan)}
        write_json(join(plan.experiment_path, "grid.json"), grid)

    settings = {"experiment_path": plan.experiment_path, "num_workers": sweep.num_workers, "use_gpu": sweep.use_gpu,
                "cpus_per_worker": sweep.cpus_per_worker, "gpus_per_worker": sweep.gpus_per_worker,
                "keep_checkpoints": sweep.keep_checkpoints, "max_failures": sweep.max_failures,
                "metric": plan.metric, "mode": plan.mode, "score_metrics": plan.score_metrics,
                "warm_trials": sweep.warm_trials, "score_metric": plan.score_metric}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, settings=settings), trial_resources(settings))
    if resume:
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    else:
        scheduler = make_scheduler(plan)
        sampled = None
        if plan.space is not None:  # the searcher's trials get their rows as they are suggested
            sampled = (plan.space, plan.held, plan.score_metric)
        callback = ResultsCallback(plan.experiment_path, plan.trials, plan.metric, plan.mode,
                                   sweep.asha.time_attr if sweep.asha else "epoch",
                                   scheduler if isinstance(scheduler, GroupedASHA) else None,
                                   keep_checkpoints=sweep.keep_checkpoints, keep_weights=sweep.keep_weights,
                                   sampled=sampled, bohb=sweep.search == "bohb")
        from raysdpb.sweep.trackers import tracker_callbacks  # MLflow, W&B (sweep.loggers); pickled for --resume

        callbacks = [callback]  # first: the others read the trials' states it records
        if verbose >= 1:
            callbacks.append(ConsoleCallback(callback, plan.metric, plan.mode, concurrent))
        callbacks += tracker_callbacks(plan)
        param_space, searched = search_settings(plan)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=scheduler,
                                        max_concurrent_trials=concurrent, reuse_actors=runs_warm(settings),
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                        **searched),
            run_config=tune.RunConfig(name=sweep.name, storage_path=plan.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      callbacks=callbacks, verbose=1 if verbose >= 2 else 0),
        )
    if verbose >= 1:
        trials = f"{len(plan.points)} trials" if plan.space is None else (f"{sweep.num_samples} trials sampled by "
                                                                          f"{sweep.search}")
        print(f"raysdpb: {'resuming ' if resume else ''}{trials}, at most {concurrent} at a time, "
              f"{sweep.num_workers} worker(s) each; results in {plan.experiment_path}", flush=True)
    tuner.fit()
    return read_rows(join(plan.experiment_path, "trials.parquet"))
