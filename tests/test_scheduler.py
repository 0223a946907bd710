"""ASHA per group of comparable trials (raysdpb.scheduler.GroupedASHA), against Ray's own ASHA."""

from __future__ import annotations

import pickle
import random
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.sweep.scheduler import GroupedASHA, group_key

ASHA = dict(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, stop_last_trials=False)
ASHA_SST2 = dict(ASHA, max_t=3, reduction_factor=3)  # the quality benchmark's grids: 3 epochs, rungs at 1 and 3


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


def _grouped(groups, asha=ASHA):
    scheduler = GroupedASHA(groups, **asha)
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


# --- a resumed sweep decides as the uninterrupted one would ------------------------------------------------

def _run(scheduler, reports, tune_ids, added, stopped):
    """Deliver (trial_id, epoch, score) reports as Tune would, a stopped trial's later reports dropped; the
    (report, decision) pairs. `tune_ids`: Tune's own id for each trial (a new one in every Tune run);
    `added`, `stopped`: the trials Tune has added to the scheduler, and those it stopped, in this run."""
    out = []
    for trial_id, epoch, score in reports:
        if trial_id in stopped:
            continue
        trial = SimpleNamespace(trial_id=tune_ids[trial_id], config={"trial_id": trial_id})
        if trial_id not in added:
            added.add(trial_id)
            scheduler.on_trial_add(None, trial)
        decision = scheduler.on_trial_result(None, trial, {"epoch": epoch, "score": score})
        out.append(((trial_id, epoch, score), decision))
        if decision == TrialScheduler.STOP:
            stopped.add(trial_id)
    return out


def test_a_resumed_sweep_takes_the_decisions_of_the_uninterrupted_one():
    """Many random sweeps cut at a random report: the results recorded before the cut go back into a fresh
    scheduler (Tune's state of it is not saved), every unfinished trial first re-sends its reports up to its
    checkpoint, then the sweep goes on. Every re-sent report continues its trial, and every later report gets
    the decision it got in the uninterrupted run."""
    rng = random.Random(1)
    for case in range(200):
        groups = {f"t{i}": rng.choice("XY") for i in range(rng.randint(2, 9))}
        queues = {t: [(t, epoch, round(rng.random(), 2)) for epoch in (1, 2, 3, 4)] for t in groups}
        reports = []  # trials overlap at random, each in its own epoch order
        while any(queues.values()):
            reports.append(queues[rng.choice([t for t in groups if queues[t]])].pop(0))

        whole = _run(_grouped(groups), reports, {t: f"a{t}" for t in groups}, set(), set())
        cut = rng.randint(1, len(whole) - 1)
        before, after = whole[:cut], whole[cut:]
        recorded = {t: [{"epoch": e, "score": s} for (tt, e, s), _ in before if tt == t] for t in groups}
        stopped = {r[0] for r, d in before if d == TrialScheduler.STOP}

        resumed = pickle.loads(pickle.dumps(_grouped(groups)))  # as Tune restores it: no rungs
        for trial_id, results in recorded.items():
            resumed.record_past_results(trial_id, results)
        tune_ids, added = {t: f"b{t}" for t in groups}, set()  # the restored run's Tune ids differ
        resent = set()
        for (trial_id, epoch, score), decision in after:
            if trial_id not in resent and recorded[trial_id]:
                resent.add(trial_id)
                replays = _run(resumed, [(trial_id, r["epoch"], r["score"]) for r in recorded[trial_id]],
                               tune_ids, added, set())
                assert {d for _, d in replays} == {TrialScheduler.CONTINUE}, (case, trial_id)
            (_, got), = _run(resumed, [(trial_id, epoch, score)], tune_ids, added, stopped)
            assert got == decision, (case, trial_id, epoch)


def test_a_trial_that_passed_a_rung_before_a_resume_is_not_judged_again_there():
    """SST-2's dynsdpb grid (reduction factor 3): three trials reach the first rung in the order t1, t0, t2 and
    all pass; resumed, they re-send their first epoch in another order, t0, t2, t1. Judged again, t1 would be
    stopped (82.91 below the cutoff of 82.91 and 83.37); taken from the rungs, it goes on."""
    groups = {"t0": "G", "t1": "G", "t2": "G"}
    first = [("t1", 1, 0.8291), ("t0", 1, 0.8291), ("t2", 1, 0.8337)]
    again = [("t0", 1, 0.8291), ("t2", 1, 0.8337), ("t1", 1, 0.8291)]
    fresh = _grouped(groups, ASHA_SST2)
    passed = _run(fresh, first, {t: t for t in groups}, set(), set())
    assert [d for _, d in passed] == [TrialScheduler.CONTINUE] * 3
    rejudged = _grouped(groups, ASHA_SST2)
    assert [d for _, d in _run(rejudged, again, {t: t for t in groups}, set(), set())][-1] == TrialScheduler.STOP
    resumed = _grouped(groups, ASHA_SST2)
    for trial_id, epoch, score in first:
        resumed.record_past_results(trial_id, [{"epoch": epoch, "score": score}])
    assert [d for _, d in _run(resumed, again, {t: "new-" + t for t in groups}, set(), set())] == \
        [TrialScheduler.CONTINUE] * 3


def test_the_sweeps_resume_hands_every_recorded_result_to_asha(tmp_path):
    """`raysdpb.sweep.callback.ResultsCallback` on --resume: the results a killed run recorded (trials.parquet and
    curves.parquet) of finished and unfinished trials go into the restored (empty) GroupedASHA, so the resumed
    trial's re-sent first epoch continues it where judging it again would stop it."""
    from raysdpb.results import ResultsRecorder, TrialInfo
    from raysdpb.sweep.callback import ResultsCallback

    trials = [TrialInfo(t, t, {}, 3) for t in ("t0", "t1", "t2", "t3")]
    groups = {t.trial_id: ("G",) for t in trials}
    first = ResultsRecorder(str(tmp_path), trials, metric="score")
    for trial_id, score in (("t1", 0.8291), ("t0", 0.8291), ("t2", 0.8337)):  # all passed the first rung
        first.on_start(trial_id)
        first.on_result(trial_id, {"epoch": 1.0, "step": 157, "score": score})
    first.on_start("t3")  # finished at epoch 3, below the others at epoch 1
    for epoch in (1, 2, 3):
        first.on_result("t3", {"epoch": float(epoch), "step": 157 * epoch, "score": 0.80})
    first.on_complete("t3")
    first.write()  # the run is killed here

    scheduler = _grouped(groups, ASHA_SST2)  # Tune restores the scheduler it pickled at the start: no rungs
    callback = ResultsCallback(str(tmp_path), trials, "score", "max", "epoch", scheduler)
    callback.setup()
    rung = scheduler.groups[("G",)]._brackets[0]._rungs
    assert {m: dict(r) for m, r in rung} == {3: {"t3": 0.80}, 1: {"t1": 0.8291, "t0": 0.8291, "t2": 0.8337,
                                                                   "t3": 0.80}}
    for trial_id, score in (("t0", 0.8291), ("t2", 0.8337), ("t1", 0.8291)):  # re-sent in another order
        trial = SimpleNamespace(trial_id=f"restored_{trial_id}", config={"trial_id": trial_id})
        scheduler.on_trial_add(None, trial)
        assert scheduler.on_trial_result(None, trial, {"epoch": 1.0, "step": 157, "score": score,
                                                       "replayed": 1}) == TrialScheduler.CONTINUE


# --- units: rungs below an epoch, samples seen ---------------------------------------------------------------

def test_asha_rungs_are_the_rungs_ray_s_asha_uses():
    """`raysdpb.sweep.plan.asha_rungs` (what --dry-run prints) against the milestones of Ray's own ASHA bracket,
    over many grace periods (below an epoch, in samples), maxima and reduction factors."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    from raysdpb.sweep.plan import asha_rungs

    rng = random.Random(3)
    cases = [(0.25, 3, 2), (1, 6, 2), (0.5, 3, 3), (2000, 64000, 4), (1, 1, 2)]
    cases += [(rng.choice([0.1, 0.25, 1, 500]), rng.uniform(1, 5000), rng.choice([2, 3, 4, 1.5])) for _ in range(200)]
    for grace, max_t, factor in cases:
        if grace > max_t:
            continue
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, factor, s=0)._rungs)
        assert asha_rungs(grace, max_t, factor) == pytest.approx(ray_rungs), (grace, max_t, factor)


def test_fractional_rungs_stop_on_a_report_below_an_epoch():
    """grace_period 0.25 of an epoch: the rung is met by the first report at or past a quarter epoch."""
    scheduler = _grouped({"a": "G", "b": "G"}, dict(ASHA, grace_period=0.25, max_t=2))
    assert _decisions(scheduler, [("a", 0.25, 0.9), ("b", 0.2, 0.1), ("b", 0.26, 0.1)]) == [
        TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_asha_in_samples_seen(tmp_path):
    scheduler = GroupedASHA({"a": "G", "b": "G"}, time_attr="samples_seen", max_t=800, grace_period=200,
                            reduction_factor=2, stop_last_trials=False)
    scheduler.set_search_properties("score", "max")
    trials = {t: _trial(t) for t in "ab"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    decide = [scheduler.on_trial_result(None, trials[t], {"samples_seen": s, "epoch": e, "score": v})
              for t, s, e, v in [("a", 208, 0.5, 0.8), ("b", 192, 1.0, 0.2), ("b", 216, 1.04, 0.2)]]
    # b's epoch-end report (192 samples) is below the rung; its next one (216) is compared there and stopped
    assert decide == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_asha_units_in_the_config():
    base = {"task": "superglue/cb", "model": "tiny-bert", "sweep": {"name": "x"}}
    asha = load_experiment(None, raw={**base, "sweep": {"name": "x", "asha": {"grace_period": 0.25,
                                                                               "max_t": 2.5}}}).sweep.asha
    assert (asha.grace_period, asha.max_t, asha.time_attr) == (0.25, 2.5, "epoch")
    samples = {"time_attr": "samples_seen", "grace_period": 500, "max_t": 8000}
    asha = load_experiment(None, raw={**base, "sweep": {"name": "x", "asha": samples}}).sweep.asha
    assert (asha.time_attr, asha.grace_period, asha.max_t) == ("samples_seen", 500, 8000)
    for missing in ("grace_period", "max_t"):
        raw = {**base, "sweep": {"name": "x", "asha": {k: v for k, v in samples.items() if k != missing}}}
        with pytest.raises(UserError, match=r"sweep\.asha: time_attr samples_seen: set grace_period and max_t in "
                                            r"training examples"):
            load_experiment(None, raw=raw)
    with pytest.raises(UserError, match=r"sweep\.asha\.grace_period: Input should be greater than 0"):
        load_experiment(None, raw={**base, "sweep": {"name": "x", "asha": {"grace_period": 0}}})
