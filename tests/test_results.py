"""The Parquet results of a sweep, without Ray: the schema's rules, rows from reports, statuses, atomic files,
resume."""

from __future__ import annotations

import math
import os
import time

import pyarrow.parquet as pq
import pytest

import raysdpb.results
from raysdpb.results.recorder import ResultsRecorder, TrialInfo, curve_row, format_table, summarize_trial, to_table
from raysdpb.results.schema import best_per_method, eval_metric_keys, main_metric, metric_direction
from raysdpb.results.storage import read_json, read_rows, write_table
from raysdpb.tasks import get_task


def _report(epoch, acc, loss, **extra):
    return {"epoch": float(epoch), "step": int(epoch * 4), "eval_accuracy": acc, "eval_macro_f1": acc / 2,
            "train_loss": loss, "lr": 1e-4, "samples_seen": int(epoch * 32), "training_iteration": int(epoch),
            "time_this_iter_s": 2.0, "time_total_s": 2.0 * epoch, "elapsed_s": 2.0 * epoch, "timestamp": 1000 + epoch,
            "config": {"point": {"x": 1}}, "hostname": "h", "pid": 1, "done": False, "trial_id": "tune_0001", **extra}


def _infos():
    def config(method, lr):
        return {"method": method, "lr": lr, "lora.r": None}

    return [TrialInfo("finetune-aaaa0001", "method=finetune", config("finetune", 1e-4), 3),
            TrialInfo("dynsdpb-bbbb0002", "method=dynsdpb", config("dynsdpb", 1e-4), 3),
            TrialInfo("dynsdpb-cccc0003", "method=dynsdpb,lr=0.5", config("dynsdpb", 0.5), 3),
            TrialInfo("finetune-dddd0004", "method=finetune,lr=0.9", config("finetune", 0.9), 3),
            TrialInfo("finetune-eeee0005", "method=finetune,seed=1", config("finetune", 1e-4), 3)]


def test_curve_row_drops_tune_bookkeeping():
    row = curve_row("t1", _report(1, 0.5, 1.0, checkpoint_path="/x/checkpoint_1"))
    assert row["trial_id"] == "t1" and row["eval_accuracy"] == 0.5 and row["checkpoint_path"] == "/x/checkpoint_1"
    assert not {"config", "hostname", "pid", "done"} & set(row)


def test_metric_direction():
    assert metric_direction("eval_accuracy") == "max"
    assert metric_direction("train_loss") == "min" and metric_direction("train_ce") == "min"
    assert metric_direction("lr") is None and metric_direction("alpha_mean") is None
    assert metric_direction("train_loss", main_metric="train_loss", main_mode="max") == "max"


def test_main_metric_of_registered_tasks():
    # MNLI: the matched split has no prefix, the mismatched one `mm_`
    assert main_metric(get_task("glue/mnli")) == "eval_accuracy"
    # (and a classifier's mean cross-entropy of the labels after each split's metrics)
    assert eval_metric_keys(get_task("glue/mnli")) == ["eval_accuracy", "eval_loss", "eval_mm_accuracy", "eval_mm_loss"]
    assert main_metric(get_task("superglue/cb")) == "eval_accuracy"
    assert eval_metric_keys(get_task("superglue/cb")) == ["eval_accuracy", "eval_macro_f1", "eval_loss"]
    assert main_metric(get_task("glue/cola")) == "eval_matthews"
    # one evaluation split asked for: evaluated without a prefix
    assert main_metric(get_task("glue/mnli"), "validation_mismatched") == "eval_accuracy"
    assert eval_metric_keys(get_task("glue/mnli"), "validation_mismatched") == ["eval_accuracy", "eval_loss"]
    # a generation task reports no loss (greedy decoding scores no label)
    assert eval_metric_keys(get_task("nlg/gsm8k")) == ["eval_exact_match"]
    assert main_metric(get_task("glue/cola"), "validation") == "eval_matthews"


def test_the_package_keeps_every_name_of_the_old_module():
    old = ["STATUSES", "TERMINAL", "FINISHED", "curve_row", "metric_direction", "summarize_trial", "to_table",
           "write_table", "read_rows", "best_per_method", "format_table", "ResultsRecorder", "TrialInfo",
           "filesystem", "join", "read_json", "write_json", "remove_stale_temporaries", "finished_marker_path",
           "write_finished_marker", "read_finished_marker"]
    assert set(old) <= set(raysdpb.results.__all__)
    assert all(hasattr(raysdpb.results, name) for name in raysdpb.results.__all__)


def test_summarize_trial_best_and_last():
    info = _infos()[0]
    curves = [curve_row(info.trial_id, _report(e, a, l)) for e, a, l in ((1, 0.5, 1.0), (2, 0.8, 0.7), (3, 0.6, 0.4))]
    row = summarize_trial(info, curves, status="completed", main_metric="eval_accuracy", attempts=1)
    assert row["method"] == "finetune" and row["lr"] == 1e-4 and row["trial_id"] == info.trial_id
    assert row["best_eval_accuracy"] == 0.8 and row["last_eval_accuracy"] == 0.6 and row["best_epoch"] == 2.0
    assert row["best_train_loss"] == 0.4 and row["last_train_loss"] == 0.4
    assert row["last_lr"] == 1e-4 and "best_lr" not in row
    assert row["epochs_run"] == 3.0 and row["steps"] == 12 and row["reports"] == 3
    assert row["wall_time_s"] == pytest.approx(6.0)
    # samples seen: the last report's, a column of its own (not a metric with best_/last_)
    assert row["samples_seen"] == 96 and "last_samples_seen" not in row and "best_samples_seen" not in row


def test_each_trial_row_names_its_own_main_metric(tmp_path):
    """`main_metric`: the trial's own task's main metric (what the report scores it by), null when not given;
    the sweep's metric (`score` on a grid of tasks with different ones) picks best_epoch."""
    cola = TrialInfo("finetune-cola0001", "task=glue/cola", {"method": "finetune", "task": "glue/cola"}, 3,
                     main_metric="eval_matthews")
    curves = [curve_row(cola.trial_id, {**_report(e, 0.5, 1.0), "eval_matthews": m, "score": m})
              for e, m in ((1, 0.2), (2, 0.4), (3, 0.3))]
    row = summarize_trial(cola, curves, status="completed", main_metric="score")
    assert row["main_metric"] == "eval_matthews" and row["best_eval_matthews"] == 0.4 and row["best_epoch"] == 2.0
    assert summarize_trial(_infos()[0], [], status="pending")["main_metric"] is None

    rec = ResultsRecorder(str(tmp_path / "exp"), [cola, _infos()[0]], metric="score", flush_every_s=0)
    rec.write()
    assert [r["main_metric"] for r in read_rows(rec.trials_path)] == ["eval_matthews", None]


def test_wall_time_is_the_trial_clock_across_a_resume():
    """Tune's time_this_iter_s restarts with each attempt (a resumed trial's first report once said 2 s for
    a 17-minute epoch); the engine's elapsed_s, carried in its checkpoints, is the trial's time."""
    info = _infos()[0]
    # epoch 1 took 100 s; killed, resumed from the epoch-1 checkpoint; epochs 2 and 3 took 90 s each
    reports = [_report(1, 0.5, 1.0, time_this_iter_s=100.0, elapsed_s=100.0),
               _report(2, 0.6, 0.8, time_this_iter_s=2.0, elapsed_s=195.0),
               _report(3, 0.7, 0.6, time_this_iter_s=90.0, elapsed_s=285.0)]
    # in any order: the last report is the one of the last step
    curves = [curve_row(info.trial_id, r) for r in (reports[2], reports[0], reports[1])]
    row = summarize_trial(info, curves, status="completed", main_metric="eval_accuracy", attempts=2)
    assert row["wall_time_s"] == pytest.approx(285.0)
    assert not any(k.endswith("elapsed_s") for k in row if k != "wall_time_s")  # not a metric column
    assert summarize_trial(info, [], status="pending")["wall_time_s"] == 0.0


def test_to_table_handles_missing_and_mixed_columns():
    table = to_table([{"a": 1, "b": "x"}, {"a": 2.5, "c": [1, 2]}, {"a": None, "b": 3}], first=("c",))
    assert table.column_names == ["c", "a", "b"]
    assert table.column("a").to_pylist() == [1.0, 2.5, None]
    assert table.column("b").to_pylist() == ["x", None, "3"]  # a string and a number: strings
    assert to_table([]).num_rows == 0


def test_write_table_is_atomic_and_replaces(tmp_path):
    path = str(tmp_path / "exp" / "t.parquet")
    write_table(to_table([{"a": 1}]), path)
    write_table(to_table([{"a": 1}, {"a": 2}]), path)
    assert pq.read_table(path).column("a").to_pylist() == [1, 2]
    assert os.listdir(tmp_path / "exp") == ["t.parquet"]  # no temporary file left
    assert read_rows(str(tmp_path / "missing.parquet")) == []


def test_recorder_statuses_and_files(tmp_path):
    exp = str(tmp_path / "exp")
    rec = ResultsRecorder(exp, _infos(), metric="eval_accuracy", mode="max", flush_every_s=0)
    rec.load()
    rec.write()
    assert {r["status"] for r in read_rows(rec.trials_path)} == {"pending"}

    done, asha, diverged, errored, pending = (i.trial_id for i in _infos())
    rec.on_start(done)
    for e in (1, 2, 3):
        rec.on_result(done, _report(e, 0.5 + e / 10, 1.0 / e))
    rec.on_complete(done)

    rec.on_start(asha)
    rec.on_result(asha, _report(1, 0.2, 3.0), stopped=True)  # the scheduler stops it at epoch 1
    rec.on_complete(asha)

    rec.on_start(diverged)
    rec.on_result(diverged, _report(1, 0.3, 2.0))
    rec.on_result(diverged, {"epoch": 1.5, "step": 6, "eval_accuracy": 0.3, "status": "diverged",
                             "message": "5 non-finite losses in a row at step 6", "training_iteration": 2})
    rec.on_complete(diverged)

    rec.on_start(errored)
    rec.on_error(errored, "Traceback ...\nValueError: boom")
    rec.close()

    rows = {r["trial_id"]: r for r in read_rows(rec.trials_path)}
    assert rows[done]["status"] == "completed" and rows[done]["stop_reason"] == "ran all 3 epochs"
    assert rows[done]["best_eval_accuracy"] == pytest.approx(0.8)
    assert rows[asha]["status"] == "stopped_by_asha" and "ASHA stopped it at epoch 1" in rows[asha]["stop_reason"]
    assert rows[asha]["epochs_run"] == 1.0
    assert rows[diverged]["status"] == "diverged" and "non-finite" in rows[diverged]["message"]
    assert rows[errored]["status"] == "errored" and rows[errored]["stop_reason"] == "error: ValueError: boom"
    assert rows[pending]["status"] == "pending" and rows[pending]["reports"] == 0
    assert all(rows[t]["attempts"] == 1 for t in (done, asha, diverged, errored))
    # every config value is a column
    table = pq.read_table(rec.trials_path)
    assert {"method", "lr", "lora.r", "trial_id", "status", "best_eval_accuracy", "last_eval_macro_f1",
            "epochs_run", "wall_time_s", "stop_reason"} <= set(table.column_names)

    curves = pq.read_table(rec.curves_path).to_pylist()
    assert len(curves) == 3 + 1 + 2
    assert {c["trial_id"] for c in curves} == {done, asha, diverged}
    assert all(math.isfinite(c["epoch"]) for c in curves)

    # finished trials leave a marker with their last result (for --resume after a killed driver)
    assert read_json(rec.marker_path(done))["last_result"]["epoch"] == 3.0
    assert read_json(rec.marker_path(errored)) is None


def test_recorder_resume_keeps_finished_rows_and_dedupes_curves(tmp_path):
    exp = str(tmp_path / "exp")
    infos = _infos()[:2]
    first = ResultsRecorder(exp, infos, metric="eval_accuracy", flush_every_s=0)
    first.load()
    done, running = infos[0].trial_id, infos[1].trial_id
    first.on_start(done)
    for e in (1, 2, 3):
        first.on_result(done, _report(e, 0.6, 1.0))
    first.on_complete(done)
    first.on_start(running)
    first.on_result(running, _report(1, 0.4, 1.0))
    first.close()
    assert {r["trial_id"]: r["status"] for r in read_rows(first.trials_path)}[running] == "interrupted"

    second = ResultsRecorder(exp, infos, metric="eval_accuracy", flush_every_s=0)
    second.load()
    # the finished trial announces its last result again: no new curve row, its row stays as it was
    second.on_start(done)
    second.on_result(done, {**_report(3, 0.6, 1.0), "replayed": 1})
    second.on_complete(done)
    # the interrupted one resumes from its epoch-1 checkpoint: it sends that report again (already recorded:
    # dropped, the first row stays), then reports epochs 2 and 3
    second.on_start(running)
    second.on_result(running, {**_report(1, 0.4, 1.0), "timestamp": 99999, "replayed": 1})
    for e in (2, 3):
        second.on_result(running, _report(e, 0.7, 0.5))
    second.on_complete(running)
    second.close()
    rows = {r["trial_id"]: r for r in read_rows(second.trials_path)}
    assert rows[done]["status"] == "completed" and rows[running]["status"] == "completed"
    assert rows[running]["attempts"] == 2 and rows[done]["attempts"] == 1
    curves = read_rows(second.curves_path)
    assert 99999 not in {c["timestamp"] for c in curves} and "replayed" not in curves[0]
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == sorted(
        [(done, 1.0), (done, 2.0), (done, 3.0), (running, 1.0), (running, 2.0), (running, 3.0)])


def test_best_per_method_and_table():
    rows = [{"method": "finetune", "best_eval_accuracy": 0.6, "trial_id": "a"},
            {"method": "finetune", "best_eval_accuracy": 0.7, "trial_id": "b"},
            {"method": "dynsdpb", "best_eval_accuracy": 0.8, "trial_id": "c"},
            {"method": "random_dlb", "best_eval_accuracy": None, "trial_id": "d"}]
    best = best_per_method(rows, "eval_accuracy", "max")
    assert [r["trial_id"] for r in best] == ["c", "b"]
    assert [r["trial_id"] for r in best_per_method(rows, "eval_accuracy", "min")] == ["a", "c"]
    text = format_table(best, ["method", "best_eval_accuracy", "trial_id"])
    assert text.splitlines()[0].split() == ["method", "best_eval_accuracy", "trial_id"]
    assert "dynsdpb" in text.splitlines()[2] and "0.8" in text


def test_an_errored_trial_is_retried_and_can_still_complete(tmp_path):
    info = _infos()[0]
    rec = ResultsRecorder(str(tmp_path / "exp"), [info], metric="eval_accuracy", flush_every_s=0)
    rec.on_start(info.trial_id)
    rec.on_result(info.trial_id, _report(1, 0.5, 1.0))
    rec.on_error(info.trial_id, "RuntimeError: worker died")
    assert read_rows(rec.trials_path)[0]["status"] == "errored"
    again = ResultsRecorder(str(tmp_path / "exp"), [info], metric="eval_accuracy", flush_every_s=0)
    again.load()  # --resume retries errored trials
    again.on_start(info.trial_id)
    for e in (2, 3):
        again.on_result(info.trial_id, _report(e, 0.6, 0.8))
    again.on_complete(info.trial_id)
    row = read_rows(again.trials_path)[0]
    assert row["status"] == "completed" and row["attempts"] == 2 and row["message"] == ""
    assert row["reports"] == 3


def test_a_replayed_report_tune_never_saw_is_recorded(tmp_path):
    info = _infos()[0]
    rec = ResultsRecorder(str(tmp_path / "exp"), [info], metric="eval_accuracy", flush_every_s=0)
    rec.on_start(info.trial_id)
    # the sweep stopped after Train kept the epoch-2 checkpoint but before Tune saw its report
    rec.on_result(info.trial_id, {**_report(2, 0.7, 0.5), "replayed": 1})
    rec.on_result(info.trial_id, _report(3, 0.8, 0.4))
    rec.on_complete(info.trial_id)
    assert [c["epoch"] for c in read_rows(rec.curves_path)] == [2.0, 3.0]


def test_a_result_the_trials_fall_quiet_after_is_still_written(tmp_path):
    """Results are written at most every `flush_every_s`; one that arrives within that time of the last write, after
    which no trial reports for a while (a trial held at a long step), is written by Tune's next loop step once the
    time is up (`flush_due`), not only at the next result or trial end."""
    exp = str(tmp_path / "exp")
    rec = ResultsRecorder(exp, _infos(), metric="eval_accuracy", mode="max", flush_every_s=0.5)
    rec.load()
    first = _infos()[0].trial_id
    rec.on_start(first)
    rec.on_result(first, _report(1, 0.5, 1.0))  # the first result: written at once
    assert len(read_rows(rec.curves_path)) == 1
    rec.on_result(first, _report(2, 0.6, 0.9))  # within flush_every_s of that write: held
    rec.flush_due()
    assert len(read_rows(rec.curves_path)) == 1
    time.sleep(0.6)
    rec.flush_due()
    assert [r["epoch"] for r in read_rows(rec.curves_path)] == [1, 2]
    written = os.path.getmtime(rec.curves_path)
    time.sleep(0.6)
    rec.flush_due()  # nothing new: no rewrite
    assert os.path.getmtime(rec.curves_path) == written
