"""A dev split held out from the training split (`heldout_dev:` in a trial config): model selection on it, the
task's validation split left for the final scores (protocol v2, issue 36).

`heldout_split` is the pure rule: which positions of the training split go to the dev set, seeded by its own
seed (nothing else draws from its generator, so the same seed gives the same examples whatever the trial's
`seed`, `data_seed` or `max_train_samples`), stratified by label so that each class's share of the dev set
is its share of the split to within one example. `carve_dev` applies it to a trial's records.
"""

from __future__ import annotations

import logging
from typing import Hashable, Sequence

import numpy as np

from raysdpb.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["DEV_PREFIX", "heldout_size", "heldout_split", "carve_dev", "check_dev_prefix"]

# the metric-key prefix of the held-out dev split: `eval_dev_<metric>`
DEV_PREFIX = "dev_"


def heldout_size(size: int | float, n: int) -> int:
    """The dev set's number of examples: `size` itself (an int), or `round(size * n)` (a fraction in (0, 1));
    `ValueError` unless it leaves at least one example on either side."""
    count = int(size) if isinstance(size, int) else round(size * n)
    what = f"{size} examples" if isinstance(size, int) else f"{size:g} of {n} examples ({count})"
    if count < 1:
        raise ValueError(f"{what} hold out no example")
    if count >= n:
        raise ValueError(f"{what} leave no training example: the training split has {n}")
    return count


def heldout_split(labels: Sequence[Hashable], size: int | float, seed: int,
                  stratify: bool = True) -> tuple[list[int], list[int]]:
    """`(train positions, dev positions)` of a split whose examples have `labels`, both ascending, disjoint and
    together every position. The dev set has exactly `heldout_size(size, len(labels))` examples.

    Stratified: class c (n_c of the n examples) gets floor(k n_c / n) dev examples, and the k - sum of those left
    go one each to the classes with the largest remainders (ties to the class seen first), so each class's count
    is within one example of k n_c / n; each class's examples are then drawn by a seeded permutation. Without
    `stratify`: the first k of a seeded permutation of all positions."""
    n = len(labels)
    k = heldout_size(size, n)
    rng = np.random.default_rng(seed)
    if not stratify:
        dev = rng.permutation(n)[:k].tolist()
    else:
        members: dict[Hashable, list[int]] = {}
        for position, label in enumerate(labels):
            members.setdefault(label, []).append(position)
        quotas = {c: k * len(m) // n for c, m in members.items()}
        # integer remainders (exact, no float rounding); a stable sort keeps first-seen classes first on ties
        by_remainder = sorted(members, key=lambda c: -(k * len(members[c]) % n))
        for c in by_remainder[: k - sum(quotas.values())]:
            quotas[c] += 1
        dev = []
        for c, positions in members.items():
            dev += [positions[i] for i in rng.permutation(len(positions))[: quotas[c]]]
    dev_set = set(dev)
    return [i for i in range(n) if i not in dev_set], sorted(dev_set)


def carve_dev(records: list[dict], kind: str, heldout, name: str) -> tuple[list[dict], list[dict]]:
    """`(training records, dev records)` of a whole training split, by `heldout` (a `HeldoutDevConfig`); a size
    that leaves nothing on one side is a `UserError` naming the key. Generation records have no class label:
    the dev set is then drawn unstratified (and a note says so)."""
    stratify = heldout.stratify and kind != "generation"
    if heldout.stratify and not stratify:
        log.info("%s: heldout_dev.stratify is ignored for a generation task (no class label); the dev set is a "
                 "seeded random sample", name)
    labels = [r["label"] for r in records] if stratify else [0] * len(records)
    try:
        train, dev = heldout_split(labels, heldout.size, heldout.seed, stratify)
    except ValueError as err:
        raise UserError(f"heldout_dev.size: {err} ({name})") from None
    return [records[i] for i in train], [records[i] for i in dev]


def check_dev_prefix(task, eval_split: str | None = None) -> None:
    """The held-out dev split's keys (`eval_dev_<metric>`) must not be those of one of the task's evaluation
    splits (a custom task's split named `dev` is prefixed `dev_`)."""
    clash = [split for split, prefix in task.evaluation_splits(eval_split) if prefix == DEV_PREFIX]
    if clash:
        raise UserError(f"heldout_dev: task {task.name}'s evaluation split {clash[0]!r} already reports "
                        f"eval_{DEV_PREFIX}<metric>; rename that split, or leave heldout_dev out")
