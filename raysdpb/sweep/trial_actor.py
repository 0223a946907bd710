"""A single-worker trial run warm, in Tune's own trial actor: no Ray Train controller and worker group to start,
and an actor that Tune reuses for the next trial (`reuse_actors`), so the libraries are imported and the tokenized
data kept once per actor, not once per trial.

A multi-worker trial (DDP) stays a Ray Train run (`raysdpb.sweep.worker`); so does every trial with
`sweep.warm_trials: false`. What a warm trial leaves is the same as a Train run's, so that resume, the results,
cleanup and export do not tell them apart: its checkpoints under `<experiment>/train_runs/<trial_id>/` (written
whole, then named; `CheckpointKeeper` keeps `keep_checkpoints` of them as Ray Train does, best by the sweep's
metric plus the latest, and records them in the same `checkpoint_manager_snapshot.json`), its reports through
`ray.tune.report`. A failure (the actor killed, an exception) is Tune's to retry (`sweep.max_failures`): the retry
resumes from the newest whole checkpoint on the storage.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from raysdpb.results.schema import is_number
from raysdpb.results.storage import filesystem, join, read_json, upload, write_json
from raysdpb.sweep.worker import SweepContext, run_sweep_trial

log = logging.getLogger(__name__)

__all__ = ["TrialActorContext", "CheckpointKeeper", "run_in_trial_actor", "SNAPSHOT_FILE"]

# Ray Train's record of a run's checkpoints; raysdpb.sweep.cleanup reads it for both kinds of trial
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# tokenized splits a trial actor keeps for the trials after it (a few tasks at a time)
_MEMO_ENTRIES = 4
_MEMO: OrderedDict[tuple, Any] = OrderedDict()
_TRIALS_RUN = 0  # the trials this actor process has started (a reused actor: more than one)


class CheckpointKeeper:
    """Keeps `keep` checkpoints of a run, as Ray Train's checkpoint manager does: the best by `metric` (`mode`) and
    always the latest (what a retry resumes from), recorded in the run's `checkpoint_manager_snapshot.json`
    (`checkpoint_results`, `latest_checkpoint_result`) before the others are deleted. Starts from the snapshot an
    earlier attempt left."""

    def __init__(self, run_path: str, metric: str | None, mode: str, keep: int) -> None:
        self.run_path, self.metric, self.mode, self.keep = run_path, metric, mode, keep
        snapshot = read_json(join(run_path, SNAPSHOT_FILE))
        snapshot = snapshot if isinstance(snapshot, dict) else {}
        self.results: list[dict] = [r for r in snapshot.get("checkpoint_results") or [] if isinstance(r, dict)]
        latest = snapshot.get("latest_checkpoint_result")
        self.latest: dict | None = latest if isinstance(latest, dict) else None
        if "://" not in run_path:  # checkpoints an earlier attempt was writing when it died (never renamed)
            for partial in Path(run_path).glob(".step_*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)

    def _rank(self, result: dict) -> float:
        value = (result.get("metrics") or {}).get(self.metric)
        if not is_number(value):
            return float("-inf")  # no metric: ranked worst, as Ray Train does
        return float(value) if self.mode == "max" else -float(value)

    def add(self, name: str, metrics: dict) -> list[str]:
        """Register the checkpoint `name` (already whole under the run) with its report; returns the names of the
        checkpoints it made redundant, which are deleted after the snapshot is written."""
        result = {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}
        self.results = [r for r in self.results if r.get("checkpoint_dir_name") != name] + [result]
        self.latest = result
        ranked = sorted(self.results, key=self._rank, reverse=True)  # stable: ties keep the older first
        kept = {r["checkpoint_dir_name"] for r in ranked[:self.keep]} | {name}
        dropped = [r["checkpoint_dir_name"] for r in self.results if r["checkpoint_dir_name"] not in kept]
        self.results = [r for r in self.results if r["checkpoint_dir_name"] in kept]
        write_json(join(self.run_path, SNAPSHOT_FILE),
                   {"ray_version": _ray_version(), "checkpoint_results": self.results,
                    "latest_checkpoint_result": self.latest, "written_by": "raysdpb.sweep.trial_actor"})
        fs, root = filesystem(self.run_path)
        for old in dropped:
            try:
                fs.delete_dir(f"{root.rstrip('/')}/{old}")
            except (OSError, FileNotFoundError) as err:
                log.warning("could not remove the checkpoint %s/%s: %s", self.run_path, old, err)
        return dropped


def _ray_version() -> str:
    import ray

    return ray.__version__


class TrialActorContext(SweepContext):
    """The recipe's context in Tune's trial actor: one process (rank 0 of 1) on the CPUs and GPU share Tune
    reserved for the trial; each report's checkpoint persisted to the run's folder (`CheckpointKeeper`) before the
    report goes to Tune (`ray.tune.report`), so a report Tune records always has its checkpoint on the storage."""

    def __init__(self, tensorboard_path: str, run_path: str, score_metric: str | None, artifacts_path: str | None,
                 metric: str | None, mode: str, keep_checkpoints: int) -> None:
        global _TRIALS_RUN
        super().__init__(0, 1, 0, tensorboard_path, run_path, score_metric, artifacts_path)
        self.keeper = CheckpointKeeper(run_path, metric, mode, keep_checkpoints)
        _TRIALS_RUN += 1
        # in every report: the how-manieth trial of its actor this is, and whether its data came from an earlier one
        self.warm = {"actor_trial": _TRIALS_RUN, "data_reused": 0}

    def _hand_over(self, metrics: dict, checkpoint_dir: Path | None, name: str | None) -> None:
        import ray.tune

        metrics = {**metrics, **self.warm}
        if checkpoint_dir is not None and name is not None:
            self._persist(checkpoint_dir, name)
            self.keeper.add(name, metrics)
        ray.tune.report(metrics)

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path | None:
        """On a local (or shared) disk the recipe writes the checkpoint right beside its final place, a hidden
        folder renamed once whole (`_persist`): the folder is written once, never copied. For a bucket, the scratch
        folder, uploaded from there."""
        if not reported or "://" in self.run_path:
            return super().new_checkpoint_dir(step, reported)
        run = Path(self.run_path)
        run.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".step_{step:08d}_", suffix=".tmp", dir=run))

    def _persist(self, checkpoint_dir: Path, name: str) -> None:
        """The whole checkpoint folder to `<run_path>/<name>`: on a local disk renamed there (so the folder appears
        whole), on a bucket uploaded file by file (its size manifest, written last, says when it is whole:
        `raysdpb.recipe.checkpoint.is_complete`)."""
        target = join(self.run_path, name)
        if "://" in self.run_path:
            upload(checkpoint_dir, target)
            return
        final = Path(target)  # `new_checkpoint_dir` put the checkpoint beside it
        if final.exists():  # the same step written by an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(checkpoint_dir, final)

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            log.info("reusing this actor's %s from an earlier trial", key[0])
            if key[0] == "data":
                self.warm["data_reused"] = 1
            return _MEMO[key]
        value = build()
        _MEMO[key] = value
        while len(_MEMO) > _MEMO_ENTRIES:
            _MEMO.popitem(last=False)
        return value


def run_in_trial_actor(loop_config: dict, settings: dict) -> None:
    """One single-worker trial in the calling Tune trial actor: the recipe with a `TrialActorContext`, on the
    threads of the CPUs Tune reserved for it."""
    import torch

    threads = max(1, int(settings["cpus_per_worker"]))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # a Ray Train worker gets OMP_NUM_THREADS from its CPUs; so does this trial
    run_sweep_trial(loop_config, TrialActorContext(loop_config["tensorboard_path"], loop_config["run_path"],
                                                   loop_config.get("score_metric"), loop_config.get("artifacts_path"),
                                                   settings["metric"], settings["mode"], settings["keep_checkpoints"]))

