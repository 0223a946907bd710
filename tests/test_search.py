"""Searches beyond grids: distributions in the `search:` block, `sweep.search: random | optuna | bohb`.

Before Ray: the config's errors, one line each; random search's seeded draws; a sampled plan's checks. The
searchers themselves (`raysdpb.sweep.searchers.SampledTrials` around Ray Tune's OptunaSearch and TuneBOHB) against a
made-up objective, in this process: the same seed gives the same trials, a repeated suggestion is not run twice,
and a searcher saved and restored midway continues as the uninterrupted one. Then on a real local Ray: the searcher
inside Tune, stopped and resumed (`Tuner.restore`), and (slow) whole sweeps, killed and resumed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.sweep.plan import plan_sweep
from raysdpb.sweep.searchers import SampledTrials, make_searcher, read_samples
from raysdpb.sweep.space import SampledSpace, draw_random
from trial_configs import sweep_env, sweep_raw


def _plan(data_dir, tmp_path, search, sweep=None, **trial):
    return plan_sweep(load_experiment(None, raw=sweep_raw(data_dir, tmp_path, "s", search, sweep, **trial)))


# --- the config --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("search, sweep, message", [
    ({"lr": {"logunifrm": [1e-5, 1e-4]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.lr: unknown distribution 'logunifrm'; allowed: uniform, loguniform, randint"),
    ({"lr": {"loguniform": [1e-4, 1e-5]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.lr: loguniform needs low < high; got \[0\.0001, 1e-05\]$"),
    ({"lr": {"loguniform": [0.0, 1e-4]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.lr: loguniform needs low > 0"),
    ({"lr": {"uniform": [1e-5]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.lr: uniform takes two numbers \[low, high\]; got \[1e-05\]$"),
    ({"lr": {"uniform": [1e-5, 1e-4], "loguniform": [1e-5, 1e-4]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.lr: a distribution is one of uniform, loguniform, randint"),
    ({"epochs": {"randint": [1, 2.5]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.epochs: randint takes two integers \[low, high\] \(both included\)"),
    ({"epochs": {"uniform": [1, 3]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.epochs: epochs is an integer, and uniform draws floats; use \{randint: \[1, 3\]\}$"),
    ({"epochs": {"randint": [0, 3]}}, {"search": "random", "num_samples": 2},
     r"^<config>: search\.epochs: value 0 is invalid: epochs: Input should be greater than or equal to 1$"),
    ({"lr": {"loguniform": [1e-5, 1e-4]}}, {},
     r"^<config>: search\.lr: a distribution needs a searcher that samples \(sweep\.search: random, optuna, bohb"),
    ({"lr": [1e-5, 1e-4]}, {"num_samples": 3}, r"^<config>: sweep\.num_samples: only with sweep\.search: random"),
    ({"lr": [1e-5, 1e-4]}, {"search": "optuna"},
     r"^<config>: sweep\.num_samples: sweep\.search: optuna needs the number of trials to sample$"),
    ({}, {"search": "random", "num_samples": 2},
     r"^<config>: sweep\.search: random samples the search block, which is empty$"),
    ({"task": ["superglue/cb", "glue/rte"]}, {"search": "optuna", "num_samples": 2},
     r"^<config>: search\.task: sweep\.search: optuna optimises one objective; search one task per sweep"),
    ({"method": ["finetune", "dynsdpb"]}, {"search": "bohb", "num_samples": 2, "asha": {}},
     r"^<config>: search\.method: sweep\.search: bohb runs one HyperBand over every trial \(no groups\)"),
    ({"lr": [1e-5, 1e-4]}, {"search": "bohb", "num_samples": 2, "asha": None},
     r"^<config>: sweep\.asha: sweep\.search: bohb runs its own HyperBand"),
    ({"lr": [1e-5]}, {"search": "hyperopt"}, r"^<config>: sweep\.search: Input should be 'grid', 'random', 'optuna'"),
])
def test_a_search_mistake_is_one_line_naming_its_key(tmp_path, shared_data_dir, search, sweep, message):
    with pytest.raises(UserError, match=message):
        load_experiment(None, raw=sweep_raw(shared_data_dir, tmp_path, "s", search, sweep))


def test_a_distribution_keeps_the_trials_own_value_in_a_local_run(tmp_path, shared_data_dir):
    raw = sweep_raw(shared_data_dir, tmp_path, "s", {"lr": {"loguniform": [1e-5, 1e-3]}, "alpha": [0.5, 0.7]},
                    {"search": "random", "num_samples": 3})
    first = load_experiment(None, raw=raw).first_point()
    assert first.lr == raw["lr"] and first.alpha == 0.5  # (python -m raysdpb.train: the list's first value)


# --- random search: seeded draws, planned before Ray -------------------------------------------------------------

def test_random_search_draws_the_same_distinct_trials_for_the_same_seed(tmp_path, shared_data_dir):
    search = {"lr": {"loguniform": [1e-5, 1e-3]}, "alpha": {"uniform": [0.2, 0.8]}, "epochs": {"randint": [1, 3]},
              "batch_size": [8, 16]}
    plan = _plan(shared_data_dir, tmp_path, search, {"search": "random", "num_samples": 40, "asha": {}})
    again = _plan(shared_data_dir, tmp_path, search, {"search": "random", "num_samples": 40})
    other = _plan(shared_data_dir, tmp_path, search, {"search": "random", "num_samples": 40, "seed": 1})
    ids = [p.trial_id for p in plan.points]
    assert ids == [p.trial_id for p in again.points] and len(set(ids)) == 40
    assert ids != [p.trial_id for p in other.points]
    for point in plan.points:  # each draw within its bounds, as the trial's own config
        assert 1e-5 <= point.config.lr < 1e-3 and 0.2 <= point.config.alpha < 0.8
        assert point.config.batch_size in (8, 16) and point.values["epochs"] == point.config.epochs
    # randint's bounds are both drawn (raysdpb's [1, 3] is Tune's randint(1, 4)), and nothing else
    assert {p.config.epochs for p in plan.points} == {1, 2, 3}
    # loguniform: about as many draws in each decade (40 draws; a uniform draw would put ~36 in the upper one)
    low = sum(p.config.lr < 1e-4 for p in plan.points)
    assert 10 <= low <= 30, low
    assert plan.max_t == 3 and plan.metric == "eval_accuracy"
    # the prefix of a longer search is the shorter one: num_samples only says where to stop
    assert [p.trial_id for p in _plan(shared_data_dir, tmp_path, search,
                                      {"search": "random", "num_samples": 5}).points] == ids[:5]


def test_random_search_drops_unused_hyperparameters_and_stops_at_the_distinct_trials(tmp_path, shared_data_dir):
    """finetune ignores alpha: its draws keep the base alpha, and two finetune draws at one lr are one trial; a search
    block of 2 x 2 lists has 4 distinct trials, however many samples are asked for (the dry run says so)."""
    space = SampledSpace.of(load_experiment(None, raw=sweep_raw(
        shared_data_dir, tmp_path, "s", {"method": ["finetune"], "alpha": {"uniform": [0.1, 0.9]}},
        {"search": "random", "num_samples": 3})))
    (only,) = draw_random(space, 3, seed=0)
    assert only.values == {"method": "finetune"} and only.config.alpha == 1.0 and only.label == "method=finetune"
    search = {"lr": [1e-4, 2e-4], "seed": [0, 1]}
    plan = _plan(shared_data_dir, tmp_path, search, {"search": "random", "num_samples": 9})
    grid = _plan(shared_data_dir, tmp_path, search)
    assert sorted(p.trial_id for p in plan.points) == sorted(p.trial_id for p in grid.points)  # same ids as the grid's


def test_cli_dry_run_describes_each_search(tmp_path, shared_data_dir):
    search = {"lr": {"loguniform": [1e-5, 1e-3]}, "alpha": [0.5, 1.0]}
    lines = {}
    for searcher in ("random", "optuna", "bohb"):
        raw = sweep_raw(shared_data_dir, tmp_path / "results", searcher, search,
                        {"search": searcher, "num_samples": 3, "asha": {}})
        config = tmp_path / f"{searcher}.yaml"
        config.write_text(yaml.safe_dump(raw))
        out = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "--dry-run"], cwd=tmp_path,
                             env=sweep_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines[searcher] = out.stdout.strip().splitlines()
    random, optuna, bohb = lines["random"], lines["optuna"], lines["bohb"]
    assert len(random) == 3 + 3 and random[0].startswith("dynsdpb-") and "lr=" in random[0]
    assert random[-3].startswith("3 trials; metric eval_accuracy (max)")
    keys = "alpha: [0.5, 1.0], lr: loguniform(1e-05, 0.001)"  # (the keys as the YAML file lists them: sorted)
    assert random[-2] == f"search: random (Ray Tune's variant generator), num_samples 3, seed 0; {keys}"
    assert optuna == [f"3 trials, chosen by optuna as results come in; metric eval_accuracy (max); experiment "
                      f"{tmp_path / 'results' / 'optuna'}",
                      f"search: optuna (OptunaSearch, TPE sampler), num_samples 3, seed 0; {keys}",
                      "ASHA: groups by task/model/num_layers/method as trials are sampled; grace_period 1, "
                      "reduction_factor 2, max_t 2 (epoch); rungs at epoch 1, 2"]
    assert bohb[1] == f"search: bohb (TuneBOHB, with HyperBandForBOHB as the scheduler), num_samples 3, seed 0; {keys}"
    assert bohb[2].startswith("scheduler: HyperBandForBOHB instead of ASHA (one HyperBand over every trial); "
                              "reduction_factor 2, max_t 2 (epoch)")


def test_a_missing_searcher_package_names_the_extra_before_ray(tmp_path, shared_data_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hpbandster" else
                        find_spec(name, *a))
    with pytest.raises(UserError, match=r"^<config>: sweep\.search: bohb needs hpbandster, which is not installed: "
                                        r"pip install 'raysdpb\[search\]'$"):
        _plan(shared_data_dir, tmp_path, {"lr": [1e-4, 2e-4]}, {"search": "bohb", "num_samples": 2, "asha": {}})


def test_a_sampled_plan_checks_the_ends_of_its_search(tmp_path, shared_data_dir):
    """optuna's trials are not known before it runs: the plan checks the search's corners (each list value and each
    distribution's bounds), and ASHA's max_t is the longest trial it may sample."""
    plan = _plan(shared_data_dir, tmp_path, {"epochs": {"randint": [1, 4]}, "model": ["tiny-bert", "minilm-l6"]},
                 {"search": "optuna", "num_samples": 4, "asha": {}})
    assert plan.points == [] and plan.max_t == 4 and plan.score_metric == "eval_accuracy"
    assert sorted((p.config.epochs, p.config.model) for p in plan.check_points) == [
        (1, "minilm-l6"), (1, "tiny-bert"), (4, "minilm-l6"), (4, "tiny-bert")]


# --- the searchers, in this process ------------------------------------------------------------------------------

def _objective(values: dict) -> float:
    """A made-up score with its best at lr 1e-4, alpha 0.5 (and seed 1 a little better)."""
    return -abs(math.log10(values["lr"]) + 4) - abs(values.get("alpha", 0.5) - 0.5) + 0.01 * values.get("seed", 0)


def _searcher(tmp_path, shared_data_dir, searcher: str, search: dict, seed: int = 0, name: str = "s"):
    plan = _plan(shared_data_dir, tmp_path, search, {"name": name, "search": searcher, "num_samples": 20,
                                                     "seed": seed, "asha": {}})
    return make_searcher(plan), plan


def _run(searcher: SampledTrials, trials: int, start: int = 0, budget: bool = False, sign: float = 1.0) -> list[str]:
    """Ask for `trials` suggestions one at a time, each completed with the objective's score (times `sign`); the
    sweep's ids."""
    ids = []
    for n in range(start, start + trials):
        config = searcher.suggest(f"t{n}")
        if config is None or config == SampledTrials.FINISHED:
            ids.append(config)
            continue
        values = {k: v for k, v in config.items() if k != "trial_id"}
        result = {"eval_accuracy": sign * _objective(values), "epoch": 2, "training_iteration": 1}
        if budget:  # what HyperBandForBOHB adds to a result at a rung: BOHB learns from those
            result["hyperband_info"] = {"budget": 2}
        searcher.on_trial_result(f"t{n}", result)
        searcher.on_trial_complete(f"t{n}", result)
        ids.append(config["trial_id"])
    return ids


@pytest.mark.parametrize("kind", ["optuna", "bohb"])
def test_a_searcher_suggests_the_same_trials_for_the_same_seed(tmp_path, shared_data_dir, kind):
    search = {"lr": {"loguniform": [1e-6, 1e-2]}, "alpha": {"uniform": [0.0, 1.0]}, "seed": [0, 1]}
    first, plan = _searcher(tmp_path, shared_data_dir, kind, search, name="a")
    again, _ = _searcher(tmp_path, shared_data_dir, kind, search, name="b")
    other, _ = _searcher(tmp_path, shared_data_dir, kind, search, seed=7, name="c")
    import numpy as np

    np.random.seed(123)  # the global generator's state is not the searcher's: BOHB draws from its own
    ids = _run(first, 16, budget=kind == "bohb")
    np.random.seed(456)
    assert _run(again, 16, budget=kind == "bohb") == ids and len(set(ids)) == 16
    assert _run(other, 16, budget=kind == "bohb") != ids
    # every suggestion recorded in samples.json, in order, with the config its workers run
    samples = read_samples(f"{tmp_path}/a")
    assert [s["trial_id"] for s in samples] == ids
    assert samples[0]["config"]["lr"] == samples[0]["values"]["lr"] and samples[0]["config"]["progress_bar"] is False
    if kind == "optuna":
        # the scores steer it: with the opposite scores, TPE's 10 random start-up trials are the same (what holds
        # whatever order results arrive in), the ones its model chooses after them are not
        flipped, _ = _searcher(tmp_path, shared_data_dir, kind, search, name="d")
        opposite = _run(flipped, 16, sign=-1.0)
        assert opposite[:10] == ids[:10] and opposite[10:] != ids[10:]


def test_a_repeated_suggestion_is_told_its_earlier_score_and_not_run_again(tmp_path, shared_data_dir):
    """A search of 2 x 2 lists has 4 trials: TPE suggests them again and again; each repeat is answered with the
    earlier trial's score, so the sweep runs 4 trials and the search ends when nothing new comes."""
    searcher, _ = _searcher(tmp_path, shared_data_dir, "optuna", {"lr": [1e-4, 1e-3], "seed": [0, 1]})
    ids = _run(searcher, 6)
    assert len(set(ids[:4])) == 4 and ids[4:] == [SampledTrials.FINISHED, SampledTrials.FINISHED]
    assert searcher.repeats >= 50
    # a repeat of a running trial is not run either: the searcher waits (None) while one runs
    fresh, _ = _searcher(tmp_path, shared_data_dir, "optuna", {"lr": [1e-4]}, name="one")
    running = fresh.suggest("t0")
    assert running["lr"] == 1e-4 and fresh.suggest("t1") is None


@pytest.mark.parametrize("kind", ["optuna", "bohb"])
def test_a_searcher_saved_and_restored_midway_continues_as_the_uninterrupted_one(tmp_path, shared_data_dir, kind):
    search = {"lr": {"loguniform": [1e-6, 1e-2]}, "alpha": {"uniform": [0.0, 1.0]}}
    whole, _ = _searcher(tmp_path, shared_data_dir, kind, search, name="whole")
    expected = _run(whole, 14, budget=kind == "bohb")
    first, _ = _searcher(tmp_path, shared_data_dir, kind, search, name="cut")
    head = _run(first, 11, budget=kind == "bohb")
    first.save(str(tmp_path / "searcher.pkl"))  # as Tune saves it with the experiment's state
    restored, _ = _searcher(tmp_path, shared_data_dir, kind, search, name="cut")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert head + _run(restored, 3, start=11, budget=kind == "bohb") == expected
    assert [s["trial_id"] for s in read_samples(f"{tmp_path}/cut")] == expected  # each recorded once


def test_the_trackers_find_a_sampled_trials_config_and_label(tmp_path, shared_data_dir):
    """MLflow and W&B runs are named and parametrised from grid.json's trials, and a searcher's from samples.json,
    which grows as it suggests them."""
    import json

    from raysdpb.sweep.trackers import _label, _trial_configs

    searcher, plan = _searcher(tmp_path, shared_data_dir, "optuna", {"lr": {"loguniform": [1e-5, 1e-3]}})
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "grid.json").write_text(json.dumps({"format": 2, "trial_ids": [], "trials": {}}))
    configs, labels = _trial_configs(str(tmp_path / "s")), {}
    first = searcher.suggest("t0")["trial_id"]
    assert configs[first]["lr"] == read_samples(str(tmp_path / "s"))[0]["values"]["lr"]
    assert _label(labels, str(tmp_path / "s"), first) == read_samples(str(tmp_path / "s"))[0]["label"]
    assert configs["dynsdpb-00000000"] == {} and _label(labels, str(tmp_path / "s"), "dynsdpb-00000000") == ""


def test_a_sampled_trials_driver_makes_the_config_the_searcher_recorded(tmp_path, shared_data_dir):
    """The trial's driver makes its config from grid.json's search space and its Tune config (no samples.json read);
    it is the config recorded, and values that make another trial are refused."""
    from raysdpb.sweep.driver import localize
    from raysdpb.sweep.plan import search_record
    from raysdpb.sweep.searchers import sampled_config

    searcher, plan = _searcher(tmp_path, shared_data_dir, "optuna", {"lr": {"loguniform": [1e-5, 1e-3]},
                                                                     "method": ["finetune", "dynsdpb"]})
    grid = {"trials": {}, "search": search_record(plan)}
    for n in range(4):
        tune_config = searcher.suggest(f"t{n}")
        values = {k: v for k, v in tune_config.items() if k != "trial_id"}
        recorded = read_samples(f"{tmp_path}/s")[n]
        assert sampled_config(grid, tune_config["trial_id"], values, localize) == recorded["config"]
        assert values == recorded["values"]
    with pytest.raises(RuntimeError, match="make trial"):
        sampled_config(grid, recorded["trial_id"], {**values, "lr": 0.5e-4 + values["lr"]}, localize)


# --- on a real local Ray -----------------------------------------------------------------------------------------

def _sweep(tmp_path, raw: dict, *args: str, env=None, background: bool = False):
    config = tmp_path / f"{raw['sweep']['name']}.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "raysdpb.sweep", str(config), "-q", *args]
    if background:
        return subprocess.Popen(command, cwd=tmp_path, env=env or sweep_env(), start_new_session=True,
                                stdout=open(tmp_path / f"{raw['sweep']['name']}.log", "w"), stderr=subprocess.STDOUT)
    out = subprocess.run(command, cwd=tmp_path, env=env or sweep_env(), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# slow (minutes: 4 + 4 real trials, one at a time, on 2 cores)
@pytest.mark.slow
def test_an_optuna_sweep_is_deterministic_and_a_killed_one_resumes_its_searcher(tmp_path, shared_data_dir):
    """Two sweeps of 4 Optuna trials, one trial at a time, same seed: the second is killed (driver and local Ray at
    once) while its second trial runs, and resumed. The resumed searcher (Tune's saved state) carries on: the same 4
    trials as the uninterrupted sweep, in the same order, each run to its end once; the Parquet rows as a grid's."""
    search = {"lr": {"loguniform": [1e-5, 1e-3]}, "alpha": {"uniform": [0.2, 1.0]}}
    sweep = {"search": "optuna", "num_samples": 4, "max_concurrent_trials": 1}
    storage = tmp_path / "results"
    _sweep(tmp_path, sweep_raw(shared_data_dir, storage, "whole", search, sweep, epochs=1))
    whole = [s["trial_id"] for s in read_samples(str(storage / "whole"))]
    rows = _rows(storage / "whole" / "trials.parquet")
    assert [r["trial_id"] for r in rows] == whole and len(set(whole)) == 4
    assert all(r["status"] == "completed" and r["method"] == "dynsdpb" for r in rows)
    samples = {s["trial_id"]: s for s in read_samples(str(storage / "whole"))}
    for row in rows:  # each row holds the config its searcher sampled, as a grid trial's row does
        values = samples[row["trial_id"]]["values"]
        assert row["lr"] == values["lr"] and row["alpha"] == values["alpha"]
        # (the label's keys in the search block's order: the YAML file's, which safe_dump sorted)
        assert row["label"] == samples[row["trial_id"]]["label"] == f"alpha={row['alpha']:g},lr={row['lr']:g}"
        assert row["best_eval_accuracy"] is not None

    raw = sweep_raw(shared_data_dir, storage, "cut", search, sweep, epochs=1)
    first = _sweep(tmp_path, raw, background=True)
    try:
        deadline = time.monotonic() + 900
        while len(read_samples(str(storage / "cut"))) < 2:  # the second trial suggested, so the first has finished
            assert first.poll() is None, (tmp_path / "cut.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep did not get to its second trial in time"
            time.sleep(0.5)
        time.sleep(5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: nothing saved on the way out
        first.wait(30)
    _sweep(tmp_path, raw, "--resume")
    resumed = [s["trial_id"] for s in read_samples(str(storage / "cut"))]
    assert resumed == whole
    rows = _rows(storage / "cut" / "trials.parquet")
    assert sorted(r["trial_id"] for r in rows) == sorted(whole)
    assert all(r["status"] == "completed" for r in rows)
    curves = _rows(storage / "cut" / "curves.parquet")
    reports = sorted((c["trial_id"], c["step"]) for c in curves)  # (a report every 3 steps and at the epoch's end)
    assert reports == sorted(set(reports)) == sorted((c["trial_id"], c["step"])
                                                     for c in _rows(storage / "whole" / "curves.parquet"))
    assert {c["trial_id"] for c in curves if c["epoch"] == 1} == set(whole)  # each recorded once, to its end


@pytest.mark.slow
def test_random_and_bohb_sweeps_on_ray(tmp_path, shared_data_dir):
    """Random search runs exactly the trials its dry run lists; BOHB's HyperBand (2 epochs, rungs at each) runs its 4
    trials to their ends or stops them, and each row says which."""
    storage = tmp_path / "results"
    search = {"lr": {"loguniform": [1e-5, 1e-3]}, "alpha": [0.5, 1.0]}
    raw = sweep_raw(shared_data_dir, storage, "random", search, {"search": "random", "num_samples": 2}, epochs=1)
    _sweep(tmp_path, raw)
    # (from the file the sweep read: the draws follow the search block's key order, which safe_dump sorted)
    planned = [p.trial_id for p in plan_sweep(load_experiment(tmp_path / "random.yaml")).points]
    assert [r["trial_id"] for r in _rows(storage / "random" / "trials.parquet")] == planned

    raw = sweep_raw(shared_data_dir, storage, "bohb", search, {"search": "bohb", "num_samples": 4, "asha": {}},
                    eval_every_steps=None)
    _sweep(tmp_path, raw)
    rows = _rows(storage / "bohb" / "trials.parquet")
    # (rows in the order trials start: HyperBand picks which suggested trial starts next, so as a set)
    assert sorted(r["trial_id"] for r in rows) == sorted(s["trial_id"] for s in read_samples(str(storage / "bohb")))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "stopped_by_asha"}
    for row in rows:
        if row["status"] == "stopped_by_asha":
            assert row["stop_reason"].startswith("HyperBand (BOHB) stopped it at epoch 1: eval_accuracy=")
    assert list((storage / "bohb").glob("searcher-state-*.pkl"))
