"""benchmarks/searcher_replay.py: the searchers replayed on hand-made fully-run grids whose answers are worked out
by hand. The counting as pure functions; then real replays on a local Ray (one for the module): the recorded curves
come back as they were, the grid with ASHA stops what ASHA's rule stops, the same seed suggests the same trials, and
Optuna and BOHB (with HyperBand pausing and resuming trials) run over the grid's points only."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from trial_configs import load_benchmark

# A 2 x 2 dynsdpb grid (lr x alpha; grid order A, B, C, D) and a finetune grid of 2 (lr), 3 epochs each, a report per
# epoch of 10 training examples: every trial's curve is 30 samples, the dynsdpb grid 120.
DYNSDPB = {(1e-4, 0.5): [0.5, 0.6, 0.7],     # A
           (1e-4, 1.0): [0.4, 0.9, 0.95],    # B: the best, stopped at ASHA's first rung (0.4 < A's 0.5)
           (1e-3, 0.5): [0.8, 0.8, 0.8],     # C
           (1e-3, 1.0): [0.45, 0.6, 0.65]}   # D: stopped at the first rung (0.45 < median(0.5, 0.4, 0.8))
FINETUNE = {1e-4: [0.3, 0.5, 0.6], 1e-3: [0.6, 0.7, 0.65]}
PER_EPOCH = 10


@pytest.fixture(scope="module")
def replay_module():
    return load_benchmark("searcher_replay.py", "searcher_replay")


def write_grid(folder, data_dir, *, drop: tuple = ()) -> dict[tuple, str]:
    """A fully-run grid folder (sweep.yaml, trials.parquet, curves.parquet) over method finetune/dynsdpb, lr and
    alpha, its trial ids made by raysdpb's own grid expansion; `drop`: (method, lr, alpha) points left unrecorded.
    Returns (method, lr, alpha) -> trial id."""
    from raysdpb.config import load_experiment
    from raysdpb.sweep.grid import expand

    raw = {"task": "superglue/cb", "model": "tiny-bert", "method": "dynsdpb", "data_dir": str(data_dir), "epochs": 3,
           "batch_size": 4, "lr": 1e-4, "alpha": 1.0, "tau": 1.0, "seed": 0,
           "search": {"method": ["finetune", "dynsdpb"], "lr": [1e-4, 1e-3], "alpha": [0.5, 1.0]},
           "sweep": {"name": "hand", "storage_path": str(folder), "asha": None, "report_every_steps": 2}}
    folder.mkdir(parents=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    experiment = load_experiment(None, raw=raw)
    ids, trials, curves = {}, [], []
    for point in expand(experiment, report_every_steps=2):
        c = point.config
        key = (c.method, c.lr, c.alpha if c.method == "dynsdpb" else None)
        ids[key] = point.trial_id
        if key in drop:
            continue
        scores = DYNSDPB[(c.lr, c.alpha)] if c.method == "dynsdpb" else FINETUNE[c.lr]
        trials.append({"trial_id": point.trial_id, "method": c.method, "lr": c.lr, "alpha": c.alpha,
                       "status": "completed", "batch_size": 4})
        curves += [{"trial_id": point.trial_id, "epoch": float(e), "step": 2 * e, "samples_seen": PER_EPOCH * e,
                    "eval_accuracy": s} for e, s in enumerate(scores, 1)]
    pq.write_table(pa.Table.from_pylist(trials), folder / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(curves), folder / "curves.parquet")
    return ids


def write_method_grid(folder, data_dir, method: str, scores: dict[float, list[float]]) -> list[str]:
    """A protocol-v2-like grid folder: one method (not searched), lr searched with `seed: [0]`, a held-out dev split
    of 12 examples, the dev metric in the curves (`config.yaml`, as quality.py archives it). Returns the trial ids in
    grid order."""
    from raysdpb.config import load_experiment
    from raysdpb.sweep.grid import expand

    raw = {"task": "superglue/cb", "model": "tiny-bert", "method": method, "data_dir": str(data_dir), "epochs": 3,
           "batch_size": 4, "lr": 1e-4, "seed": 0, "heldout_dev": {"size": 12, "seed": 0, "stratify": True},
           "eval_every_steps": 2, "search": {"lr": list(scores), "seed": [0]},
           "sweep": {"name": f"qv2-{method}", "storage_path": str(folder), "asha": None}}
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    points = expand(load_experiment(None, raw=raw))
    trials = [{"trial_id": p.trial_id, "method": method, "lr": p.config.lr, "status": "completed"} for p in points]
    curves = [{"trial_id": p.trial_id, "epoch": float(e), "step": 2 * e, "samples_seen": PER_EPOCH * e,
               "eval_dev_accuracy": v, "eval_accuracy": 0.1} for p in points
              for e, v in enumerate(scores[p.config.lr], 1)]
    pq.write_table(pa.Table.from_pylist(trials), folder / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(curves), folder / "curves.parquet")
    return [p.trial_id for p in points]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, shared_data_dir):
    folder = tmp_path_factory.mktemp("replay") / "grid"
    return folder, write_grid(folder, shared_data_dir)


def _group(replay_module, grid, name: str):
    return next(g for g in replay_module.load_groups([grid[0]], "method" if name != "whole grid" else "none")
                if g.name == name)


# --- before Ray: the groups and the counting ---------------------------------------------------------------------

def test_groups_are_each_methods_own_grid_and_the_whole_grid(replay_module, grid):
    folder, ids = grid
    by_method = {g.name: g for g in replay_module.load_groups([folder], "method")}
    assert list(by_method) == ["finetune", "dynsdpb"]
    # grid order: lr, then alpha; finetune ignores alpha, so its grid is lr alone
    assert by_method["dynsdpb"].trial_ids == [ids["dynsdpb", 1e-4, 0.5], ids["dynsdpb", 1e-4, 1.0],
                                              ids["dynsdpb", 1e-3, 0.5], ids["dynsdpb", 1e-3, 1.0]]
    assert by_method["dynsdpb"].raw["search"] == {"lr": [1e-4, 1e-3], "alpha": [0.5, 1.0]}
    assert by_method["finetune"].raw["search"] == {"lr": [1e-4, 1e-3]}
    assert by_method["finetune"].full_compute == 60 and by_method["dynsdpb"].full_compute == 120
    (whole,) = replay_module.load_groups([folder], "none")
    assert len(whole.trial_ids) == 6 and whole.full_compute == 180 and "method" in whole.raw["search"]


def test_a_space_point_the_grid_did_not_run_is_an_error_naming_it(replay_module, tmp_path, shared_data_dir):
    ids = write_grid(tmp_path / "cut", shared_data_dir, drop=(("dynsdpb", 1e-3, 1.0),))
    with pytest.raises(replay_module.OutsideGrid, match=rf"group dynsdpb: the search space holds 1 trial\(s\) the "
                                                        rf"grid did not run \({ids['dynsdpb', 1e-3, 1.0]}\)"):
        replay_module.load_groups([tmp_path / "cut"], "method")
    # the trainable itself refuses a suggestion it has no curve for (before any report)
    with pytest.raises(replay_module.OutsideGrid,
                       match=r"suggested trial dynsdpb-0000 \(\{'lr': 0.5\}\), which the grid did not run"):
        replay_module.replay_trial({"trial_id": "dynsdpb-0000", "lr": 0.5}, {}, checkpoints=False)


def test_one_method_folders_are_groups_and_one_grid_when_their_searches_are_one_product(replay_module, tmp_path,
                                                                                       shared_data_dir):
    """Protocol v2's layout: a folder per method, grouped per method; the whole grid only when the folders' searches
    make one product (the same lrs here), else a message saying to group by method."""
    finetune = write_method_grid(tmp_path / "ft", shared_data_dir, "finetune", {1e-4: [0.5, 0.8, 0.6],
                                                                                 1e-3: [0.4, 0.5, 0.7]})
    dynsdpb = write_method_grid(tmp_path / "dyn", shared_data_dir, "dynsdpb", {1e-4: [0.5, 0.6, 0.6],
                                                                               1e-3: [0.5, 0.5, 0.5]})
    groups = replay_module.load_groups([tmp_path / "ft", tmp_path / "dyn"], "method")
    assert [(g.name, g.trial_ids) for g in groups] == [("finetune", finetune), ("dynsdpb", dynsdpb)]
    assert replay_module.eval_examples_of(groups[0].raw) == 12  # the held-out dev split's size
    (whole,) = replay_module.load_groups([tmp_path / "ft", tmp_path / "dyn"], "none")
    assert whole.raw["search"] == {"method": ["finetune", "dynsdpb"], "lr": [1e-4, 1e-3], "seed": [0]}
    assert sorted(whole.trial_ids) == sorted(finetune + dynsdpb)
    write_method_grid(tmp_path / "other", shared_data_dir, "dynsdpb", {5e-5: [0.5] * 3, 1e-4: [0.6] * 3})
    with pytest.raises(SystemExit, match=r"(?s)the search space holds 2 trial\(s\) the grid did not run.*not one "
                                         r"product of lists; replay them with --group-by method"):
        replay_module.load_groups([tmp_path / "ft", tmp_path / "other"], "none")


def test_compute_to_reach_counts_each_trials_samples_until_the_first_hit(replay_module, grid):
    group = _group(replay_module, grid, "dynsdpb")
    scores = replay_module.selection_scores(group.curves, "eval_accuracy", "best")
    assert max(scores.values()) == 0.95
    events = replay_module.grid_order_events(group, "eval_accuracy")
    # one example of 20 = 0.05: target 0.90, first reached by B's second report: A's 30 + B's 20 samples, 2 trials
    hit = replay_module.compute_to_reach(events, "eval_accuracy", 0.90)
    assert hit == {"reached": True, "compute": 50.0, "trials_started": 2, "by_trial": group.trial_ids[1]}
    # selection by the last report: only a trial's last report counts, B's third: 30 + 30
    last = replay_module.compute_to_reach(events, "eval_accuracy", 0.90, select="last")
    assert (last["reached"], last["compute"], last["trials_started"]) == (True, 60.0, 2)
    # a trial stopped before its end (its reports cut short, as ASHA leaves them) has no final report: under "last"
    # B's 0.90 at its second report no longer counts, and nothing else reaches 0.90
    cut = [e for e in events if not (e["trial_id"] == group.trial_ids[1] and e["final"])]
    assert not replay_module.compute_to_reach(cut, "eval_accuracy", 0.90, select="last")["reached"]
    assert replay_module.compute_to_reach(cut, "eval_accuracy", 0.90)["by_trial"] == group.trial_ids[1]
    # never reached: the whole of what ran, every trial started
    never = replay_module.compute_to_reach(events, "eval_accuracy", 0.96)
    assert never == {"reached": False, "compute": 120.0, "trials_started": 4, "by_trial": None}
    # a low target, 0.55: A's second report, 20 samples of one trial
    assert replay_module.compute_to_reach(events, "eval_accuracy", 0.55) == {
        "reached": True, "compute": 20.0, "trials_started": 1, "by_trial": group.trial_ids[0]}
    assert replay_module.selection_scores(group.curves, "eval_accuracy", "last")[group.trial_ids[2]] == 0.8


def test_the_quantiles_keep_a_replay_that_never_reached_infinite(replay_module):
    outcomes = [{"reached": True, "fraction": f, "trials_started": 2, "ran_fraction": 1.0} for f in (0.2, 0.4, 0.6)]
    outcomes.append({"reached": False, "fraction": 0.9, "trials_started": 4, "ran_fraction": 0.9})
    summary = replay_module.summarise(outcomes)
    assert summary["reached"] == 0.75 and summary["median"] == pytest.approx(0.5)
    assert summary["q25"] == pytest.approx(0.35) and math.isinf(summary["q75"])


# --- real replays on a local Ray -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local(replay_module):
    import ray

    replay_module.start_ray(1)
    yield
    ray.shutdown()


def _by_trial(events):
    out = {}
    for e in events:
        out.setdefault(e["trial_id"], []).append(e)
    return out


def test_the_grid_replayed_with_asha_sends_the_recorded_curves_and_stops_what_asha_stops(
        replay_module, grid, ray_local, tmp_path):
    group = _group(replay_module, grid, "dynsdpb")
    run, plan = replay_module.replay(group, "grid", 0, 4, tmp_path)
    assert plan.sweep.asha.grace_period == 1 and plan.sweep.asha.reduction_factor == 2 and plan.max_t == 3
    a, b, c, d = group.trial_ids
    assert run.started == [a, b, c, d] and run.repeated == 0
    sent = _by_trial(run.events)
    # each trial's reports are its recorded rows, in order; B and D stopped at the first rung (epoch 1)
    for trial_id, count in ((a, 3), (b, 1), (c, 3), (d, 1)):
        assert [(e["samples_seen"], e["eval_accuracy"]) for e in sent[trial_id]] == [
            (r["samples_seen"], r["eval_accuracy"]) for r in group.curves[trial_id][:count]]
    # target 0.90 never reached (B, the only trial above it, was stopped at 0.4): all it ran, 30 + 10 + 30 + 10
    assert replay_module.compute_to_reach(run.events, "eval_accuracy", 0.90) == {
        "reached": False, "compute": 80.0, "trials_started": 4, "by_trial": None}
    # target 0.75: C's first report, after A whole and B's one report
    assert replay_module.compute_to_reach(run.events, "eval_accuracy", 0.75)["compute"] == 30 + 10 + 10


def test_the_same_seed_suggests_the_same_trials_and_counts_the_same(replay_module, grid, ray_local, tmp_path):
    group = _group(replay_module, grid, "dynsdpb")
    first, _ = replay_module.replay(group, "random", 0, 4, tmp_path)
    again, _ = replay_module.replay(group, "random", 0, 4, tmp_path)
    assert first.started == again.started and first.events == again.events
    assert sorted(first.started) == sorted(group.trial_ids)  # 4 draws of a 4-point grid: every point once
    others = [replay_module.replay(group, "random", seed, 4, tmp_path)[0].started for seed in (1, 2, 3)]
    assert any(order != first.started for order in others)
    tpe, _ = replay_module.replay(group, "optuna", 3, 3, tmp_path)
    tpe_again, _ = replay_module.replay(group, "optuna", 3, 3, tmp_path)
    assert tpe.started == tpe_again.started and tpe.events == tpe_again.events


@pytest.mark.parametrize("searcher", ["optuna", "bohb"])
def test_optuna_and_bohb_search_the_grids_points_only(replay_module, grid, ray_local, tmp_path, searcher):
    """The whole grid (method searched; bohb as one HyperBand, group_by: []): every suggestion a recorded trial,
    each run once, each trial's reports a start of its recorded curve with none sent twice (a trial HyperBand
    paused resumes where it was)."""
    (group,) = replay_module.load_groups([grid[0]], "none")
    run, plan = replay_module.replay(group, searcher, 0, 5, tmp_path)
    assert len(run.started) == len(set(run.started)) == 5 and set(run.started) <= set(group.trial_ids)
    assert run.repeated == 0
    for trial_id, sent in _by_trial(run.events).items():
        recorded = group.curves[trial_id]
        assert [e["index"] for e in sent] == list(range(len(sent)))
        assert [e["samples_seen"] for e in sent] == [r["samples_seen"] for r in recorded[:len(sent)]]
    if searcher == "bohb":
        from raysdpb.sweep.driver import make_scheduler

        assert plan.sweep.asha.group_by == [] and type(make_scheduler(plan)).__name__ == "HyperBandForBOHB"
        # HyperBand paused a trial at its first rung and resumed it later (seed 0 does): its reports are not in one
        # run, and it went on from where it was (the indices above)
        places = {}
        for position, e in enumerate(run.events):
            places.setdefault(e["trial_id"], []).append(position)
        assert any(p[-1] - p[0] + 1 != len(p) for p in places.values())


def test_the_command_writes_a_summary_per_group_and_searcher(replay_module, grid, ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(replay_module, "start_ray", lambda cpus=1: None)  # the module's Ray is running
    out = tmp_path / "replay.json"
    replay_module.main([str(grid[0]), "--group-by", "method", "--searchers", "grid", "random", "--seeds", "2",
                        "--eval-examples", "20", "--json", str(out)])
    result = json.loads(out.read_text())
    groups = {g["group"]: g for g in result["groups"]}
    dyn = groups["dynsdpb"]
    assert (dyn["best_score"], dyn["target"], dyn["grid_compute"], dyn["select"]) == (0.95, pytest.approx(0.9), 120,
                                                                                      "best")
    assert dyn["grid_order"]["compute"] == 50 and dyn["grid_order"]["fraction"] == pytest.approx(50 / 120)
    grid_asha = dyn["searchers"]["grid"]["summary"]
    assert grid_asha["seeds"] == 1 and grid_asha["reached"] == 0.0 and grid_asha["median"] is None  # never
    assert dyn["searchers"]["random"]["summary"]["seeds"] == 2
    # finetune: best 0.7 (lr 1e-3's second report), target 0.65, reached in grid order at that report, after lr
    # 1e-4 whole: 30 + 20 of 60
    assert groups["finetune"]["grid_order"]["compute"] == 50 and groups["finetune"]["grid_compute"] == 60


def test_a_grid_with_a_heldout_dev_split_selects_by_the_last_report(replay_module, tmp_path, shared_data_dir,
                                                                     ray_local, monkeypatch):
    """v2's rule: the dev metric, each trial's last report. finetune's last reports are 0.6 and 0.7: target 0.7 - 1/10
    = 0.6, reached by lr 1e-4's last report (its 0.8 at epoch 2 would be the best-report rule's), 30 of 60 samples."""
    monkeypatch.setattr(replay_module, "start_ray", lambda cpus=1: None)  # the module's Ray is running
    write_method_grid(tmp_path / "ft", shared_data_dir, "finetune", {1e-4: [0.5, 0.8, 0.6], 1e-3: [0.4, 0.5, 0.7]})
    out = tmp_path / "v2.json"
    replay_module.main([str(tmp_path / "ft"), "--group-by", "method", "--searchers", "grid", "--eval-examples", "10",
                        "--json", str(out)])
    (group,) = json.loads(out.read_text())["groups"]
    assert (group["metric"], group["select"], group["best_score"]) == ("eval_dev_accuracy", "last", 0.7)
    assert group["target"] == pytest.approx(0.6)
    assert (group["grid_order"]["compute"], group["grid_order"]["trials_started"]) == (30, 1)
