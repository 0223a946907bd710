"""The report: its numbers on hand-made trials with known answers, its sections when pieces are missing, a
report of a real (tiny) sweep checked against the sweep's Parquet files, and its HTML rendered by headless
Chromium."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from raysdpb.errors import UserError, run_cli
from raysdpb.report import build_report, main
from raysdpb.report import tables
from raysdpb.report.tables import (alpha_tau_grid, compute_costs, compute_table, cost_table, method_order,
                                   paired_comparisons, prepare, results_table, select_configs)
from raysdpb.results.schema import best_per_method
from trial_configs import sweep_env


def _trials(rows: list[dict], **common) -> pd.DataFrame:
    """Trial rows as trials.parquet has them (only the columns the report reads)."""
    base = dict(task="superglue/cb", model="tiny-bert", lr=1e-4, alpha=1.0, tau=2.0, seed=0, status="completed",
                epochs=2, epochs_run=2.0, planned_epochs=2.0, wall_time_s=60.0, last_world_size=1)
    out = []
    for i, row in enumerate(rows):
        row = {**base, **common, **row}
        row.setdefault("trial_id", f"{row['method']}-{i:08x}")
        out.append(row)
    return pd.DataFrame(out)


def _seeds(method: str, values: list[float], **config) -> list[dict]:
    return [dict(method=method, seed=s, best_eval_accuracy=v, **config) for s, v in enumerate(values)]


def _write(folder: Path, trials: pd.DataFrame, curves: pd.DataFrame | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    trials.to_parquet(folder / "trials.parquet")
    if curves is not None:
        curves.to_parquet(folder / "curves.parquet")
    return folder


# --- the numbers, on hand-made trials -------------------------------------------------------------------

def test_best_configuration_is_the_best_mean_over_seeds_not_the_best_trial():
    trials = _trials(
        _seeds("dynsdpb", [0.70, 0.80, 0.75], lr=1e-4)        # mean 0.75
        + _seeds("dynsdpb", [0.95, 0.50, 0.60], lr=3e-5)     # holds the best single trial, mean 0.683
        + _seeds("finetune", [0.60, 0.70, 0.65])
        + [dict(method="finetune", seed=3, best_eval_accuracy=0.99, status="errored"),   # not finished: out
           dict(method="finetune", seed=4, best_eval_accuracy=None)])                  # never reported: out
    selection = select_configs(prepare(trials)).set_index("method")
    dyn = selection.loc["dynsdpb"]
    assert dict(dyn.config)["lr"] == 1e-4 and dyn.label == "lr=0.0001"
    assert dyn["mean"] == pytest.approx(0.75)
    assert dyn["std"] == pytest.approx(0.05)  # sample std of 0.70, 0.80, 0.75
    assert dyn.n == 3 and dyn.n_trials == 6 and dyn.n_configs == 2
    assert dyn.seeds == {0: 0.70, 1: 0.80, 2: 0.75}
    assert dyn.best_trial_id == trials.trial_id[1]  # its best seed (0.80)
    ft = selection.loc["finetune"]
    assert ft["mean"] == pytest.approx(0.65) and ft.n == 3 and ft.n_trials == 3

    table = results_table(select_configs(prepare(trials)))
    assert table.columns == ["method", "superglue/cb (eval_accuracy)"]
    assert table.rows == [["finetune", "65.00 ± 5.00 (n=3/3)"], ["dynsdpb", "75.00 ± 5.00 (n=3/6)"]]
    assert table.bold == {(1, 1)}


def test_ties_more_seeds_and_a_single_seed_has_no_std():
    trials = _trials(_seeds("finetune", [0.5], lr=1e-3) + _seeds("finetune", [0.6, 0.4], lr=1e-4)
                     + _seeds("dynsdpb", [0.5]))
    selection = select_configs(prepare(trials)).set_index("method")
    assert dict(selection.loc["finetune"].config)["lr"] == 1e-4  # equal means: the one with more seeds
    assert math.isnan(selection.loc["dynsdpb"]["std"])
    table = results_table(select_configs(prepare(trials)))
    assert table.rows[1] == ["dynsdpb", "50.00 (n=1/1)"]
    assert table.bold == {(0, 1), (1, 1)}  # a tie: both bold


def test_each_task_its_main_metric_and_models_as_columns():
    trials = _trials(
        [dict(method="finetune", task="glue/cola", best_eval_matthews=0.30, best_eval_accuracy=0.70),
         dict(method="finetune", task="glue/mnli", best_eval_accuracy=0.80, best_eval_mm_accuracy=0.10),
         dict(method="finetune", task="glue/mnli", eval_split="validation_mismatched", best_eval_accuracy=0.75),
         dict(method="finetune", task="custom", main_metric="eval_macro_f1", best_eval_macro_f1=0.40)])
    prepared = prepare(trials)
    assert list(prepared["_metric"]) == ["eval_matthews", "eval_accuracy", "eval_accuracy", "eval_macro_f1"]
    assert list(prepared["_value"]) == [0.30, 0.80, 0.75, 0.40]
    assert list(prepare(trials, metric="eval_accuracy", at="best")["_value"][:2]) == [0.70, 0.80]

    two_models = _trials(_seeds("finetune", [0.5, 0.7], model="/models/bert-base")
                         + _seeds("finetune", [0.6, 0.8], model="minilm-l6"))
    table = results_table(select_configs(prepare(two_models)))
    assert table.columns[1:] == ["bert-base / superglue/cb (eval_accuracy)",
                                 "minilm-l6 / superglue/cb (eval_accuracy)"]
    assert table.rows == [["finetune", "60.00 ± 14.14 (n=2/2)", "70.00 ± 14.14 (n=2/2)"]]


def test_a_trial_s_metric_is_its_main_metric_column_else_its_registered_task_s_else_none(tmp_path):
    with_column = _trials([dict(method="finetune", main_metric="eval_macro_f1", best_eval_macro_f1=0.40,
                                best_eval_accuracy=0.90),
                           dict(method="finetune", task="custom", main_metric="eval_f1", best_eval_f1=0.55)])
    without = _trials([dict(method="finetune", task="glue/cola", best_eval_matthews=0.30, best_eval_accuracy=0.70),
                       dict(method="dynsdpb", task="custom", best_eval_accuracy=0.99),     # metric unknown
                       dict(method="dynsdpb", task="no/such", best_eval_accuracy=0.98)])   # metric unknown
    # an older sweep's trials (no column) next to a newer one's: the column's null rows fall back
    prepared = prepare(pd.concat([with_column, without], ignore_index=True))
    assert list(prepared["_metric"][:3]) == ["eval_macro_f1", "eval_f1", "eval_matthews"]
    assert list(prepared["_value"][:3]) == [0.40, 0.55, 0.30]
    assert prepared["_metric"][3:].isna().all() and prepared["_value"][3:].isna().all()  # not eval_accuracy
    assert prepare(without, metric="eval_accuracy")["_value"].tolist() == [0.70, 0.99, 0.98]

    md = build_report([str(_write(tmp_path / "exp", without))])["markdown"].read_text()
    assert ("2 trial(s) had no known main metric (no `main_metric` in trials.parquet and a task that is not "
            "registered, e.g. `custom`), so they have no score; `--metric eval_<name>` picks one for every trial."
            in md)
    assert "never reported their metric" not in md
    assert "| finetune | **30.00 (n=1/1)** |" in md and "| dynsdpb |" not in md.split("## Cost")[0]


def test_the_sweep_and_the_report_break_a_tie_alike_by_grid_order():
    """The quickstart's finetune trials tie at 0.6964: both pick the first in grid order, not the first label
    (`lr=0.0001` < `lr=5e-05`)."""
    for lrs in ((5e-5, 1e-4), (1e-4, 5e-5)):
        trials = _trials([dict(method="finetune", lr=lr, best_eval_accuracy=0.6964) for lr in lrs]
                         + [dict(method="dynsdpb", lr=lr, best_eval_accuracy=0.5 + lr) for lr in lrs])
        rows = trials.to_dict("records")
        sweep = {r["method"]: r["trial_id"] for r in best_per_method(rows, "eval_accuracy", "max")}
        report = select_configs(prepare(trials)).set_index("method")["best_trial_id"].to_dict()
        assert sweep == report
        assert sweep["finetune"] == trials.trial_id[0]  # the first of the grid
        assert sweep["dynsdpb"] == trials.trial_id[2 + lrs.index(1e-4)]  # no tie: the better one


def test_a_newly_registered_method_follows_the_paper_s_six_in_order():
    import dataclasses

    from raysdpb.methods import METHODS, register
    from raysdpb.report.figures import method_color, method_marker

    paper = ["finetune", "double_finetune", "sequential_dlb", "random_dlb", "dynamic_finetune", "dynsdpb"]
    register(dataclasses.replace(METHODS["dynsdpb"], name="a_new_method"))
    try:
        methods = ["zz_unregistered", "a_new_method", *reversed(paper)]
        assert method_order(methods) == [*paper, "a_new_method", "zz_unregistered"]
        trials = _trials([dict(method=m, best_eval_accuracy=0.5) for m in methods])
        assert [row[0] for row in results_table(select_configs(prepare(trials))).rows] == method_order(methods)
        # its own colour and marker, none of the paper's six
        assert method_color("a_new_method") not in {method_color(m) for m in paper}
        assert method_marker("a_new_method") not in {method_marker(m) for m in paper}
    finally:
        METHODS.pop("a_new_method")


def test_every_registered_method_has_a_colour_and_a_marker_of_its_own():
    from raysdpb.methods import METHODS
    from raysdpb.report.figures import method_color, method_marker

    assert len({method_color(m) for m in METHODS}) == len(METHODS)
    assert len({method_marker(m) for m in METHODS}) == len(METHODS)


def test_paired_t_test_by_seed_at_the_selected_configurations():
    ft = [0.60, 0.62, 0.58, 0.61]
    diffs = [0.02, 0.04, 0.03, 0.05]
    trials = _trials(
        _seeds("finetune", ft)
        # dynsdpb's rows in another seed order, and a seed finetune does not have (not paired)
        + [dict(method="dynsdpb", seed=s, best_eval_accuracy=ft[s] + diffs[s]) for s in (3, 1, 0, 2)]
        + [dict(method="dynsdpb", seed=9, best_eval_accuracy=0.0)]
        + _seeds("dynsdpb", [0.1, 0.1, 0.1, 0.1], alpha=0.5)    # a worse configuration: not the one compared
        + _seeds("double_finetune", [0.61, 0.60]))
    comparisons = paired_comparisons(select_configs(prepare(trials)))
    row = comparisons[(comparisons.method == "dynsdpb") & (comparisons.baseline == "finetune")].iloc[0]
    assert row.shared == 4 and row.seeds == [0, 1, 2, 3]
    assert row.mean_diff == pytest.approx(0.035)
    # by hand: mean 0.035, sample sd 0.0129099, t = 0.035 / (sd / 2) = 5.4222 with 3 degrees of freedom
    t = 0.035 / (np.std(diffs, ddof=1) / 2)
    assert t == pytest.approx(5.42218, rel=1e-4)
    assert row.p == pytest.approx(2 * stats.t.sf(t, df=3), rel=1e-9)
    assert row.p == pytest.approx(stats.ttest_rel([ft[s] + diffs[s] for s in range(4)], ft).pvalue, rel=1e-9)
    assert (row.wins, row.ties, row.losses) == (4, 0, 0)
    # fewer than 3 shared seeds: a mean difference, no p-value
    short = comparisons[(comparisons.method == "dynsdpb") & (comparisons.baseline == "double_finetune")].iloc[0]
    assert short.shared == 2 and math.isnan(short.p) and "3 shared seeds" in short.why
    assert short.mean_diff == pytest.approx(np.mean([0.62 - 0.61, 0.66 - 0.60]))
    # the two baselines against each other once
    assert list(zip(comparisons.method, comparisons.baseline)) == [
        ("double_finetune", "finetune"), ("dynsdpb", "finetune"), ("dynsdpb", "double_finetune")]
    # one comparison of the column has a p-value: a family of one, nothing to adjust; NaNs stay NaN
    assert row.p_holm == row.p and math.isnan(short.p_holm)


def _holm_rejects(p: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as written: test the sorted p-values in turn against alpha / (m - j), stopping at the
    first that fails; everything before it is rejected."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = [False] * len(p)
    for j, i in enumerate(order):
        if p[i] > alpha / (len(p) - j):
            break
        rejected[i] = True
    return rejected


def test_holm_adjusted_p_values_reject_what_holms_procedure_rejects():
    from raysdpb.report.tables import holm_adjusted

    # a textbook case: sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x (0.06), 1x (0.04, raised to 0.06)
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.5, float("nan"), 0.4]).tolist()[0] == 0.8 and math.isnan(holm_adjusted([float("nan")])[0])
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 9))
        p = rng.beta(0.5, 1.0, size=m).round(int(rng.integers(1, 4))).tolist()  # rounding: ties
        adjusted = holm_adjusted(p)
        assert np.all(adjusted >= np.asarray(p) - 1e-15) and np.all(adjusted <= 1.0)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.2):
            assert (adjusted <= alpha).tolist() == _holm_rejects(p, alpha), (p, alpha)


def test_the_holm_family_is_a_column():
    ft = [0.60, 0.62, 0.58]
    trials = _trials(_seeds("finetune", ft) + _seeds("dynsdpb", [0.63, 0.66, 0.60])
                     + _seeds("random_dlb", [0.61, 0.65, 0.58])
                     + _seeds("finetune", ft, task="glue/rte") + _seeds("dynsdpb", [0.70, 0.61, 0.59], task="glue/rte"))
    comparisons = paired_comparisons(select_configs(prepare(trials)))
    cb = comparisons[comparisons.column.str.contains("cb")]
    rte = comparisons[comparisons.column.str.contains("rte")]
    assert len(cb) == 2 and len(rte) == 1
    assert sorted(cb.p_holm) == pytest.approx(sorted([2 * min(cb.p), max(2 * min(cb.p), max(cb.p))]))
    assert rte.p_holm.iloc[0] == rte.p.iloc[0]


def test_cost_table_hours_epochs_and_gpus_when_the_columns_say():
    trials = _trials([dict(method="finetune", wall_time_s=1800.0, seed=0),
                      dict(method="finetune", wall_time_s=900.0, seed=1, status="stopped_by_asha", epochs_run=1.0),
                      dict(method="double_finetune", wall_time_s=3600.0, planned_epochs=4.0, epochs_run=4.0,
                           last_world_size=2)])
    not_yet = _trials([dict(method="dynsdpb", status="pending", wall_time_s=0.0, epochs_run=0.0)])
    table, notes = cost_table(prepare(pd.concat([trials, not_yet], ignore_index=True)))
    # a trial that has not run: counted, but neither "saved by ASHA" nor in the mean time per trial
    assert table.rows[2] == ["dynsdpb", "1", "0", "0", "pending 1", "0", "2", "0%", "0.000", "—", "0.000"]
    assert table.rows[3][:8] == ["total", "4", "2", "1", "1", "7", "10", "10%"]
    table, notes = cost_table(prepare(trials))
    assert table.columns == ["method", "trials", "completed", "stopped by ASHA", "other", "epochs run",
                             "epochs planned", "saved by ASHA", "trial-hours", "mean min/trial", "worker-hours"]
    assert table.rows[0] == ["finetune", "2", "1", "1", "0", "3", "4", "25%", "0.750", "22.50", "0.750"]
    assert table.rows[1] == ["double_finetune", "1", "1", "0", "0", "4", "4", "0%", "1.000", "60.00", "2.000"]
    assert table.rows[2][0] == "total" and table.rows[2][8] == "1.750" and table.rows[2][10] == "2.750"
    assert any("No GPU-hours" in n for n in notes)

    gpus = trials.assign(gpus_per_worker=0.5, use_gpu=[True, True, False])
    table, notes = cost_table(prepare(gpus))
    assert table.columns[-1] == "GPU-hours"
    assert [r[-1] for r in table.rows] == ["0.375", "0.000", "0.375"]  # 0.5 GPU x 1 worker x 0.75 h; no GPU
    assert any("gpus_per_worker × last_world_size (where use_gpu)" in n for n in notes)

    # throughput: the median of each method's trials that report it; MFU only where some trial had a peak
    rated = trials.assign(tokens_per_s=[1000.0, 3000.0, None], mfu=[None, None, None])
    table, notes = cost_table(prepare(rated))
    assert table.columns[-1] == "median tokens/s" and [r[-1] for r in table.rows] == ["2000", "—", "2000"]
    assert any("No MFU" in n for n in notes)
    table, notes = cost_table(prepare(rated.assign(mfu=[0.02, 0.04, 0.5])))
    assert table.columns[-2:] == ["median tokens/s", "median MFU"]
    assert [r[-1] for r in table.rows] == ["3.0%", "50.0%", "4.0%"]
    assert not any("No MFU" in n for n in notes)


def _kd_rows(tables_of_passes: list[int | None]) -> list[dict]:
    """kd trials' rows as the recorder writes them (`summarize_trial`) from reports with the recipe's keys: the
    first trial ran the teacher (`teacher_forward_passes` 250), the second read the cache (0); both distil from
    the same 250-example table (`teacher_table_passes`; None: a report from before that key)."""
    from raysdpb.results.recorder import TrialInfo, summarize_trial

    rows = []
    for s, (value, ran, table) in enumerate(zip([0.8, 0.9], [250, 0], tables_of_passes)):
        config = dict(task="superglue/cb", model="tiny-bert", method="kd", lr=1e-4, alpha=1.0, tau=2.0, seed=s,
                      epochs=2, batch_size=8)
        report = {"epoch": 2.0, "step": 100 + 10 * s, "eval_accuracy": value, "teacher_forward_passes": ran,
                  "elapsed_s": 60.0 * (s + 1)}
        if table is not None:
            report["teacher_table_passes"] = table
        row = summarize_trial(TrialInfo(f"kd-{s:08x}", f"seed={s}", config, 2.0), [report], status="completed")
        rows.append({**row, "last_world_size": 1, "wall_time_s": 60.0 * (s + 1)})
    return rows


def test_packed_events_are_whole_deterministic_merged_and_read_as_the_folder(tmp_path):
    """`pack_tensorboard` replaces tensorboard/ by one archive holding every file (by trial), the same bytes for the
    same events; packing again after more trials were copied in keeps the earlier ones; `tensorboard_dir` unpacks a
    trial's events into the cache (none for an unknown trial or without a cache)."""
    from raysdpb.report.load import EVENTS_ARCHIVE, pack_tensorboard, tensorboard_dir, unpack_trial_events

    def events(folder, trials):
        for t, payload in trials.items():
            (folder / "tensorboard" / t).mkdir(parents=True, exist_ok=True)
            (folder / "tensorboard" / t / "events.out.tfevents.1").write_bytes(payload)

    a, b = tmp_path / "a", tmp_path / "b"
    events(a, {"t1": b"one" * 100, "t2": b"two"})
    events(b, {"t2": b"two", "t1": b"one" * 100})
    assert pack_tensorboard(a) == a / EVENTS_ARCHIVE and not (a / "tensorboard").exists()
    pack_tensorboard(b)
    assert (a / EVENTS_ARCHIVE).read_bytes() == (b / EVENTS_ARCHIVE).read_bytes()  # no times, no owners
    events(a, {"t3": b"three"})  # a later copy adds a trial: packed again, all three kept
    pack_tensorboard(a)
    for t, payload in {"t1": b"one" * 100, "t2": b"two", "t3": b"three"}.items():
        assert unpack_trial_events(a / EVENTS_ARCHIVE, t, tmp_path / "out" / t)
        assert (tmp_path / "out" / t / "events.out.tfevents.1").read_bytes() == payload
    assert not unpack_trial_events(a / EVENTS_ARCHIVE, "t9", tmp_path / "out" / "t9")
    assert tensorboard_dir(str(a), "t2", None) is None
    found = tensorboard_dir(str(a), "t2", tmp_path / "cache")
    assert found == tmp_path / "cache" / "t2" and (found / "events.out.tfevents.1").read_bytes() == b"two"
    assert tensorboard_dir(str(a), "t9", tmp_path / "cache") is None
    assert pack_tensorboard(tmp_path / "nothing") is None


def test_at_last_a_trial_asha_stopped_has_no_score_and_is_counted(tmp_path):
    """Under `--at last` a score is the one at the end of the budget: a trial ASHA stopped after its first rung
    (last report 0.90, higher than any finished one's) cannot be chosen, and the overview says so; under the
    default (best report) the same trial is a finished trial like any other."""
    rows = [dict(method="random_dlb", lr=lr, seed=0, best_eval_accuracy=best, last_eval_accuracy=last,
                 status=status, epochs_run=run)
            for lr, best, last, status, run in ((1e-4, 0.90, 0.90, "stopped_by_asha", 1.0),
                                                (5e-5, 0.85, 0.80, "completed", 3.0),
                                                (2e-5, 0.82, 0.82, "completed", 3.0))]
    trials = _trials(rows)
    last = select_configs(prepare(trials, at="last")).set_index("method")
    assert last.loc["random_dlb", "label"] == "lr=2e-05" and last.loc["random_dlb", "mean"] == pytest.approx(0.82)
    assert last.loc["random_dlb", "n_trials"] == 2 and prepare(trials, at="last")["_cut_short"].tolist() == [
        True, False, False]
    best = select_configs(prepare(trials)).set_index("method")
    assert best.loc["random_dlb", "label"] == "lr=0.0001" and not prepare(trials)["_cut_short"].any()
    written = build_report([str(_write(tmp_path / "grid", trials))], tmp_path / "out", at="last")
    text = written["markdown"].read_text()
    assert "1 trial(s) stopped by ASHA have no score at their last report" in text
    assert "never reported their metric" not in text


def test_compute_costs_steps_passes_teacher_and_wall_time(monkeypatch):
    """Forward passes are steps x batch x ranks x the method's passes per example (its `forward_passes`, 1
    where the registry does not say); a teacher method's table passes are added to every trial that distils from
    the table, whichever computed it; means per trial over the selected configuration's seeds only."""
    from types import SimpleNamespace

    monkeypatch.setitem(tables.METHODS, "r_drop", SimpleNamespace(forward_passes=2))
    common = (_seeds("finetune", [0.60, 0.70], steps=100, batch_size=8, wall_time_s=120.0)
              + _seeds("finetune", [0.10, 0.10], lr=3e-5, steps=999, batch_size=8)              # not selected
              + _seeds("r_drop", [0.72, 0.74], steps=100, batch_size=8, last_world_size=2, wall_time_s=300.0))
    trials = _trials(common + _kd_rows([250, 250]))
    assert "last_teacher_table_passes" in trials  # the recorder's name for the recipe's key
    costs = compute_costs(prepare(trials), select_configs(prepare(trials))).set_index("method")
    assert costs.loc["finetune", ["steps", "forward_passes", "teacher_passes", "wall_s", "n"]].tolist() == [
        100, 800, 0, 120, 2]
    assert costs.loc["r_drop", "forward_passes"] == 100 * 8 * 2 * 2 and costs.loc["r_drop", "wall_s"] == 300
    # kd: steps 100 and 110, passes 800 and 880, and the table's 250 teacher passes each (the cache shares
    # the computation; each trial distils from all of it), whether the trial ran the teacher (250) or not (0)
    assert costs.loc["kd", ["steps", "forward_passes", "teacher_passes", "total_passes", "wall_s"]].tolist() == [
        105, 840, 250, 1090, 90]
    assert costs.loc["kd", "mean"] == pytest.approx(0.85) and not costs.loc["kd", "teacher_estimated"]
    table = compute_table(costs.reset_index(), 100.0)
    rows = {r[1]: r for r in table.rows}
    assert rows["finetune"][2:] == ["65.00 ± 7.07", "100", "800", "0", "1.00x", "2.0"]
    assert rows["r_drop"][6] == "4.00x" and rows["kd"][5:7] == ["250", f"{1090 / 800:.2f}x"]
    # kd rows from before the table key: one epoch's examples, estimated (steps x batch / epochs run: 400, 440)
    old = compute_costs(prepare(_trials(common + _kd_rows([None, None]))),
                        select_configs(prepare(_trials(common + _kd_rows([None, None]))))).set_index("method")
    assert old.loc["kd", "teacher_passes"] == 420 and old.loc["kd", "teacher_estimated"]
    assert {r[1]: r for r in compute_table(old.reset_index(), 100.0).rows}["kd"][5] == "~420"
    # no steps or batch column (an old sweep): no numbers, not a crash
    bare = compute_costs(prepare(trials.drop(columns=["steps", "batch_size"])),
                         select_configs(prepare(trials)))
    assert (bare["steps"] == 0).all() and bare["forward_passes"].isna().all()


def test_compute_figure_spreads_equal_compute_sideways_and_picks_its_unit():
    """Markers within `width` of one another spread evenly over `width` per neighbour, centred on their common x;
    a lone marker keeps its place; over many random layouts no two markers end closer than the band allows where
    they started together. The axis counts thousands of examples below a million, else millions."""
    from raysdpb.report.figures import _dodge, _passes_unit

    xs = np.array([2.4, 4.792, 3.2, 4.8, 2.4, 4.8])
    off = _dodge(xs, 0.1)
    np.testing.assert_allclose(off[[0, 4]], [-0.05, 0.05])          # finetune and ps_kd at 2.4
    np.testing.assert_allclose(off[2], 0.0)                          # kd alone
    np.testing.assert_allclose(sorted(off[[1, 3, 5]]), [-0.1, 0.0, 0.1])  # three within 0.008 of each other
    rng = np.random.default_rng(0)
    for _ in range(200):
        xs = rng.choice([1.0, 1.33, 2.0], size=rng.integers(1, 12)) + rng.uniform(0, 0.005, size=1)
        moved = xs + _dodge(xs, 0.05)
        for x in np.unique(xs):
            here = np.sort(moved[xs == x])
            assert here.mean() == pytest.approx(x)                   # centred on the shared compute
            assert np.all(np.diff(here) == pytest.approx(0.05)) if len(here) > 1 else here[0] == pytest.approx(x)
    assert _passes_unit(4800.0) == (1e3, "thousands") and _passes_unit(2.5e6) == (1e6, "millions")


def test_alpha_tau_grid_means_over_seeds_and_other_keys():
    rows = []
    for alpha in (0.5, 1.0):
        for tau in (1.0, 2.0, 4.0):
            for lr in (1e-4, 3e-4):
                rows += _seeds("random_dlb", [alpha + tau / 10 + lr * 1000, alpha + tau / 10 - lr * 1000],
                               alpha=alpha, tau=tau, lr=lr)
    trials = _trials(rows + _seeds("finetune", [0.5, 0.6]))
    grids, missing = alpha_tau_grid(prepare(trials))
    assert missing == ["finetune on superglue/cb"]
    (grid,) = grids
    assert (grid.method, grid.alpha, grid.tau) == ("random_dlb", [0.5, 1.0], [1.0, 2.0, 4.0])
    expected = np.array([[a + t / 10 for a in (0.5, 1.0)] for t in (1.0, 2.0, 4.0)])
    np.testing.assert_allclose(grid.mean, expected)
    assert (grid.n == 4).all() and grid.seeds == [0, 1] and grid.others == {"lr": [0.0001, 0.0003]}


def test_report_draws_the_grid_and_curves_of_hand_made_trials(tmp_path):
    rows = [dict(method="dynsdpb", alpha=a, tau=t, lr=lr, seed=s, best_eval_accuracy=0.5 + a / 10 + t / 100 + s / 1000)
            for a in (0.5, 1.0, 2.0) for t in (1.0, 4.0) for lr in (1e-4, 3e-4) for s in (0, 1)]
    trials = _trials(rows + _seeds("finetune", [0.55, 0.56]))
    curves = pd.DataFrame([dict(trial_id=tid, step=4 * e, epoch=float(e), train_loss=1.0 / e, eval_accuracy=acc)
                           for tid, acc in zip(trials.trial_id, trials.best_eval_accuracy) for e in (1, 2)])
    written = build_report([str(_write(tmp_path / "grid", trials, curves))])
    assert sorted(p.name for p in written["figures"]) == ["compute_superglue-cb.png", "curves_superglue-cb.png",
                                                          "heatmap_superglue-cb.png"]
    md = written["markdown"].read_text()
    assert "mean over seeds {0, 1} and over lr ∈ {0.0001, 0.0003}" in md
    assert "No grid (one alpha and one tau) for: finetune on superglue/cb." in md
    assert "No alpha_i / tau_i traces" in md and "Left out: no gradient norms." in md
    # the best configuration: alpha 2, tau 4, either lr (equal means: the first in grid order)
    assert "| superglue/cb | dynsdpb | lr=0.0001, alpha=2, tau=4 | 0, 1 | 12 |" in md


# --- missing pieces: a sentence, never a crash -----------------------------------------------------------

def test_one_seed_one_method_no_grid_no_grad_norms(tmp_path):
    exp = _write(tmp_path / "one", _trials([dict(method="dynsdpb", best_eval_accuracy=0.5)]))
    written = build_report([str(exp)])
    md = written["markdown"].read_text()
    assert written["markdown"] == exp / "report" / "report.md" and written["figures"] == []
    assert "| dynsdpb | **50.00 (n=1/1)** |" in md
    assert "One seed per configuration: no ± std" in md
    assert "Left out: one method only (dynsdpb), nothing to compare it with." in md
    assert "no alpha × tau grid to draw" in md
    assert "Left out: curves.parquet is missing or empty." in md
    assert "Left out: no gradient norms." in md
    assert "<table>" in written["html"].read_text()


def test_no_baseline_no_shared_seeds_and_nothing_finished(tmp_path):
    exp = _write(tmp_path / "a", _trials(_seeds("random_dlb", [0.5, 0.6]) + _seeds("dynsdpb", [0.7, 0.8])))
    assert "no finetune or double_finetune trials" in build_report([str(exp)])["markdown"].read_text()

    exp = _write(tmp_path / "b", _trials([dict(method="finetune", seed=0, best_eval_accuracy=0.5),
                                          dict(method="dynsdpb", seed=1, best_eval_accuracy=0.6)]))
    assert "at most one seed is shared" in build_report([str(exp)])["markdown"].read_text()

    exp = _write(tmp_path / "c", _trials([dict(method="finetune", status="pending"),
                                          dict(method="dynsdpb", status="running", best_eval_accuracy=0.3)]))
    md = build_report([str(exp)], tmp_path / "out")["markdown"].read_text()
    assert "No finished trial has a validation score yet" in md
    assert "2 trial(s) not finished (pending, running)" in md
    assert "| total | 2 | 0 | 0 | 2 |" in md  # the cost table still counts them


def test_several_experiments_one_table(tmp_path):
    a = _write(tmp_path / "a", _trials(_seeds("finetune", [0.5, 0.7]) + _seeds("dynsdpb", [0.6, 0.8])))
    b = _write(tmp_path / "b", _trials(_seeds("finetune", [0.9, 0.7]), task="superglue/rte")
               .assign(trial_id=lambda d: d.trial_id + "-rte"))
    # the same trial id again in a second folder counts once
    c = _write(tmp_path / "c", _trials(_seeds("finetune", [0.5])))
    written = build_report([str(a), str(b), str(c)], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "| method | superglue/cb (eval_accuracy) | superglue/rte (eval_accuracy) |" in md
    assert "| finetune | 60.00 ± 14.14 (n=2/2) | **80.00 ± 14.14 (n=2/2)** |" in md
    assert "| dynsdpb | **70.00 ± 14.14 (n=2/2)** | — |" in md
    assert "1 trial(s) of" in md and "counted once" in md


def test_a_folder_without_trials_parquet_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "results" / "sweep1").mkdir(parents=True)
    _write(tmp_path / "results" / "sweep2", _trials([dict(method="finetune", best_eval_accuracy=0.5)]))
    assert run_cli(main, [str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysdpb: error:") and len(err.splitlines()) == 1
    assert "no trials.parquet here" in err and "sweep2" in err
    assert run_cli(main, [str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(UserError):
        build_report([str(tmp_path / "results" / "sweep1")])


# --- a real sweep ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_sweep(faulty_sweep, tmp_path_factory):
    """The shared real sweep of conftest.py (finetune and dynsdpb, two seeds each, on 32 CB examples with
    tiny-bert; one dynsdpb trial diverged, another lost its worker and resumed), copied, since the report
    writes into the experiment folder."""
    copy = tmp_path_factory.mktemp("report-sweep") / faulty_sweep.experiment.name
    shutil.copytree(faulty_sweep.experiment, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_report(tiny_sweep):
    out = subprocess.run([sys.executable, "-m", "raysdpb.report", str(tiny_sweep)], env=sweep_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith(f"report: {tiny_sweep / 'report' / 'report.md'}")
    return tiny_sweep / "report"


def _all_cells(md: str, first: str) -> list[list[str]]:
    """The cells of every table row of `md` whose first cell is `first`, in order."""
    return [[c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith(f"| {first} |")]


def _cells(md: str, first: str) -> list[str]:
    return _all_cells(md, first)[0]


def test_report_of_a_real_sweep_matches_its_parquet(tiny_sweep, tiny_report):
    trials = pd.read_parquet(tiny_sweep / "trials.parquet")
    status = trials.set_index(["method", "seed"])["status"]
    assert len(trials) == 4 and status["dynsdpb", 0] == "diverged"  # a finished trial: it counts, with its score
    assert [status[key] for key in (("finetune", 0), ("finetune", 1), ("dynsdpb", 1))] == ["completed"] * 3
    md = (tiny_report / "report.md").read_text()

    # the results table, computed here straight from trials.parquet
    for method, group in trials.groupby("method"):
        values = group["best_eval_accuracy"].to_numpy()
        expected = f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f} (n=2/2)"
        assert _cells(md, method)[1] == expected
    # the cost table
    for method, group in trials.groupby("method"):
        (cells,) = [row for row in _all_cells(md, method) if len(row) >= 11]  # the cost table's row
        completed = int((group.status == "completed").sum())
        other = "diverged 1" if method == "dynsdpb" else "0"
        assert cells[1:8] == ["2", str(completed), "0", other, f"{group.epochs_run.sum():g}", "4", "0%"]
        assert cells[8] == f"{group.wall_time_s.sum() / 3600:.3f}"
    # paired: two seeds, a mean difference but no p-value
    line = next(x for x in md.splitlines() if x.startswith("| superglue/cb | dynsdpb | finetune |"))
    acc = trials.set_index(["method", "seed"])["best_eval_accuracy"]
    diff = np.mean([acc["dynsdpb", s] - acc["finetune", s] for s in (0, 1)])
    assert f"| 2 | {100 * diff:+.2f} |" in line and "n/a (needs ≥3 shared seeds)" in line
    # no alpha/tau grid in this sweep: said, not drawn
    assert "no alpha × tau grid to draw" in md

    # the figures: curves, DynSDPB's alpha/tau, gradient norms from the loop's TensorBoard events
    names = sorted(p.name for p in tiny_report.glob("*.png"))
    assert names == ["compute_superglue-cb.png", "curves_superglue-cb.png", "dynamics_superglue-cb.png",
                     "grad_norms_superglue-cb.png"]
    for name in names:
        data = (tiny_report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({name})" in md
    assert "finetune next to dynsdpb" in md and "from TensorBoard (`dynamic/alpha_mean`" in md
    html = (tiny_report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4 and 'src="curves' not in html
    # the compute table: steps and forward passes (steps x batch x 1 rank x 1 pass) per trial, from the Parquet
    for method, group in trials.groupby("method"):
        cells = next(row for row in _all_cells(md, "superglue/cb") if row[1] == method and len(row) == 8)
        assert cells[3] == f"{group.steps.mean():,.0f}"
        assert cells[4] == f"{(group.steps * group.batch_size).mean():,.0f}" and cells[5] == "0"


# --- the HTML in a browser ---------------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium():
    found = _chromium()
    if found is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        # scripts/setup.sh installs it; a machine set up otherwise gets it here
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                       capture_output=True, timeout=900)
        found = _chromium()
    if found is None:
        pytest.skip("headless Chromium is not installed and could not be installed (apt-get install chromium)")
    return found


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(tiny_report, chromium, tmp_path):
    # a copy of the page that writes, once loaded, how many of its images the browser decoded
    page = (tiny_report / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
             "document.body.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0).length); "
             "document.body.setAttribute('data-images', imgs.length); });</script>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    out = _headless(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri())
    dom = out.stdout
    assert out.returncode == 0 and "<table>" in dom, out.stderr[-2000:]
    assert re.search(r'data-decoded="4"', dom) and re.search(r'data-images="4"', dom), dom[:500]
    assert "<strong>" in dom and "superglue/cb (eval_accuracy)" in dom  # the results table, best in bold
    assert dom.count("<figure>") == 4

    shot = tmp_path / "page.png"
    out = _headless(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400",
                    (tiny_report / "report.html").as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, out.stderr[-2000:]


def test_runs_pair_by_seed_and_data_seed_where_they_differ():
    """A trial's data order may be seeded apart from its initialisation (`data_seed`): runs pair only where both
    seeds agree; where every data_seed is its seed (or unset), pairing is by seed as before."""
    same = _trials([dict(method=m, seed=s, data_seed=s, best_eval_accuracy=v)
                    for m, values in (("finetune", [0.6, 0.7, 0.65]), ("dynsdpb", [0.7, 0.8, 0.7]))
                    for s, v in enumerate(values)])
    cell = {r.method: r for r in select_configs(prepare(same)).itertuples()}
    assert cell["dynsdpb"].seeds == {0: 0.7, 1: 0.8, 2: 0.7}
    apart = _trials([dict(method="finetune", seed=s, data_seed=s, best_eval_accuracy=0.6 + s / 10) for s in range(3)]
                    + [dict(method="dynsdpb", seed=s, data_seed=d, best_eval_accuracy=0.7)
                       for s, d in ((0, 5), (1, 1), (2, 2))])
    comparisons = paired_comparisons(select_configs(prepare(apart)))
    row = comparisons[(comparisons.method == "dynsdpb") & (comparisons.baseline == "finetune")].iloc[0]
    assert row.shared == 2 and row.seeds == ["1/1", "2/2"]
    assert row.mean_diff == pytest.approx(((0.7 - 0.7) + (0.7 - 0.8)) / 2)


def test_validation_scores_trials_selected_on_a_dev_split_by_their_final_scores(tmp_path):
    """Protocol v2's stage-2 sweeps of CB (real, archived): by default the report scores them on the held-out dev
    split, as their sweep selected; `validation=True` on the validation split, and its means over the seeds equal
    the ones protocol v2's own statistics computed from the same runs (`quality-v2-cb.json`)."""
    import json

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    paths = [str(results / "quality-v2" / f"qv2-seeds-superglue-cb-{m}") for m in ("finetune", "kd", "ps_kd")]
    harness = json.loads((results / "quality-v2-cb.json").read_text())["v2_runs"]["superglue/cb"]
    final = build_report(paths, tmp_path / "final", at="last", validation=True)
    means = final["selection"].set_index("method")["mean"]
    for method in ("finetune", "kd", "ps_kd"):
        assert means[method] == pytest.approx(np.mean([r["last"] for r in harness[method]]))
    text = final["markdown"].read_text()
    assert "Each trial's score is its validation `eval_accuracy`" in text
    selected = build_report(paths, tmp_path / "dev", at="last")
    assert "Each trial's score is its held-out dev split's `eval_dev_accuracy`" in selected["markdown"].read_text()
    assert not np.allclose(selected["selection"].set_index("method")["mean"][list(means.index)], means)
    with pytest.raises(UserError, match="--metric eval_accuracy and --validation: give one"):
        build_report(paths, tmp_path / "both", metric="eval_accuracy", validation=True)
