"""What a trial leaves behind when it ends, cleaned up by the sweep's driver once the trial's processes are gone:
its Train run's placement group, when Tune stopped the trial early (a Ray bug: ray-project/ray#54305), and its
checkpoints, so that storage stays bounded, on a local disk or a bucket alike.

Checkpoints: a running trial, or one that errored (`--resume` retries it), keeps what it needs to resume: the
`keep_checkpoints` Ray Train keeps, less those Train never deleted or never registered (a stopped trial's
controller dies before it deletes the ones it replaced; a worker killed right after an upload leaves one Train
never registered). A *finished* trial (completed, stopped by ASHA, diverged) never trains again: it keeps its
best checkpoint by the sweep's metric, slimmed to its weights (no optimizer, sampler or cache state), and only
while it is among the `keep_weights` best finished trials of its task, model and method (`weights_to_keep`);
the others keep nothing. So a sweep's storage ends at about one model's weights per (task, model, method)."""

from __future__ import annotations

import logging
import time

from pathlib import Path

from raysdpb.recipe.checkpoint import checkpoint_step, complete_checkpoints, slim_checkpoint
from raysdpb.results.schema import FINISHED, is_number, metric_direction
from raysdpb.results.storage import filesystem, join, read_json

log = logging.getLogger(__name__)

__all__ = ["TrialCleanup", "prune_unregistered_checkpoints", "prune_finished_checkpoints", "settle_finished_trial",
           "weights_to_keep", "PLACEMENT_GROUP_KEY"]

# the workers' placement group, reported by every worker so that the sweep can release it if the trial is stopped
PLACEMENT_GROUP_KEY = "worker_placement_group"


class TrialCleanup:
    """Cleans up after each trial that ended (completed, stopped by ASHA, errored), a grace period later.

    Placement groups: Tune stops a trial by ending its actor, which takes the Train controller with it before the
    controller can remove its workers' placement group; Ray Train's own `PlacementGroupCleaner` only works where
    the Ray dashboard (state API, `ray[default]`) runs, and otherwise the group holds its CPUs/GPUs until the
    sweep ends, so the next trials wait forever. The grace period lets the controller die first, so it cannot
    ask for a new group after this one is removed, nor write a checkpoint after the prune."""

    def __init__(self, experiment_path: str, metric: str, mode: str, keep: int, keep_weights: int | str = 1,
                 grace_s: float = 5.0) -> None:
        self.experiment_path = experiment_path
        self.metric, self.mode, self.keep = metric, mode, keep  # how Ray Train ranks a trial's checkpoints
        self.keep_weights = keep_weights
        self.grace_s = grace_s
        self.groups: dict[str, str] = {}       # trial id -> the hex id of the placement group its workers reported
        self.due: list[tuple[float, str, str | None, str | None]] = []  # (when, trial id, group, which prune)
        self.settled: set[str] = set()         # finished trials down to (at most) their best weights
        self.emptied: set[str] = set()         # finished trials whose weights were dropped too

    def seen(self, trial_id: str, result: dict) -> None:
        if result.get(PLACEMENT_GROUP_KEY):
            self.groups[trial_id] = result[PLACEMENT_GROUP_KEY]

    def trial_ended(self, trial_id: str, finished: bool, prune: bool = True) -> None:
        """`finished`: the trial will not train again (not an errored one, which `--resume` retries); `prune`:
        clean up its checkpoints too (not while Tune retries it at once: the retry may be uploading one)."""
        rule = ("finished" if finished else "unregistered") if prune else None
        self.due.append((time.monotonic() + self.grace_s, trial_id, self.groups.pop(trial_id, None), rule))

    def run(self, rows=None, force: bool = False) -> None:
        """Clean up after the trials whose grace period is over (all of them with `force`). `rows`: a callable
        returning the sweep's trial rows (`ResultsRecorder.trial_rows`), to rank the finished trials by."""
        now = time.monotonic()
        keep, settled_now = [], False
        for when, trial_id, group, rule in self.due:
            if when > now and not force:
                keep.append((when, trial_id, group, rule))
                continue
            if group:
                _release(group)
            if rule == "finished":
                self._settle(trial_id)
                settled_now = True
            elif rule == "unregistered":
                removed = prune_unregistered_checkpoints(self._run_path(trial_id))
                if removed:
                    log.info("removed %d checkpoint(s) of %s that Ray Train left: %s", len(removed), trial_id,
                             ", ".join(removed))
        self.due = keep
        if rows is not None and (settled_now or force):
            self._drop_weights(rows())

    def finish(self, rows) -> None:
        """At the sweep's end: every finished trial settled and ranked, those of earlier runs of a resumed sweep
        too (their driver may have died before it cleaned up)."""
        self.run(force=True)
        trial_rows = rows()
        for row in trial_rows:
            if row.get("status") in FINISHED and row["trial_id"] not in self.settled:
                self._settle(row["trial_id"])
        self._drop_weights(trial_rows)

    def _run_path(self, trial_id: str) -> str:
        return join(self.experiment_path, "train_runs", trial_id)

    def _settle(self, trial_id: str) -> None:
        removed, freed = settle_finished_trial(self._run_path(trial_id), self.metric, self.mode)
        self.settled.add(trial_id)
        if removed or freed:
            log.info("%s finished: kept its best checkpoint's weights (removed %d other checkpoint(s), %.1f MB of "
                     "training state)", trial_id, len(removed), freed / 1e6)

    def _drop_weights(self, rows: list[dict]) -> None:
        kept = weights_to_keep(rows, self.keep_weights)
        for trial_id in sorted(self.settled - kept - self.emptied):
            removed = _remove_checkpoints(self._run_path(trial_id), lambda step, path, name: False)
            self.emptied.add(trial_id)
            if removed:
                log.info("%s: not among the %s best of its task, model and method: removed its weights", trial_id,
                         self.keep_weights)


def _release(group: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group)))
    try:
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            log.info("released the placement group %s of a stopped trial", group)
    except Exception as err:  # noqa: BLE001 - already gone, or the cluster is shutting down
        log.debug("placement group %s: %s", group, err)


def _snapshot(run_path: str) -> tuple[list[dict], dict]:
    """The checkpoint results Ray Train's checkpoint manager last saved for a run (its kept ones, and its latest)."""
    snapshot = read_json(join(run_path, "checkpoint_manager_snapshot.json"))
    if not isinstance(snapshot, dict):
        return [], {}
    kept = [r for r in snapshot.get("checkpoint_results") or [] if isinstance(r, dict)]
    latest = snapshot.get("latest_checkpoint_result")
    return kept, latest if isinstance(latest, dict) else {}


def _remove_checkpoints(run_path: str, keep) -> list[str]:
    """Remove the checkpoint folders of a run for which `keep(step, path, name)` is false; returns their paths."""
    import pyarrow.fs as pafs

    fs, root = filesystem(run_path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    removed = []
    for info in infos:
        step = checkpoint_step(info.path)
        if info.type != pafs.FileType.Directory or step < 0 or keep(step, info.path, info.base_name):
            continue
        try:
            fs.delete_dir(info.path)
            removed.append(info.path)
        except OSError as err:
            log.warning("could not remove the checkpoint %s: %s", info.path, err)
    return removed


def prune_unregistered_checkpoints(run_path: str) -> list[str]:
    """Remove the checkpoint folders of a Train run that its checkpoint manager does not list (one a worker
    uploaded just before it died, which Train never registered; one the manager replaced but whose deletion its
    controller did not live to make) once a newer registered one supersedes them, and half-uploaded ones. An
    unregistered checkpoint newer than every registered one stays: it is what a retry resumes from (see
    `RayTrainContext.latest_checkpoint`). Returns the removed paths."""
    kept, latest = _snapshot(run_path)
    if not kept and not latest:
        return []
    registered = {r.get("checkpoint_dir_name") for r in [*kept, latest]} - {None}
    newest_registered = max((checkpoint_step(name) for name in registered), default=-1)
    whole = {path for _, path in complete_checkpoints(run_path)}
    return _remove_checkpoints(run_path, lambda step, path, name: name in registered or (
        step >= newest_registered and path in whole))


def prune_finished_checkpoints(run_path: str, metric: str, mode: str, keep: int) -> list[str]:
    """A finished trial (completed, stopped by ASHA, diverged) never trains again: keep the `keep` checkpoints
    Ray Train ranks best by `metric` among those it registered (its latest when none has the metric), and remove
    every other one: the latest kept for a resume, one never registered, a half-uploaded one. So a finished trial
    holds `keep_checkpoints` on the storage, however it ended. Returns the removed paths."""
    kept, latest = _snapshot(run_path)
    scored = [r for r in [*kept, latest] if is_number((r.get("metrics") or {}).get(metric))]
    ranked = sorted(scored, key=lambda r: r["metrics"][metric], reverse=mode == "max")
    best = {r.get("checkpoint_dir_name") for r in ranked[:keep]} or {latest.get("checkpoint_dir_name")}
    if best == {None}:  # no snapshot: nothing to go by
        return []
    return _remove_checkpoints(run_path, lambda step, path, name: name in best)


def settle_finished_trial(run_path: str, metric: str, mode: str) -> tuple[list[str], int]:
    """A finished trial's checkpoints down to its best one by `metric` (`prune_finished_checkpoints`), slimmed to
    its weights (`raysdpb.recipe.checkpoint.slim_checkpoint`). Returns the removed folders and the bytes of
    training state freed."""
    removed = prune_finished_checkpoints(run_path, metric, mode, keep=1)
    fs, _ = filesystem(run_path)
    freed = sum(slim_checkpoint(fs, path) for _, path in complete_checkpoints(run_path))
    return removed, freed


def weights_to_keep(rows: list[dict], keep: int | str) -> set[str]:
    """The finished trials whose best weights a sweep keeps: for each (task, model, method), the `keep` best by
    `best_<main metric>` (ties to the first in grid order, the order of `rows`, as `python -m raysdpb.export`
    chooses), every one with `keep="all"`, none with `keep="none"` or 0. Trials with no score are not kept
    (but with "all")."""
    finished = [r for r in rows if r.get("status") in FINISHED]
    if keep == "all":
        return {r["trial_id"] for r in finished}
    if keep == "none" or not keep:
        return set()
    groups: dict[tuple, list[dict]] = {}
    for row in finished:
        value = row.get(f"best_{row.get('main_metric')}")
        if row.get("main_metric") and is_number(value):
            groups.setdefault((row.get("task"), Path(str(row.get("model"))).name, row.get("method")), []).append(row)
    kept = set()
    for members in groups.values():
        metric = f"best_{members[0]['main_metric']}"
        sign = 1.0 if metric_direction(members[0]["main_metric"]) == "min" else -1.0
        ranked = sorted(members, key=lambda r: sign * r[metric])  # stable: ties keep grid order
        kept |= {r["trial_id"] for r in ranked[:int(keep)]}
    return kept
