"""What a trial leaves behind when it ends, cleaned up by the sweep's driver once the trial's processes are gone:
its Train run's placement group, when Tune stopped the trial early (a Ray bug: ray-project/ray#54305), and the
checkpoints Ray Train never deleted (a stopped trial's controller dies before it deletes the ones it replaced;
a worker killed right after an upload leaves one Train never registered), so that storage stays bounded, on a
local disk or a bucket alike."""

from __future__ import annotations

import logging
import time

from raysdpb.recipe.checkpoint import checkpoint_step, complete_checkpoints
from raysdpb.results.schema import is_number
from raysdpb.results.storage import filesystem, join, read_json

log = logging.getLogger(__name__)

__all__ = ["TrialCleanup", "prune_unregistered_checkpoints", "prune_finished_checkpoints", "PLACEMENT_GROUP_KEY"]

# the workers' placement group, reported by every worker so that the sweep can release it if the trial is stopped
PLACEMENT_GROUP_KEY = "worker_placement_group"


class TrialCleanup:
    """Cleans up after each trial that ended (completed, stopped by ASHA, errored), a grace period later.

    Placement groups: Tune stops a trial by ending its actor, which takes the Train controller with it before the
    controller can remove its workers' placement group; Ray Train's own `PlacementGroupCleaner` only works where
    the Ray dashboard (state API, `ray[default]`) runs, and otherwise the group holds its CPUs/GPUs until the
    sweep ends, so the next trials wait forever. The grace period lets the controller die first, so it cannot
    ask for a new group after this one is removed, nor write a checkpoint after the prune."""

    def __init__(self, experiment_path: str, metric: str, mode: str, keep: int, grace_s: float = 5.0) -> None:
        self.experiment_path = experiment_path
        self.metric, self.mode, self.keep = metric, mode, keep  # how Ray Train ranks a trial's checkpoints
        self.grace_s = grace_s
        self.groups: dict[str, str] = {}       # trial id -> the hex id of the placement group its workers reported
        self.due: list[tuple[float, str, str | None, str | None]] = []  # (when, trial id, group, which prune)

    def seen(self, trial_id: str, result: dict) -> None:
        if result.get(PLACEMENT_GROUP_KEY):
            self.groups[trial_id] = result[PLACEMENT_GROUP_KEY]

    def trial_ended(self, trial_id: str, finished: bool, prune: bool = True) -> None:
        """`finished`: the trial will not train again (not an errored one, which `--resume` retries); `prune`:
        clean up its checkpoints too (not while Tune retries it at once: the retry may be uploading one)."""
        rule = ("finished" if finished else "unregistered") if prune else None
        self.due.append((time.monotonic() + self.grace_s, trial_id, self.groups.pop(trial_id, None), rule))

    def run(self, force: bool = False) -> None:
        """Clean up after the trials whose grace period is over (all of them with `force`)."""
        now = time.monotonic()
        keep = []
        for when, trial_id, group, rule in self.due:
            if when > now and not force:
                keep.append((when, trial_id, group, rule))
                continue
            if group:
                _release(group)
            if rule is None:
                continue
            run_path = join(self.experiment_path, "train_runs", trial_id)
            removed = (prune_finished_checkpoints(run_path, self.metric, self.mode, self.keep) if rule == "finished"
                       else prune_unregistered_checkpoints(run_path))
            if removed:
                log.info("removed %d checkpoint(s) of %s that Ray Train left: %s", len(removed), trial_id,
                         ", ".join(removed))
        self.due = keep


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
