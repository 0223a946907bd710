"""benchmarks/searchers.py: the compute a sweep needs to reach a score, against hand-made curves; (slow) its smoke
run end to end on a real local Ray: a grid and the three searchers, scored."""

from __future__ import annotations

import json
import os

import pytest

from trial_configs import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("searchers.py", "searchers_benchmark")


def test_compute_to_reach_counts_every_trials_epochs_until_the_first_report_at_the_target(bench):
    """Three trials, reports at epochs 1..3: a (t 10, 20, 30: 0.5, 0.6, 0.7), b (t 15, 25: 0.6, 0.8; started
    later, stopped at 2), c (t 26: 0.9). Target 0.8 is first reached by b at t 25: by then a had run 2 epochs
    (its t-20 report), b 2, c none: 4 epochs, 2 trials. Target 0.9: at t 26, a 2 + b 2 + c 1 = 5. Target 0.95:
    never; the whole sweep's 3 + 2 + 1."""
    curves = [dict(trial_id="a", epoch=e, timestamp=t, eval_accuracy=v) for e, t, v in
              ((1, 10, 0.5), (2, 20, 0.6), (3, 30, 0.7))]
    curves += [dict(trial_id="b", epoch=1, timestamp=15, eval_accuracy=0.6),
               dict(trial_id="b", epoch=2, timestamp=25, eval_accuracy=0.8),
               dict(trial_id="c", epoch=1, timestamp=26, eval_accuracy=0.9),
               dict(trial_id="c", epoch=1, timestamp=None, eval_accuracy=1.0)]  # no time: not counted
    assert bench.compute_to_reach(curves, "eval_accuracy", 0.8) == {"reached": True, "epochs": 4.0,
                                                                     "trials_started": 2, "by_trial": "b"}
    assert bench.compute_to_reach(curves, "eval_accuracy", 0.9)["epochs"] == 5.0
    assert bench.compute_to_reach(curves, "eval_accuracy", 0.95) == {"reached": False, "epochs": 6.0,
                                                                      "trials_started": 3, "by_trial": None}
    assert bench.best_score([{"best_eval_accuracy": 0.5}, {"best_eval_accuracy": None}, {"best_eval_accuracy": 0.7}],
                            "eval_accuracy") == 0.7


def test_the_configs_search_the_grids_box(bench, tmp_path):
    from raysdpb.config import load_experiment

    args = bench.parse_args(["--root", str(tmp_path), "--grid", "small", "--num-samples", "5"])
    _, grid = bench.write_config("glue/rte", "grid", args)
    _, optuna = bench.write_config("glue/rte", "optuna", args)
    grid, optuna = load_experiment(grid), load_experiment(optuna)
    assert grid.sweep.search == "grid" and grid.sweep.asha is None and grid.trial.max_train_samples == 1000
    assert optuna.sweep.search == "optuna" and optuna.sweep.num_samples == 5 and optuna.sweep.asha is not None
    for key, values in grid.search.items():  # the searchers' box is the grid's span
        assert optuna.search[key].bounds() == (min(values), max(values))
    # MRPC (the default second task) as protocol v2 trains it, the grid two at a time, the searchers one
    _, grid = bench.write_config("glue/mrpc", "grid", args)
    _, bohb = bench.write_config("glue/mrpc", "bohb", args)
    grid, bohb = load_experiment(grid), load_experiment(bohb)
    assert (grid.trial.max_train_samples, grid.trial.max_length, grid.trial.eval_every_steps) == (800, 96, 50)
    assert grid.sweep.max_concurrent_trials == 2 and bohb.sweep.max_concurrent_trials == 1
    assert (grid.sweep.cpus_per_worker, bohb.sweep.cpus_per_worker) == (1.0, min(2.0, os.cpu_count()))  # the same CPUs
    assert args.tasks == ["superglue/cb", "glue/mrpc"]
    assert bench.parse_args(["--searchers"]).searchers == []  # the grid alone
    assert bench.main_metric("glue/mrpc") == "eval_accuracy" and bench.main_metric("glue/cola") == "eval_matthews"


# slow: four real sweeps (2 + 2 + 2 + 2 tiny trials) on a 2-core CPU
@pytest.mark.slow
def test_smoke_run(bench, tmp_path, shared_data_dir, capsys):
    results = bench.main(["--smoke", "--root", str(tmp_path / "root"), "--archive", str(tmp_path / "archive"),
                          "--data-dir", str(shared_data_dir), "--json", str(tmp_path / "out.json")])
    (task,) = results["tasks"]
    assert set(task["sweeps"]) == {"grid", "random", "optuna", "bohb"}
    assert task["eval_examples"] == 16 and task["target"] == pytest.approx(task["grid_best"] - 1 / 16)
    assert task["sweeps"]["grid"]["reached"] and task["sweeps"]["grid"]["trials"] == 2
    for search in ("random", "optuna", "bohb"):
        assert task["sweeps"][search]["trials"] == 2
        assert (tmp_path / "archive" / bench.sweep_name("superglue/cb", search) / "samples.json").exists() or \
            search == "random"
    assert json.loads((tmp_path / "out.json").read_text())["tasks"][0]["grid_best"] == task["grid_best"]
    # run again: everything is read from the archive, nothing trains
    capsys.readouterr()
    bench.main(["--smoke", "--root", str(tmp_path / "other"), "--archive", str(tmp_path / "archive"),
                "--data-dir", str(shared_data_dir)])
    assert capsys.readouterr().out.count("finished earlier") == 4
