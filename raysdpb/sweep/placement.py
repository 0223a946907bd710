"""A work-around for a Ray bug: the placement group of a Train run whose Tune trial was stopped early (by
ASHA) is released by the sweep (ray-project/ray#54305)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

__all__ = ["PlacementGroupReaper", "PLACEMENT_GROUP_KEY"]

# the workers' placement group, reported by every worker so that the sweep can release it if the trial is stopped
PLACEMENT_GROUP_KEY = "worker_placement_group"


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
