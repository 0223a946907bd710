"""A sweep on Ray: the grid of a config as Ray Tune trials, each trial a Ray Train run of the training loop.

    python -m raysdpb.sweep CONFIG [--resume] [key=value ...]

* Ray: the cluster at `$RAY_ADDRESS` or `sweep.address` ("auto" or host:port) when set, else a local Ray
  instance with this machine's CPUs and GPUs.
* The grid (`raysdpb.grid`): one Tune trial per point, named by its stable trial id.
* Each Tune trial is a thin driver (`trial_driver`) that builds a `ray.train.torch.TorchTrainer` with the
  sweep's `ScalingConfig` (workers per trial, CPUs and GPUs per worker) and calls `fit()`; every worker runs
  `raysdpb.engine.run_trial` with a `RayTrainContext`. The driver itself reserves no CPU (only a little
  memory), so a trial's CPUs and GPUs are exactly its Train workers'; `max_concurrent_trials` follows from
  the cluster's resources. The engine wraps DDP itself and keeps its own overlap batch sampler: Ray's
  `prepare_data_loader` is never called (it would swap the sampler for a `DistributedSampler`).
* ASHA stops weak trials on the validation metric (default: the task's main metric, `eval_<metric>`, or
  `score`, each trial's own task's main metric, when the grid's tasks differ), measured in epochs by default;
  one ASHA per group of comparable trials (`sweep.asha.group_by`; `raysdpb.scheduler.GroupedASHA`).
* Checkpoints: Ray Train keeps `keep_checkpoints` per trial (best by the metric, plus always the latest);
  Train and Tune retry failures up to `max_failures` times, resuming from the newest whole checkpoint on the
  storage (which can be newer than the one Train registered: see `RayTrainContext.latest_checkpoint`). Each
  checkpoint holds the reports up to it, which a resumed run sends again so that Tune misses none.
* Before Ray starts (and with `--dry-run`), every local data file the trials will read is read once, and
  every model's config, so a broken file or a missing model is one error line, not a failure of every
  trial. docs/reliability.md lists the failures a sweep survives and the tests that show it.
* The experiment lives at `<storage_path>/<name>` (a local folder, or a cloud URI such as `s3://bucket/x`):
  Tune's state, `trials.parquet`, `curves.parquet`, TensorBoard events (`tensorboard --logdir` on it), and
  `train_runs/<trial_id>` (the checkpoints), `artifacts/<trial_id>/predictions/*.jsonl` (decoder trials: every
  generated answer, per evaluation). The name has no timestamp, so `--resume` finds it again:
  finished trials are not rerun, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # before ray.train is imported anywhere

from ray.tune import Callback  # noqa: E402

from raysdpb.config import ExperimentConfig, SweepConfig, TrialConfig, absolute_path, load_experiment  # noqa: E402
from raysdpb.context import WorkerContext  # noqa: E402
from raysdpb.errors import UserError, run_cli  # noqa: E402
from raysdpb.grid import TrialPoint, expand, flatten_config  # noqa: E402
from raysdpb.methods import METHODS  # noqa: E402
from raysdpb.scheduler import GroupedASHA, group_key  # noqa: E402
from raysdpb.results import (FINISHED, ResultsRecorder, TrialInfo, best_per_method, filesystem,  # noqa: E402
                             format_table, join, read_finished_marker, read_json, read_rows, write_json)

log = logging.getLogger(__name__)

__all__ = ["RayTrainContext", "SweepPlan", "plan_sweep", "check_data", "check_models", "check_resources",
           "max_concurrent_trials", "train_worker", "trial_driver", "stored_checkpoints",
           "prune_unregistered_checkpoints", "worker_scratch", "main"]

# what each Tune trial (the Train driver) reserves: no CPU, so that the trial's CPUs are its workers'
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}
# environment variables a worker on any node needs to see as the driver does
_PROPAGATED_ENV_PREFIXES = ("RAYSDPB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "RAY_TRAIN_V2_ENABLED")
# the workers' placement group, reported so that the sweep can release it if the trial is stopped (below)
PLACEMENT_GROUP_KEY = "worker_placement_group"
# the reports of the run up to a checkpoint, kept inside it (a resumed run sends them again)
REPORT_FILE = "raysdpb_report.json"
# the sizes of a checkpoint's files, written last: a checkpoint folder on the storage is whole when they match
MANIFEST_FILE = "raysdpb_manifest.json"
CHECKPOINT_PREFIX = "checkpoint_step_"
# training metrics the engine reports besides eval_<metric> (ASHA may use them too, e.g. train_loss with mode min)
SCORE_KEY = "score"  # every trial's report repeats its own task's main metric under this name
_TRAIN_METRICS = ("train_loss", "train_ce", "train_distill", "alpha_mean", "tau_mean")


# --- the plan: grid, metric, ASHA, resources, all from the validated config (no Ray) ----------------------

@dataclass
class SweepPlan:
    experiment: ExperimentConfig
    sweep: SweepConfig
    points: list[TrialPoint]
    metric: str
    mode: str
    max_t: float | None           # ASHA's max_t (None without ASHA)
    storage_path: str              # absolute local path or URI
    experiment_path: str           # <storage_path>/<name>
    score_metrics: dict[str, str] = field(default_factory=dict)  # trial id -> its task's main metric (`score`)
    asha_groups: dict[str, tuple] = field(default_factory=dict)  # trial id -> its ASHA group (see scheduler.py)

    @property
    def trials(self) -> list[TrialInfo]:
        # what each trial holds, for the report's cost table (GPU-hours)
        gpus = self.sweep.num_workers * self.sweep.gpus_per_worker if self.sweep.use_gpu else 0.0
        held = {"gpus_per_trial": float(gpus), "cpus_per_trial": self.sweep.num_workers * self.sweep.cpus_per_worker}
        return [TrialInfo(p.trial_id, p.label, flatten_config(p.config) | held, planned_epochs(p.config))
                for p in self.points]


def planned_epochs(config: TrialConfig) -> int:
    return config.epochs * METHODS[config.method].epoch_multiplier


def _main_metric_of(config: TrialConfig) -> tuple[str, list[str]]:
    """The main metric key a trial reports (`eval_<metric>`) and every eval key it reports."""
    from raysdpb.tasks import resolve_task

    try:
        task = resolve_task(config)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a task that cannot be resolved is the user's config
        raise UserError(f"task: {config.task!r} could not be set up: {err}") from None
    splits = ((config.eval_split, ""),) if config.eval_split else tuple(task.eval_splits)
    keys = [f"eval_{prefix}{m}" for _, prefix in splits for m in task.metrics]
    return f"eval_{splits[0][1]}{task.metrics[0]}", keys


def _storage(path: str) -> str:
    return absolute_path(path, "sweep.storage_path")


def plan_sweep(experiment: ExperimentConfig, source: str = "<config>") -> SweepPlan:
    """Everything the sweep needs that follows from the config alone; `UserError` naming the key otherwise."""
    sweep = experiment.sweep
    if sweep is None:
        raise UserError(f"{source}: sweep: a sweep needs a `sweep:` block with at least `name:` "
                        "(see sweeps/quickstart.yaml)")
    points = expand(experiment, report_every_steps=sweep.report_every_steps)
    for point in points:
        if point.config.device == "cuda" and not sweep.use_gpu:
            raise UserError(f"{source}: device: cuda needs sweep.use_gpu: true (the workers reserve no GPU otherwise)")

    # the metric: ASHA's, the checkpoint score and the summary's (one look at each distinct task). Every trial
    # also reports `score`, its own task's main metric: the metric of a grid whose tasks have different ones.
    asha = sweep.asha
    by_task: dict[tuple, tuple[str, list[str]]] = {}
    score_metrics = {}
    for p in points:
        key = (p.config.task, p.config.eval_split, p.config.data_dir, repr(p.config.custom_task))
        if key not in by_task:
            by_task[key] = _main_metric_of(p.config)
        score_metrics[p.trial_id] = by_task[key][0]
    reported = list(by_task.values())
    common = set.intersection(*(set(keys) for _, keys in reported)) | {SCORE_KEY}
    metric = asha.metric if asha is not None and asha.metric else None
    if metric is None:
        mains = {main for main, _ in reported}
        metric = mains.pop() if len(mains) == 1 else SCORE_KEY
    elif metric not in common and metric not in _TRAIN_METRICS:
        raise UserError(f"{source}: sweep.asha.metric: {metric!r} is not reported by every trial; allowed: "
                        f"{', '.join(sorted(common) + list(_TRAIN_METRICS))}")
    asha_groups = {}
    if asha is not None and asha.group_by:
        asha_groups = {p.trial_id: group_key(p.config.model_dump(), asha.group_by) for p in points}
    mode = asha.mode if asha is not None else "max"

    max_t = None
    if asha is not None:
        max_t = asha.max_t
        if max_t is None:
            if asha.time_attr == "training_iteration" and any(p.config.eval_every_steps for p in points):
                raise UserError(f"{source}: sweep.asha.max_t: with time_attr training_iteration and reports every "
                                "N steps, set max_t (in reports), or use time_attr: epoch")
            max_t = max(planned_epochs(p.config) for p in points)
        if asha.grace_period > max_t:
            raise UserError(f"{source}: sweep.asha.grace_period: {asha.grace_period} exceeds max_t={max_t:g}; "
                            f"allowed: 1..{max_t:g}")
    storage = _storage(sweep.storage_path)
    return SweepPlan(experiment, sweep, points, metric, mode, max_t, storage, join(storage, sweep.name),
                     score_metrics, asha_groups)


def check_data(plan: SweepPlan, source: str = "<config>", *, cluster: bool = False) -> None:
    """Read every split the trials will read from local files (a `data_dir` mirror or a custom task's files)
    once, so that a broken file ends the sweep with one `UserError` naming the file, record and field before
    Ray starts, instead of failing every trial on the workers; so does a training set too small for one batch
    on each worker. Data from the hub is left to the workers; so is a `data_dir` this machine does not have when
    the sweep runs on a cluster (`cluster`)."""
    from raysdpb.tasks import data_dir_from, load_examples, resolve_task

    def source_of(cfg) -> tuple:
        return cfg.task, cfg.data_dir, repr(cfg.custom_task), cfg.train_split, cfg.eval_split

    train_sizes: dict[tuple, int | None] = {}  # examples in the training split; None: not read here
    for point in plan.points:
        cfg = point.config
        key = source_of(cfg)
        if key in train_sizes:
            continue
        train_sizes[key] = None  # the hub, or a folder only the workers have
        data_dir = data_dir_from(cfg.data_dir)
        if cfg.task != "custom" and data_dir is None:
            if hub_offline():  # every trial would fail on its workers, one after another
                raise UserError(f"{source}: task {cfg.task}: no data_dir and no $RAYSDPB_DATA_DIR, and the Hugging "
                                "Face hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): set RAYSDPB_DATA_DIR "
                                "(or data_dir: in the config) to a local mirror laid out like shared/data (see its "
                                "MANIFEST.md), or unset the offline variable")
            continue  # the hub
        if cluster and data_dir is not None and not Path(data_dir).exists():
            log.warning("%s: data_dir %s is not on this machine; the workers will read it", source, data_dir)
            continue
        task = resolve_task(cfg)
        splits = [cfg.train_split or task.train_split]
        splits += [cfg.eval_split] if cfg.eval_split else [split for split, _ in task.eval_splits]
        for split in dict.fromkeys(splits):
            try:
                records = load_examples(task, split, data_dir, custom=cfg.custom_task)
            except UserError as err:
                raise UserError(f"{source}: {err}") from None
            if split == splits[0]:
                train_sizes[key] = len(records)
    for point in plan.points:
        size = train_sizes[source_of(point.config)]
        if size is not None:
            _check_train_size(point.config, size, plan.sweep.num_workers, source)


def _check_train_size(cfg, size: int, num_workers: int, source: str) -> None:
    """The trial's training set (after `max_train_samples`) fills one batch on each worker (`make_sampler`'s rule)."""
    from raysdpb.engine import make_sampler
    from raysdpb.methods import get_method

    n = min(size, cfg.max_train_samples or size)
    try:
        make_sampler(get_method(cfg.method), n, cfg.batch_size, seed=0, num_replicas=num_workers)
    except UserError as err:
        raise UserError(f"{source}: task {cfg.task}: {err}") from None


def check_models(plan: SweepPlan, source: str = "<config>", *, cluster: bool = False) -> None:
    """Read the config of every model the trials will build (`raysdpb.models.check_model`: no weights), so that
    a missing model, or `num_layers` deeper than the model, ends the sweep with one `UserError` before Ray
    starts, instead of failing every trial on its workers (each retried `sweep.max_failures` times). On a
    cluster (`cluster`), a local folder this machine does not have is left to the workers."""
    from raysdpb.models import check_model, is_missing_local_folder

    seen = set()
    for point in plan.points:
        cfg = point.config
        key = (cfg.model, cfg.gguf_file, cfg.num_layers)
        if key in seen:
            continue
        seen.add(key)
        if cluster and is_missing_local_folder(cfg.model):
            log.warning("%s: model folder %s is not on this machine; the workers will load it", source, cfg.model)
            continue
        try:
            check_model(cfg.model, cfg.gguf_file, cfg.num_layers)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def hub_offline() -> bool:
    """Whether this process may not reach the Hugging Face hub (the variables `huggingface_hub` and `datasets` read)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _node_resources(nodes: list[dict]) -> list[dict]:
    return [n.get("Resources", n) for n in nodes if n.get("Alive", True)]


def check_resources(sweep: SweepConfig, nodes: list[dict], source: str = "<config>") -> None:
    """Fail before any trial starts when a trial's workers can never be placed on these nodes
    (`ray.nodes()`-style dicts, or plain resource dicts)."""
    resources = _node_resources(nodes)
    if not resources:
        return
    cpu = sweep.cpus_per_worker
    gpu = sweep.gpus_per_worker if sweep.use_gpu else 0.0
    max_cpu = max(r.get("CPU", 0.0) for r in resources)
    max_gpu = max(r.get("GPU", 0.0) for r in resources)
    total_cpu = sum(r.get("CPU", 0.0) for r in resources)
    total_gpu = sum(r.get("GPU", 0.0) for r in resources)
    if sweep.use_gpu and max_gpu == 0:
        raise UserError(f"{source}: sweep.use_gpu: true, but no node of the cluster has a GPU; set "
                        "sweep.use_gpu: false (CPU workers) or add GPU nodes")
    if gpu > max_gpu:
        raise UserError(f"{source}: sweep.gpus_per_worker: {gpu:g} GPUs per worker, but the largest node has "
                        f"{max_gpu:g}; allowed: up to {max_gpu:g}")
    if cpu > max_cpu:
        raise UserError(f"{source}: sweep.cpus_per_worker: {cpu:g} CPUs per worker, but the largest node has "
                        f"{max_cpu:g}; allowed: up to {max_cpu:g}")
    if not any(r.get("CPU", 0.0) >= cpu and r.get("GPU", 0.0) >= gpu for r in resources):
        raise UserError(f"{source}: sweep.cpus_per_worker: no node has {cpu:g} CPUs and {gpu:g} GPUs together "
                        "for one worker")
    if sweep.num_workers * cpu > total_cpu:
        raise UserError(f"{source}: sweep.num_workers: {sweep.num_workers} workers x {cpu:g} CPUs need "
                        f"{sweep.num_workers * cpu:g} CPUs, but the cluster has {total_cpu:g}; allowed: up to "
                        f"{int(total_cpu // cpu)} workers (or lower sweep.cpus_per_worker)")
    if gpu and sweep.num_workers * gpu > total_gpu:
        raise UserError(f"{source}: sweep.num_workers: {sweep.num_workers} workers x {gpu:g} GPUs need "
                        f"{sweep.num_workers * gpu:g} GPUs, but the cluster has {total_gpu:g}; allowed: up to "
                        f"{int(total_gpu // gpu)} workers")


def max_concurrent_trials(sweep: SweepConfig, nodes: list[dict]) -> int:
    """`sweep.max_concurrent_trials`, else how many trials' workers fit in the cluster at once."""
    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    resources = _node_resources(nodes)
    limits = [sum(r.get("CPU", 0.0) for r in resources) / (sweep.num_workers * sweep.cpus_per_worker)]
    if sweep.use_gpu and sweep.gpus_per_worker:
        limits.append(sum(r.get("GPU", 0.0) for r in resources) / (sweep.num_workers * sweep.gpus_per_worker))
    return max(1, int(math.floor(min(limits) + 1e-9)))


# --- the Ray Train worker: the engine's context ------------------------------------------------------------

class RayTrainContext(WorkerContext):
    """The engine's context on a Ray Train worker: rank and world from `ray.train.get_context()`, reports and
    checkpoints through `ray.train.report`, resume from `ray.train.get_checkpoint()`, TensorBoard events
    (rank 0) under the experiment folder (written locally and copied there when it is a cloud URI)."""

    def __init__(self, tensorboard_path: str, run_path: str | None = None, score_metric: str | None = None,
                 artifacts_path: str | None = None) -> None:
        import ray
        import ray.train

        train_context = ray.train.get_context()
        self.rank = train_context.get_world_rank()
        self.world_size = train_context.get_world_size()
        self.local_rank = train_context.get_local_rank()
        self.scratch = worker_scratch()
        self.reports = 0
        self.resumed_report: dict | None = None  # the report saved with the checkpoint this run resumed from
        self.lineage: list[dict] = []  # every report up to now: those of the resumed checkpoint, then this run's
        self.run_path = run_path  # <experiment>/train_runs/<trial_id>: where Train keeps this trial's checkpoints
        self.score_metric = score_metric  # reported again as `score` (the task's main metric)
        self._remote_tensorboard = tensorboard_path if "://" in tensorboard_path else None
        local_tb = self.scratch / "tensorboard" if self._remote_tensorboard else Path(tensorboard_path)
        # files the engine writes for people to read (generated predictions): rank 0, copied like the events
        self._remote_artifacts = artifacts_path if artifacts_path and "://" in artifacts_path else None
        local_artifacts = None
        if artifacts_path and self.rank == 0:
            local_artifacts = self.scratch / "artifacts" if self._remote_artifacts else Path(artifacts_path)
        super().__init__(local_tb if self.rank == 0 else None, local_artifacts)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        group = ray.util.get_current_placement_group()
        self.placement_group = group.id.hex() if group is not None else None
        self.worker_nodes = [self.node_id]
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list = [None] * self.world_size
                dist.all_gather_object(gathered, self.node_id)
                self.worker_nodes = sorted(set(gathered))

    def device(self, preference: str = "auto"):
        import torch

        if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        import ray.train.torch

        return ray.train.torch.get_device()  # the GPU Ray assigned to this worker

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        import ray.train

        self._replay()
        self.lineage.append(dict(metrics))
        checkpoint = None
        if checkpoint_dir is not None and self.is_main and any(Path(checkpoint_dir).iterdir()):
            (Path(checkpoint_dir) / REPORT_FILE).write_text(json.dumps(self.lineage, default=str))
            write_manifest(Path(checkpoint_dir))
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        self._send(metrics, checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # uploaded to the storage by now
        self._sync_tensorboard()

    def _send(self, metrics: dict, checkpoint=None) -> None:
        import ray.train

        metrics = {**metrics, "world_size": self.world_size, "worker_node_id": self.node_id,
                   "worker_node_ip": self.node_ip, "num_worker_nodes": len(self.worker_nodes),
                   "worker_pid": os.getpid(), PLACEMENT_GROUP_KEY: self.placement_group}
        if self.score_metric and metrics.get(self.score_metric) is not None:
            metrics[SCORE_KEY] = metrics[self.score_metric]
        if self.resumed_report is not None:  # this run restarted from the checkpoint of that step
            metrics["resumed_from_step"] = int(self.resumed_report.get("step", 0))
        # every rank reports (Train waits for all); only rank 0 hands over the checkpoint it wrote
        self.reports += 1
        name = f"{CHECKPOINT_PREFIX}{int(metrics.get('step', 0)):08d}" if checkpoint else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def _replay(self) -> None:
        """Before the first report after a resume: send again every report up to the checkpoint, in case Tune
        missed some (a report Train never passed on because its worker died right after it, or reports made
        while the sweep was being stopped); the results drop those they have already."""
        if self.reports == 0 and self.resumed_report is not None:
            for past in self.lineage:
                self._send({**past, "replayed": 1})

    def announce_resumed_report(self) -> None:
        """A resumed run that had nothing left to train: send the checkpoint's reports (see `_replay`)."""
        self._replay()

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path | None:
        # Ray Train persists a checkpoint with a report; checkpoints between reports are not kept on Ray
        if not reported:
            return None
        return Path(tempfile.mkdtemp(prefix=f"step_{step:08d}_", dir=self.scratch))

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the newer of the one Ray Train hands over and the newest whole one
        on the storage. Train learns of a checkpoint only when its controller next polls the worker, so a
        worker that dies within that moment (seconds) after a report leaves a checkpoint on the storage that
        Train never registered, and Train would restart from an older one, or from scratch."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        chosen = (checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None
        if self.run_path and self.is_main:
            stored = stored_checkpoints(self.run_path)
            if stored and (chosen is None or stored[-1][0] > checkpoint_step(chosen[1])):
                fs, _ = filesystem(self.run_path)
                chosen = (fs, stored[-1][1])
                log.warning("resuming from %s, newer than the checkpoint Ray Train registered (%s)",
                            chosen[1], checkpoint.path if checkpoint is not None else "none")
        if self.world_size > 1:  # every rank resumes from rank 0's choice
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                box = [chosen[1] if chosen is not None else None]
                dist.broadcast_object_list(box, src=0)
                if box[0] is None:
                    chosen = None
                elif chosen is None or chosen[1] != box[0]:
                    chosen = (filesystem(self.run_path)[0] if self.run_path else checkpoint.filesystem, box[0])
        if chosen is None:
            return None
        import pyarrow.fs

        fs, where = chosen
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            path = Path(where)
        else:
            path = self.scratch / "restored"
            pyarrow.fs.copy_files(where, str(path), source_filesystem=fs)
        if (path / REPORT_FILE).exists():
            saved = json.loads((path / REPORT_FILE).read_text())
            self.lineage = saved if isinstance(saved, list) else [saved]  # one report: an older checkpoint
            self.resumed_report = self.lineage[-1] if self.lineage else None
        return path

    def _sync_tensorboard(self) -> None:
        """Copy the events and artifacts written in the scratch folder to a cloud experiment folder."""
        import pyarrow.fs

        if self._remote_tensorboard and self._writer is not None:
            self._writer.flush()
            fs, path = filesystem(self._remote_tensorboard)
            pyarrow.fs.copy_files(str(self.tensorboard_dir), path, destination_filesystem=fs)
        if self._remote_artifacts and self.artifacts_dir is not None and self.artifacts_dir.exists():
            fs, path = filesystem(self._remote_artifacts)
            pyarrow.fs.copy_files(str(self.artifacts_dir), path, destination_filesystem=fs)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._sync_tensorboard()
        super().close()


def write_manifest(folder: Path) -> None:
    """Record the size of every file of a checkpoint folder (the last file written into it)."""
    sizes = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps(sizes, sort_keys=True))


def checkpoint_step(path: str) -> int:
    """The step in a checkpoint folder's name (`checkpoint_step_00000042` -> 42; -1 for other names)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    try:
        return int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else -1
    except ValueError:
        return -1


def stored_checkpoints(run_path: str) -> list[tuple[int, str]]:
    """`(step, path)` of the whole checkpoints on the storage under a Train run's folder, oldest first: those
    whose files all have the sizes their manifest records (a checkpoint half-uploaded when its worker died
    is left out)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(run_path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        step = checkpoint_step(info.path)
        if info.type != pafs.FileType.Directory or step < 0:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{MANIFEST_FILE}") as f:
                sizes = json.loads(f.read().decode())
            files = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(info.path))}
        except (OSError, ValueError):
            continue
        if all(files.get(name) == size for name, size in sizes.items()):
            found.append((step, info.path))
    return sorted(found)


def prune_unregistered_checkpoints(run_path: str) -> list[str]:
    """Remove the checkpoint folders of a Train run that its checkpoint manager does not know (one a worker
    uploaded just before it died, which Train never registered and so never deletes) once a newer registered
    one supersedes them, and half-uploaded ones; so a trial keeps about `keep_checkpoints` on the storage. An
    unregistered checkpoint newer than every registered one stays: it is what a retry resumes from (see
    `RayTrainContext.latest_checkpoint`). Returns the removed paths."""
    import pyarrow.fs as pafs

    fs, root = filesystem(run_path)
    snapshot = read_json(join(run_path, "checkpoint_manager_snapshot.json"))
    if not isinstance(snapshot, dict):
        return []
    results = list(snapshot.get("checkpoint_results") or []) + [snapshot.get("latest_checkpoint_result") or {}]
    registered = {r.get("checkpoint_dir_name") for r in results if isinstance(r, dict)} - {None}
    newest_registered = max((checkpoint_step(name) for name in registered), default=-1)
    whole = {path for _, path in stored_checkpoints(run_path)}
    removed = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    for info in infos:
        step = checkpoint_step(info.path)
        if info.type != pafs.FileType.Directory or step < 0 or info.base_name in registered:
            continue
        if step < newest_registered or info.path not in whole:
            try:
                fs.delete_dir(info.path)
                removed.append(info.path)
            except OSError as err:
                log.warning("could not remove the unregistered checkpoint %s: %s", info.path, err)
    return removed


SCRATCH_ENV = "RAYSDPB_SCRATCH_DIR"
_SCRATCH_PREFIX = "raysdpb-worker-"


def worker_scratch() -> Path:
    """A worker's scratch folder (checkpoints on their way to the storage, restored checkpoints, events
    bound for a cloud URI) under `$RAYSDPB_SCRATCH_DIR` or the system's temporary folder, named after the
    worker's pid. The worker removes it when it ends; a worker that was killed cannot, so each new worker
    first removes the folders of workers that are no longer alive (a trial killed again and again must not
    fill the disk)."""
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_SCRATCH_PREFIX}*-*"):
        try:
            pid = int(stale.name[len(_SCRATCH_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker of a trial: the engine's training loop."""
    from raysdpb.engine import run_trial

    context = RayTrainContext(loop_config["tensorboard_path"], loop_config.get("run_path"),
                              loop_config.get("score_metric"), loop_config.get("artifacts_path"))
    try:
        result = run_trial(TrialConfig.model_validate(loop_config["trial"]), context)
        context.announce_resumed_report()  # resumed from the checkpoint of the last epoch: nothing was reported
        if result.status == "diverged":
            log.warning("trial %s diverged: %s", loop_config["trial_id"], result.message)
    finally:
        shutil.rmtree(context.scratch, ignore_errors=True)


# --- the Tune trial: a thin driver of one Train run ---------------------------------------------------------

def trial_driver(config: dict, settings: dict) -> None:
    """One Tune trial: a `TorchTrainer` for the trial's config, its results forwarded to Tune."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = config["trial_id"]
    experiment = settings["experiment_path"]
    trial_config = read_json(join(experiment, "grid.json"))["trials"][trial_id]
    finished = read_finished_marker(experiment, trial_id)
    if finished is not None:
        # finished in an earlier run whose Tune state was lost (a killed driver): announce, do not retrain
        ray.tune.report({**finished["last_result"], "replayed": 1})
        return
    resources = {"CPU": settings["cpus_per_worker"]}
    if settings["use_gpu"]:
        resources["GPU"] = settings["gpus_per_worker"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"trial": trial_config, "trial_id": trial_id,
                           "score_metric": settings["score_metrics"].get(trial_id),
                           "tensorboard_path": join(experiment, "tensorboard", trial_id),
                           "run_path": join(experiment, "train_runs", trial_id),
                           "artifacts_path": join(experiment, "artifacts", trial_id)},
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
    try:
        trainer.fit()
    finally:
        removed = prune_unregistered_checkpoints(join(experiment, "train_runs", trial_id))
        if removed:
            log.info("removed %d checkpoint(s) Ray Train never registered: %s", len(removed), ", ".join(removed))


def _trial_name(trial) -> str:
    return trial.config["trial_id"]


# --- the Tune callback: Tune's trial events into the Parquet results ---------------------------------------

def _error_message(trial) -> str:
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone; the row must still be written
        error = None
    text = str(error) if error is not None else ""
    if not text and trial.error_file:
        try:
            text = Path(trial.error_file).read_text()
        except OSError:
            text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # the innermost "SomeError: message" line says most; keep the tail of the traceback for context
    headline = next((line.strip() for line in reversed(lines) if "Error:" in line or "Exception:" in line),
                    lines[-1].strip() if lines else "unknown error")
    return headline if len(lines) <= 1 else f"{headline}\n" + "\n".join(lines[-20:])


class PlacementGroupReaper:
    """Releases the placement group of a Train run whose Tune trial was stopped early (by ASHA).

    Tune stops a trial by ending its actor, which takes the Train controller with it before the controller
    can remove its workers' placement group; Ray Train's own `PlacementGroupCleaner` only works where the
    Ray dashboard (state API, `ray[default]`) runs, and otherwise the group holds its CPUs/GPUs until the
    sweep ends, so the next trials wait forever (ray-project/ray#54305). A grace period after the trial ends
    lets the controller die first, so it cannot ask for a new group after this one is removed."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.groups: dict[str, str] = {}       # trial id -> the hex id its workers last reported
        self.due: list[tuple[float, str]] = []

    def seen(self, trial_id: str, result: dict) -> None:
        if result.get(PLACEMENT_GROUP_KEY):
            self.groups[trial_id] = result[PLACEMENT_GROUP_KEY]

    def trial_ended(self, trial_id: str) -> None:
        group = self.groups.pop(trial_id, None)
        if group:
            self.due.append((time.monotonic() + self.grace_s, group))

    def reap(self, force: bool = False) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        now = time.monotonic()
        keep = []
        for when, group in self.due:
            if when > now and not force:
                keep.append((when, group))
                continue
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group)))
            try:
                if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                    remove_placement_group(pg)
                    log.info("released the placement group %s of a stopped trial", group)
            except Exception as err:  # noqa: BLE001 - already gone, or the cluster is shutting down
                log.debug("placement group %s: %s", group, err)
        self.due = keep


class ResultsCallback(Callback):
    """Forwards Tune's trial events to a `ResultsRecorder` (the Parquet files). Tune pickles it into the
    experiment state; the rows are not pickled, `setup` reloads them from the Parquet files on `--resume`."""

    def __init__(self, experiment_path: str, trials: list[TrialInfo], metric: str, mode: str, time_attr: str,
                 scheduler=None):
        self.args = (experiment_path, trials, metric, mode, time_attr)
        self.scheduler = scheduler  # the sweep's ASHA: pickled with this callback, so the same object on resume
        self.recorder: ResultsRecorder | None = None
        self.reaper: PlacementGroupReaper | None = None

    def setup(self, **info):
        experiment_path, trials, metric, mode, time_attr = self.args
        self.reaper = PlacementGroupReaper()
        self.recorder = ResultsRecorder(experiment_path, trials, metric=metric, mode=mode, time_attr=time_attr)
        self.recorder.load()
        self.recorder.write()
        if self.scheduler is not None:
            self._replay_recorded_results()

    def _replay_recorded_results(self) -> None:
        """On --resume: Tune does not save its scheduler's state, so ASHA would start with empty rungs: it
        would stop nothing until new trials filled them, and judge a resumed trial's reports again against
        rungs filled in another order. Give it every result recorded before, of finished and unfinished
        trials, keyed by the sweep's trial ids (see raysdpb.scheduler)."""
        if isinstance(self.scheduler, GroupedASHA):
            for trial_id in self.recorder.trials:
                self.scheduler.record_past_results(trial_id, self.recorder.curves_of(trial_id))
            return
        # a plain ASHAScheduler, pickled by a sweep started before GroupedASHA took every ASHA sweep: it knows
        # trials by Tune's ids, so only the finished trials' results can be given back, under stand-in ids
        from types import SimpleNamespace

        for trial_id, state in self.recorder.trials.items():
            if state.status not in FINISHED:
                continue
            stub = SimpleNamespace(trial_id=f"finished:{trial_id}", config={"trial_id": trial_id})
            curves = self.recorder.curves_of(trial_id)
            self.scheduler.on_trial_add(None, stub)
            for row in curves:
                self.scheduler.on_trial_result(None, stub, row)
            self.scheduler.on_trial_complete(None, stub, curves[-1] if curves else {})

    def on_trial_start(self, iteration, trials, trial, **info):
        self.recorder.on_start(_trial_name(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune sets `done` on a result when the scheduler (ASHA) stops the trial on it
        self.recorder.on_result(_trial_name(trial), result, stopped=bool(result.get("done")))
        self.reaper.seen(_trial_name(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.recorder.on_complete(_trial_name(trial))
        self.reaper.trial_ended(_trial_name(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.recorder.on_error(_trial_name(trial), _error_message(trial))
        self.reaper.trial_ended(_trial_name(trial))

    def on_step_end(self, iteration, trials, **info):
        self.reaper.reap()

    def on_experiment_end(self, trials, **info):
        self.recorder.close()

    def __getstate__(self):
        return {"args": self.args, "scheduler": self.scheduler, "recorder": None, "reaper": None}


# --- Ray and the CLI ----------------------------------------------------------------------------------------

def _connect(address: str | None) -> None:
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(_PROPAGATED_ENV_PREFIXES)}
    runtime_env = {"env_vars": env} if env else None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        try:
            context = ray.init(address=address, runtime_env=runtime_env)
        except ConnectionError as err:
            raise UserError(f"could not connect to the Ray cluster at {address!r} ({err}); start it "
                            "(`ray up cluster.yaml`, `ray start --head`) or unset RAY_ADDRESS / sweep.address "
                            "for a local Ray") from None
    else:
        log.info("starting a local Ray instance")
        # "local": a new instance, never a cluster some earlier `ray start` left recorded in /tmp/ray
        context = ray.init(address="local", runtime_env=runtime_env)
    if not getattr(context, "dashboard_url", None):
        log.warning("the Ray dashboard is not running (pip install 'ray[default]'): Ray Train's placement-group "
                    "cleaner cannot see stopped trials, so each trial ASHA stops leaves an idle Ray process "
                    "until the sweep ends (its CPUs/GPUs are released by raysdpb)")


def _localize(config: TrialConfig) -> dict:
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


def check_experiment(plan: SweepPlan, resume: bool, source: str = "<config>") -> None:
    """A new sweep must not land in an existing experiment folder; `--resume` needs one, with the same grid."""
    from ray.tune import Tuner

    path = plan.experiment_path
    exists = Tuner.can_restore(path)
    if resume and not exists:
        raise UserError(f"{source}: sweep.name: there is no sweep to resume at {path}; "
                        "run without --resume to start it")
    if not resume and exists:
        raise UserError(f"{source}: sweep.name: a sweep already exists at {path}; pass --resume to continue it, "
                        f"or choose another name (sweep.name=...)")
    if resume:
        saved = read_json(join(path, "grid.json"))
        if saved is not None and saved.get("trial_ids") != [p.trial_id for p in plan.points]:
            raise UserError(f"{source}: search: the grid differs from the one the sweep at {path} started with "
                            f"({len(saved.get('trial_ids', []))} trials); resume with the same config and overrides, "
                            "or start a new sweep (sweep.name=...)")


def run_sweep(plan: SweepPlan, *, resume: bool = False, source: str = "<config>", verbose: int = 1) -> list[dict]:
    """Run (or resume) the sweep on the connected Ray; returns the rows of trials.parquet."""
    import ray
    from ray import tune

    # a diverged trial's last report may lack the metric
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    nodes = ray.nodes()
    check_resources(plan.sweep, nodes, source)
    concurrent = max_concurrent_trials(plan.sweep, nodes)
    if sum(1 for n in nodes if n.get("Alive")) > 1 and "://" not in plan.storage_path:
        log.warning("sweep.storage_path %s is a local path on a multi-node cluster: it must be a shared "
                    "file system (NFS), or use a cloud URI (s3://...)", plan.storage_path)
    check_experiment(plan, resume, source)
    if not resume:
        # the trials' configs as the workers run them; Tune's own trial config is just the id and label
        write_json(join(plan.experiment_path, "grid.json"),
                   {"trial_ids": [p.trial_id for p in plan.points],
                    "trials": {p.trial_id: _localize(p.config) for p in plan.points}})

    sweep = plan.sweep
    settings = {"experiment_path": plan.experiment_path, "num_workers": sweep.num_workers, "use_gpu": sweep.use_gpu,
                "cpus_per_worker": sweep.cpus_per_worker, "gpus_per_worker": sweep.gpus_per_worker,
                "keep_checkpoints": sweep.keep_checkpoints, "max_failures": sweep.max_failures,
                "metric": plan.metric, "mode": plan.mode, "score_metrics": plan.score_metrics}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, settings=settings), DRIVER_RESOURCES)
    if resume:
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    else:
        scheduler = None
        if sweep.asha is not None:
            # stop_last_trials=False: a trial that reaches max_t ends by itself; Tune stopping it there would
            # end its Train run abruptly (see PlacementGroupReaper)
            asha = dict(time_attr=sweep.asha.time_attr, max_t=plan.max_t, grace_period=sweep.asha.grace_period,
                        reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
            # one ASHA per group of comparable trials (raysdpb.scheduler), or one over the grid (group_by: [])
            scheduler = GroupedASHA(plan.asha_groups or {p.trial_id: () for p in plan.points}, **asha)
        callback = ResultsCallback(plan.experiment_path, plan.trials, plan.metric, plan.mode,
                                   sweep.asha.time_attr if sweep.asha else "epoch", scheduler)
        tuner = tune.Tuner(
            trainable,
            # one grid point per trial: the search space is already expanded (raysdpb.grid)
            param_space={"trial_id": tune.grid_search([p.trial_id for p in plan.points])},
            tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=scheduler,
                                        max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=sweep.name, storage_path=plan.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      callbacks=[callback], verbose=verbose),
        )
    log.info("%d trials, at most %d at a time, %d worker(s) each; results in %s", len(plan.points), concurrent,
             sweep.num_workers, plan.experiment_path)
    tuner.fit()
    return read_rows(join(plan.experiment_path, "trials.parquet"))


def describe_asha(plan: SweepPlan) -> str:
    """One line on how ASHA runs: its groups, its rungs and what `score` is."""
    asha = plan.sweep.asha
    if asha is None:
        return "ASHA: off (every trial runs all its epochs)"
    groups = (f"{len(set(plan.asha_groups.values()))} group(s) by {'/'.join(asha.group_by)}" if plan.asha_groups
              else "one group (the whole grid)")
    line = (f"ASHA: {groups}; grace_period {asha.grace_period}, reduction_factor {asha.reduction_factor:g}, "
            f"max_t {plan.max_t:g} ({asha.time_attr})")
    if plan.metric == SCORE_KEY:
        mains = sorted({f"{p.config.task}: {plan.score_metrics[p.trial_id]}" for p in plan.points})
        line += f"; score = each trial's main metric ({', '.join(mains)})"
    return line


def summary(rows: list[dict], metric: str, mode: str) -> str:
    best = best_per_method(rows, metric, mode)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    head = f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if not best:
        return head + f"\nno trial reported {metric}"
    table = format_table(best, ["method", f"best_{metric}", "best_epoch", "status", "label", "trial_id"])
    return f"{head}\nbest trial per method by {metric} ({mode}):\n{table}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysdpb.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a YAML config with search: and sweep: blocks (e.g. sweeps/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.name=try2 search.seed=[0,1]")
    p.add_argument("--resume", action="store_true", help="continue the sweep of the same name where it stopped")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the local data files and the models, print the trials of the grid "
                        "and exit (no Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="less output from Tune")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come between overrides
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    experiment = load_experiment(args.config, args.overrides)
    plan = plan_sweep(experiment, source=args.config)
    cluster = bool(os.environ.get("RAY_ADDRESS") or plan.sweep.address)
    check_data(plan, args.config, cluster=cluster)
    check_models(plan, args.config, cluster=cluster)
    if args.dry_run:
        for point in plan.points:
            print(f"{point.trial_id}  {point.label}")
        print(f"{len(plan.points)} trials; metric {plan.metric} ({plan.mode}); experiment {plan.experiment_path}")
        print(describe_asha(plan))
        return 0

    check_experiment(plan, args.resume, args.config)  # before starting Ray: a mistake here costs nothing
    import ray

    _connect(os.environ.get("RAY_ADDRESS") or plan.sweep.address)
    try:
        rows = run_sweep(plan, resume=args.resume, source=args.config, verbose=0 if args.quiet else 1)
    finally:
        ray.shutdown()
    print(summary(rows, plan.metric, plan.mode), flush=True)
    print(f"results: {join(plan.experiment_path, 'trials.parquet')}, {join(plan.experiment_path, 'curves.parquet')}; "
          f"curves: tensorboard --logdir {plan.experiment_path}", flush=True)
    unfinished = [r for r in rows if r["status"] in ("interrupted", "pending", "running")]
    errored = [r for r in rows if r["status"] == "errored"]
    for row in errored:
        print(f"raysdpb: trial {row['trial_id']} ({row['label']}) failed: {row['stop_reason']}", file=sys.stderr)
    if unfinished:
        print(f"raysdpb: {len(unfinished)} trials did not finish; continue with --resume", file=sys.stderr)
    return 1 if errored or unfinished else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
