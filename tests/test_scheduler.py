"""ASHA per group of comparable trials (raysdpb.scheduler.GroupedASHA), against Ray's own ASHA."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.scheduler import GroupedASHA, group_key

ASHA = dict(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, stop_last_trials=False)


def _trial(trial_id: str):
    return SimpleNamespace(trial_id=trial_id, config={"trial_id": trial_id})


def _decisions(scheduler, reports):
    """Feed (trial_id, epoch, score) reports in order; the scheduler's decision for each."""
    trials = {}
    out = []
    for trial_id, epoch, score in reports:
        if trial_id not in trials:
            trials[trial_id] = _trial(trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        out.append(scheduler.on_trial_result(None, trials[trial_id], {"epoch": epoch, "score": score}))
    return out


def _grouped(groups):
    scheduler = GroupedASHA(groups, **ASHA)
    scheduler.set_search_properties("score", "max")
    return scheduler


def _plain():
    scheduler = ASHAScheduler(**ASHA)
    scheduler.set_search_properties("score", "max")
    return scheduler


def test_a_rung_compares_only_trials_of_one_group():
    reports = [("a1", 1, 0.9), ("a2", 1, 0.8), ("b1", 1, 0.3), ("b2", 1, 0.2)]
    # one ASHA over all: the weak group's better trial is stopped by the strong group's
    assert _decisions(_plain(), reports) == [TrialScheduler.CONTINUE] + [TrialScheduler.STOP] * 3
    grouped = _grouped({"a1": "A", "a2": "A", "b1": "B", "b2": "B"})
    assert _decisions(grouped, reports) == [TrialScheduler.CONTINUE, TrialScheduler.STOP] * 2
    assert set(grouped.groups) == {"A", "B"}


def test_each_group_decides_exactly_as_its_own_asha_would(seed=0):
    """Many random interleavings of reports from three groups: every decision equals that of a separate
    ASHAScheduler fed only that group's reports."""
    rng = random.Random(seed)
    for _ in range(50):
        groups = {f"t{i}": rng.choice("XYZ") for i in range(12)}
        reports = [(t, epoch, rng.random()) for epoch in (1, 2, 3, 4) for t in groups]
        rng.shuffle(reports)
        reports.sort(key=lambda r: r[1])  # a trial's reports stay in epoch order
        got = dict(zip(range(len(reports)), _decisions(_grouped(groups), reports)))
        for group in "XYZ":
            mine = [(i, r) for i, r in enumerate(reports) if groups[r[0]] == group]
            expected = _decisions(_plain(), [r for _, r in mine])
            assert [got[i] for i, _ in mine] == expected


def test_grouped_asha_pickles_with_its_state():
    grouped = _grouped({"a1": "A", "b1": "B"})
    _decisions(grouped, [("a1", 1, 0.5), ("b1", 1, 0.4)])
    again = pickle.loads(pickle.dumps(grouped))
    assert set(again.groups) == {"A", "B"}
    assert _decisions(again, [("a1", 2, 0.6)]) == [TrialScheduler.CONTINUE]


def test_group_key_and_config(tmp_path):
    config = {"task": "glue/rte", "model": "m", "num_layers": 6, "method": "dynsdpb", "lr": 1e-4}
    assert group_key(config, ["task", "method"]) == group_key({**config, "lr": 5e-5}, ["task", "method"])
    assert group_key(config, ["task", "method"]) != group_key({**config, "method": "finetune"}, ["task", "method"])
    raw = {"task": "superglue/cb", "model": "tiny-bert", "sweep": {"name": "x", "asha": {"group_by": ["task", "lr"]}}}
    assert load_experiment(None, raw=raw).sweep.asha.group_by == ["task", "lr"]
    raw["sweep"]["asha"]["group_by"] = ["tsak"]
    with pytest.raises(UserError, match=r"sweep\.asha\.group_by: unknown trial key\(s\) 'tsak'; allowed: .*task"):
        load_experiment(None, raw=raw)
