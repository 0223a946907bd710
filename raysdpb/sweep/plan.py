"""The plan of a sweep: its grid (or its sampled search), its metric, ASHA's groups and time scale, and where the
experiment lives, all from the validated config (no Ray), so `--dry-run` and the tests can look at it alone."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from raysdpb.config import TRACKER_KEYS, ExperimentConfig, SweepConfig, TrialConfig, absolute_path
from raysdpb.errors import UserError
from raysdpb.methods import METHODS
from raysdpb.results.recorder import TrialInfo
from raysdpb.results.schema import SCORE_KEY, TRAIN_METRICS, eval_metric_keys, main_metric
from raysdpb.results.storage import join
from raysdpb.sweep.grid import TrialPoint, expand, flatten_config
from raysdpb.sweep.scheduler import group_key
from raysdpb.sweep.space import SampledSpace, corner_points, draw_random
from raysdpb.trackers import check_installed, check_wandb_login, wandb_settings

log = logging.getLogger(__name__)

__all__ = ["SweepPlan", "plan_sweep", "planned_epochs", "describe_asha", "asha_rungs", "trial_info", "search_record",
           "SWEEP_FORMAT"]

# what `grid.json` records as the layout of the experiment folder; a sweep of another format (one started by an
# older raysdpb) is not resumed (raysdpb.sweep.checks.check_experiment)
SWEEP_FORMAT = 2


@dataclass
class SweepPlan:
    experiment: ExperimentConfig
    sweep: SweepConfig
    points: list[TrialPoint]       # the trials known before the sweep runs (grid, random); none for optuna and bohb
    metric: str
    mode: str
    max_t: float | None           # ASHA's (or HyperBand's) max_t (None without ASHA)
    storage_path: str              # absolute local path or URI
    experiment_path: str           # <storage_path>/<name>
    score_metrics: dict[str, str] = field(default_factory=dict)  # trial id -> its task's main metric (`score`)
    asha_groups: dict[str, tuple] = field(default_factory=dict)  # trial id -> its ASHA group (see scheduler.py)
    space: SampledSpace | None = None  # what optuna or bohb sample (their trials are made as they suggest them)
    check_points: list[TrialPoint] = field(default_factory=list)  # what is checked before Ray: points, or the
    # search's corners (raysdpb.sweep.space.corner_points) when the trials are not known before
    score_metric: str | None = None  # the one task's main metric of a sampled search (one task per searcher)

    @property
    def held(self) -> dict:
        """What each trial holds, for the report's cost table (GPU-hours)."""
        gpus = self.sweep.num_workers * self.sweep.gpus_per_worker if self.sweep.use_gpu else 0.0
        return {"gpus_per_trial": float(gpus), "cpus_per_trial": self.sweep.num_workers * self.sweep.cpus_per_worker}

    @property
    def trials(self) -> list[TrialInfo]:
        return [trial_info(p, self.held, self.score_metrics.get(p.trial_id)) for p in self.points]


def trial_info(point: TrialPoint, held: dict, main_metric: str | None) -> TrialInfo:
    """A trial's row before any report: its config columns (without the local-mode tracker keys: a sweep's trackers
    are the sweep's, sweep.loggers), what it holds, its planned epochs and its task's main metric."""
    return TrialInfo(point.trial_id, point.label, _config_columns(point.config) | held, planned_epochs(point.config),
                     main_metric=main_metric)


def _config_columns(config: TrialConfig) -> dict:
    return {k: v for k, v in flatten_config(config).items() if k.split(".")[0] not in TRACKER_KEYS}


def planned_epochs(config: TrialConfig) -> int:
    return config.epochs * METHODS[config.method].epoch_multiplier


def _metrics_of(config: TrialConfig) -> tuple[str, list[str]]:
    """The main metric key a trial reports (`eval_<metric>`, `eval_dev_<metric>` with a held-out dev split) and
    every eval key it reports."""
    from raysdpb.tasks import resolve_task
    from raysdpb.tasks.heldout import check_dev_prefix

    try:
        task = resolve_task(config)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a task that cannot be resolved is the user's config
        raise UserError(f"task: {config.task!r} could not be set up: {err}") from None
    evaluates = config.evaluates
    if evaluates != "validation":
        check_dev_prefix(task, config.eval_split)
    return (main_metric(task, config.eval_split, evaluates), eval_metric_keys(task, config.eval_split, evaluates))


def _storage(path: str) -> str:
    return absolute_path(path, "sweep.storage_path")


def check_gpu_shares(sweep, source: str = "<config>") -> None:
    """A trial's workers may hold a share of a GPU (`gpus_per_worker: 0.25`: four small trials on one GPU) only when
    the trial has one worker: Ray may place two fractional workers of one trial on the same GPU, and NCCL refuses
    two ranks of one process group on one device. Above 1, Ray takes whole GPUs only."""
    share = sweep.gpus_per_worker
    if not sweep.use_gpu or share == int(share):
        return
    if share > 1:
        raise UserError(f"{source}: sweep.gpus_per_worker: {share:g}: a worker takes a share of one GPU (0.25, 0.5) "
                        "or whole GPUs (1, 2), not a fraction above 1")
    if sweep.num_workers > 1:
        raise UserError(f"{source}: sweep.gpus_per_worker: {share:g} with num_workers: {sweep.num_workers}: a trial "
                        "with several workers (DDP ranks) needs a whole GPU per worker, since Ray may put two "
                        "fractional workers on the same GPU and NCCL refuses two ranks on one device; use "
                        "gpus_per_worker: 1, or num_workers: 1 to share GPUs between trials")


def plan_sweep(experiment: ExperimentConfig, source: str = "<config>") -> SweepPlan:
    """Everything the sweep needs that follows from the config alone; `UserError` naming the key otherwise."""
    sweep = experiment.sweep
    if sweep is None:
        raise UserError(f"{source}: sweep: a sweep needs a `sweep:` block with at least `name:` "
                        "(see sweeps/quickstart.yaml)")
    check_gpu_shares(sweep, source)
    check_installed(sweep.loggers, "sweep.loggers", source)  # before Ray starts: Tune's callbacks need them
    if "wandb" in sweep.loggers:
        check_wandb_login(wandb_settings(sweep.wandb, sweep.name, sweep.name), "sweep.wandb", source)
    if experiment.trial.loggers != ["tensorboard"] or "loggers" in experiment.search:
        log.warning("%s: loggers: the trial's loggers are python -m raysdpb.train's; a sweep logs to "
                    "sweep.loggers (%s)", source, ", ".join(sweep.loggers))
    space = None
    cadence = {"report_every_steps": sweep.report_every_steps, "report_every": sweep.report_every}
    if sweep.search == "grid":
        points = check_points = expand(experiment, **cadence)
    elif sweep.search == "random":
        sampled = SampledSpace.of(experiment, **cadence)
        points = check_points = draw_random(sampled, sweep.num_samples, sweep.seed)
    else:  # optuna, bohb: trials are made as the searcher suggests them
        from raysdpb.sweep.searchers import check_searcher_installed

        check_searcher_installed(sweep.search, source)  # before Ray starts
        space = SampledSpace.of(experiment, **cadence)
        points, check_points = [], corner_points(experiment, **cadence)
    for point in check_points:
        if point.config.device == "cuda" and not sweep.use_gpu:
            raise UserError(f"{source}: device: cuda needs sweep.use_gpu: true (the workers reserve no GPU otherwise)")

    # the metric: ASHA's, the checkpoint score and the summary's (one look at each distinct task). Every trial
    # also reports `score`, its own task's main metric: the metric of a grid whose tasks have different ones.
    asha = sweep.asha
    by_task: dict[tuple, tuple[str, list[str]]] = {}
    score_metrics = {}
    for p in check_points:
        key = (p.config.task, p.config.eval_split, p.config.data_dir, repr(p.config.custom_task),
               p.config.evaluates)
        if key not in by_task:
            by_task[key] = _metrics_of(p.config)
        score_metrics[p.trial_id] = by_task[key][0]
    score_metric = next(iter(score_metrics.values())) if space is not None else None  # (one task per searcher)
    score_metrics = {p.trial_id: score_metrics[p.trial_id] for p in points}
    reported = list(by_task.values())
    common = set.intersection(*(set(keys) for _, keys in reported)) | {SCORE_KEY}
    metric = asha.metric if asha is not None and asha.metric else None
    if metric is None:
        mains = {main for main, _ in reported}
        metric = mains.pop() if len(mains) == 1 else SCORE_KEY
    elif metric not in common and metric not in TRAIN_METRICS:
        raise UserError(f"{source}: sweep.asha.metric: {metric!r} is not reported by every trial; allowed: "
                        f"{', '.join(sorted(common) + list(TRAIN_METRICS))}")
    asha_groups = {}
    if asha is not None and asha.group_by and sweep.search != "bohb":  # (bohb: one HyperBand, no groups)
        asha_groups = {p.trial_id: group_key(p.config.model_dump(), asha.group_by) for p in points}
    mode = asha.mode if asha is not None else "max"

    max_t = None
    if asha is not None:
        max_t = asha.max_t
        if max_t is None:
            if asha.time_attr == "training_iteration" and any(p.config.eval_every_steps or p.config.eval_every
                                                              for p in check_points):
                raise UserError(f"{source}: sweep.asha.max_t: with time_attr training_iteration and reports every "
                                "N steps, set max_t (in reports), or use time_attr: epoch")
            max_t = max(planned_epochs(p.config) for p in check_points)
        if asha.grace_period > max_t:
            raise UserError(f"{source}: sweep.asha.grace_period: {asha.grace_period:g} exceeds max_t={max_t:g}; "
                            f"allowed: up to {max_t:g}")
    storage = _storage(sweep.storage_path)
    return SweepPlan(experiment, sweep, points, metric, mode, max_t, storage, join(storage, sweep.name),
                     score_metrics, asha_groups, space, check_points, score_metric)


def search_record(plan: SweepPlan) -> dict:
    """What a sampled sweep records of its search in grid.json: `--resume` continues it only with the same one."""
    sweep = plan.sweep
    record = {"searcher": sweep.search, "num_samples": sweep.num_samples, "seed": sweep.seed}
    if plan.space is not None:
        record["space"] = plan.space.to_json()
    return json.loads(json.dumps(record))  # as grid.json holds it


def asha_rungs(grace_period: float, max_t: float, reduction_factor: float) -> list[float]:
    """The rungs of Ray Tune's `ASHAScheduler` (its one bracket) in `time_attr` units, first to last: grace_period
    x reduction_factor^k for k = 0 .. int(log(max_t / grace_period) / log(reduction_factor)) (a trial reaching a
    rung is compared there with the others that reached it)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def describe_asha(plan: SweepPlan) -> str:
    """One line on how ASHA runs: its groups, its rungs and what `score` is."""
    asha = plan.sweep.asha
    if asha is None:
        return "ASHA: off (every trial runs all its epochs)"
    if plan.sweep.search == "bohb":
        return (f"scheduler: HyperBandForBOHB instead of ASHA (one HyperBand over every trial); reduction_factor "
                f"{asha.reduction_factor:g}, max_t {plan.max_t:g} ({asha.time_attr}); it pauses trials between its "
                "brackets' rungs and resumes them from their checkpoints")
    groups = (f"{len(set(plan.asha_groups.values()))} group(s) by {'/'.join(asha.group_by)}" if plan.asha_groups
              else f"groups by {'/'.join(asha.group_by)} as trials are sampled" if plan.space and asha.group_by
              else "one group (the whole grid)")
    rungs = ", ".join(f"{r:g}" for r in asha_rungs(asha.grace_period, plan.max_t, asha.reduction_factor))
    line = (f"ASHA: {groups}; grace_period {asha.grace_period:g}, reduction_factor {asha.reduction_factor:g}, "
            f"max_t {plan.max_t:g} ({asha.time_attr}); rungs at {asha.time_attr} {rungs}")
    if plan.metric == SCORE_KEY:
        mains = sorted({f"{p.config.task}: {plan.score_metrics.get(p.trial_id, plan.score_metric)}"
                        for p in plan.points or plan.check_points})
        line += f"; score = each trial's main metric ({', '.join(mains)})"
    return line
