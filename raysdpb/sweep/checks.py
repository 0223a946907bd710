"""Checks before a sweep starts: every data file the trials read and every model they build (no Ray), whether
the cluster can place a trial at all, and whether the experiment folder is the one to start or resume. A
mistake ends the sweep with one `UserError` line before any trial runs, instead of failing every trial on its
workers, each retried `sweep.max_failures` times."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from raysdpb.config import SweepConfig
from raysdpb.errors import UserError
from raysdpb.results.storage import join, read_json
from raysdpb.sweep.plan import SWEEP_FORMAT, SweepPlan, search_record

log = logging.getLogger(__name__)

__all__ = ["check_data", "check_models", "check_resources", "check_experiment", "max_concurrent_trials",
           "hub_offline"]


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
    for point in plan.check_points:
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
        splits = [task.training_split(cfg.train_split)] + [s for s, _ in task.evaluation_splits(cfg.eval_split)]
        for split in dict.fromkeys(splits):
            try:
                records = load_examples(task, split, data_dir, custom=cfg.custom_task)
            except UserError as err:
                raise UserError(f"{source}: {err}") from None
            if split == splits[0]:
                train_sizes[key] = len(records)
    for point in plan.check_points:
        size = train_sizes[source_of(point.config)]
        if size is not None:
            _check_train_size(point.config, size, plan.sweep.num_workers, source)


def _check_train_size(cfg, size: int, num_workers: int, source: str) -> None:
    """The trial's training set (less a held-out dev set, after `max_train_samples`) fills one batch on each worker
    (`make_sampler`'s rule)."""
    from raysdpb.methods import get_method
    from raysdpb.recipe.components import make_sampler
    from raysdpb.tasks.heldout import heldout_size

    if cfg.heldout_dev is not None:
        try:
            size -= heldout_size(cfg.heldout_dev.size, size)
        except ValueError as err:
            raise UserError(f"{source}: heldout_dev.size: {err} (task {cfg.task})") from None
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
    for point in plan.check_points:
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
        if saved is None or saved.get("format") != SWEEP_FORMAT:
            found = "no grid.json" if saved is None else f"format {saved.get('format', 1)}"
            raise UserError(f"{source}: sweep.name: the sweep at {path} was started by an older raysdpb ({found}; this "
                            f"version resumes format {SWEEP_FORMAT}); start a new sweep (sweep.name=...), or resume it "
                            "with the raysdpb version that started it")
        record = search_record(plan) if plan.sweep.search != "grid" else None
        if saved.get("search") != record:
            was = (saved.get("search") or {}).get("searcher", "grid")
            raise UserError(f"{source}: sweep.search: the search differs from the one the sweep at {path} started "
                            f"with ({was}: its searcher, num_samples, seed or search block); resume with the same "
                            "config and overrides, or start a new sweep (sweep.name=...)")
        if saved.get("trial_ids") != [p.trial_id for p in plan.points]:
            raise UserError(f"{source}: search: the grid differs from the one the sweep at {path} started with "
                            f"({len(saved.get('trial_ids', []))} trials); resume with the same config and overrides, "
                            "or start a new sweep (sweep.name=...)")
