"""The training recipe end to end: real trials of a tiny random BERT and of MiniLM-L6 on real SuperGLUE CB."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysdpb.config import load_trial_config
from raysdpb.recipe.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, is_complete_folder, load_state, mark_complete
from raysdpb.recipe.context import LocalContext
from raysdpb.recipe import run_trial
from raysdpb.errors import UserError
from raysdpb.methods import METHODS
from trial_configs import RecordingContext, make_teacher
from trial_configs import encoder_trial as _config

REPO = Path(__file__).resolve().parents[1]




@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_evaluates(method, shared_data_dir, tmp_path, monkeypatch):
    # PS-KD's targets are the previous epoch's predictions: a second epoch to have some; KD's a teacher's
    targets = METHODS[method].soft_targets
    extra = {}
    if targets == "teacher":
        monkeypatch.setenv("RAYSDPB_CACHE", str(tmp_path / "cache"))
        extra = {"teacher_model": str(make_teacher(tmp_path / "teacher")), "alpha": 0.5}
    cfg = _config(shared_data_dir, method=method, log_every_steps=1,
                  epochs=2 if targets == "previous_epoch" else 1, **extra)
    context = RecordingContext(tmp_path / "run")
    result = run_trial(cfg, context)
    assert result.status == "completed"
    assert set(result.metrics) == {"eval_accuracy", "eval_macro_f1"}
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    epochs = cfg.epochs * METHODS[method].epoch_multiplier
    assert len(result.history) == epochs and result.history[-1]["epoch"] == epochs
    losses = [s["train/loss"] for _, s in context.scalars if "train/loss" in s]
    assert losses and all(math.isfinite(x) for x in losses)
    distilled = [s for _, s in context.scalars if "train/distill" in s]
    assert bool(distilled) == METHODS[method].distills
    # TensorBoard events were written
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_dynsdpb_alpha_and_tau_stay_in_bounds(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method="dynsdpb", alpha=0.7, tau=3.0, log_every_steps=1, epochs=2)
    context = RecordingContext(tmp_path / "run")
    run_trial(cfg, context)
    logged = [s for _, s in context.scalars if "dynamic/alpha_mean" in s]
    assert len(logged) > 5
    for s in logged:
        assert 0.0 <= s["dynamic/alpha_min"] <= s["dynamic/alpha_max"] <= 0.7 + 1e-6
        assert 3.0 * 0.5 - 1e-6 <= s["dynamic/tau_min"] <= s["dynamic/tau_max"] <= 3.0 * 2.0 + 1e-6
    # the per-sample values really vary (they are dynamic, not the constants)
    assert any(s["dynamic/tau_std"] > 0 for s in logged)


def test_same_seed_same_metrics_and_different_seed_differs(shared_data_dir, tmp_path):
    runs = [run_trial(_config(shared_data_dir, method="random_dlb", seed=s), LocalContext(tmp_path / f"r{i}"))
            for i, s in enumerate([3, 3, 4])]
    assert runs[0].history == runs[1].history
    assert runs[0].history[-1]["train_loss"] != runs[2].history[-1]["train_loss"]


@pytest.mark.parametrize("method", ["dynsdpb", "finetune", "ps_kd"])
def test_resume_mid_epoch_matches_uninterrupted_run(method, shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method=method, epochs=2, checkpoint_every_steps=4)
    full_ctx = LocalContext(tmp_path / "full", keep=100)
    full = run_trial(cfg, full_ctx)
    # a checkpoint taken mid-epoch (step 4 of the first epoch): keep a copy and resume from it
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(4)
    assert is_complete_folder(mid)
    state = load_state(mid)
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["position"] == 4
    # the rank's own state (soft targets, random state, running losses) is kept once, in the list of ranks
    assert len(state["ranks"]) == 1 and not {"cache", "rng", "running", "history"} & set(state)
    if METHODS[method].distills:
        assert state["ranks"][0]["cache"], "the logit cache is part of the checkpoint"
    if METHODS[method].soft_targets == "previous_epoch":  # PS-KD: the predictions of the 4 batches trained on
        memory = state["ranks"][0]["cache"]
        assert memory["probs"].shape == (48, 3) and int(memory["seen"].sum()) == 4 * 8
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(mid, resumed_dir / "from")
    resumed = run_trial(cfg, LocalContext(resumed_dir, resume_from=resumed_dir / "from"))
    assert resumed.metrics == full.metrics
    assert resumed.history == full.history
    assert resumed.steps == full.steps


def test_a_checkpoint_of_an_older_raysdpb_is_one_clear_message(shared_data_dir, tmp_path):
    """Before a release there is no old format to load: a checkpoint of another format (here the one written
    before the recipe: no format key, the rank's state at the top level) and an output folder in the old layout
    (`step_<n>` folders) each end in one message naming what to do."""
    cfg = _config(shared_data_dir, method="dynsdpb", epochs=1)
    run_trial(cfg, LocalContext(tmp_path / "run"))
    saved = sorted((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[-1]
    state = load_state(saved)
    older = {k: v for k, v in state.items() if k not in ("ranks", "format")} | state["ranks"][0]
    torch.save(older, saved / "state.pt")
    mark_complete(saved)
    with pytest.raises(UserError, match=r"written by an older raysdpb \(format 1\).*start the trial again"):
        run_trial(cfg, LocalContext(tmp_path / "again", resume_from=saved))
    old_layout = tmp_path / "old" / "checkpoints" / "step_00000004"
    old_layout.mkdir(parents=True)
    (old_layout / "COMPLETE").touch()
    with pytest.raises(UserError, match="holds checkpoints of an older raysdpb"):
        LocalContext(tmp_path / "old", resume_from="latest")


def test_resume_refuses_a_checkpoint_of_another_world_size(shared_data_dir, tmp_path):
    """A DDP checkpoint holds one state per rank; resuming it with another number of ranks would hand a rank
    soft targets of samples it never sees, so it ends in a UserError that says what to do."""
    cfg = _config(shared_data_dir, method="dynsdpb", epochs=1)
    run_trial(cfg, LocalContext(tmp_path / "run"))
    saved = sorted((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[-1]
    state = load_state(saved)
    torch.save({**state, "ranks": state["ranks"] * 2}, saved / "state.pt")  # as if two ranks had written it
    mark_complete(saved)
    with pytest.raises(UserError, match=r"holds the state of 2 rank\(s\), not of this trial's 1; resume with the "
                                        r"world size that wrote it"):
        run_trial(cfg, LocalContext(tmp_path / "again", resume_from=saved))


def test_elapsed_time_is_reported_and_carried_across_a_resume(shared_data_dir, tmp_path):
    """Every report carries the trial's clock (`elapsed_s`, which results use as `wall_time_s`): increasing,
    within the run's wall time, and on a resume continued from the checkpoint's clock; the history (what the
    trial computed) has no timing in it, so a resumed run's history still equals the uninterrupted one's."""
    import time

    cfg = _config(shared_data_dir, method="finetune", epochs=2, checkpoint_every_steps=4)
    full_ctx = LocalContext(tmp_path / "full", keep=100)
    t0 = time.perf_counter()
    full = run_trial(cfg, full_ctx)
    wall = time.perf_counter() - t0
    clocks = [r["elapsed_s"] for r in full_ctx.reports]
    assert len(clocks) == 2 and 0 < clocks[0] < clocks[1] <= wall
    assert not any("elapsed_s" in entry for entry in full.history)
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(4)
    state = load_state(mid)
    assert 0 < state["elapsed_s"] < clocks[0]
    # the checkpoint as if its trial had already run for 1000 s
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(mid, resumed_dir / "from")
    torch.save({**state, "elapsed_s": 1000.0}, resumed_dir / "from" / "state.pt")
    mark_complete(resumed_dir / "from")
    ctx = LocalContext(resumed_dir, resume_from=resumed_dir / "from")
    t0 = time.perf_counter()
    resumed = run_trial(cfg, ctx)
    wall = time.perf_counter() - t0
    resumed_clocks = [r["elapsed_s"] for r in ctx.reports]
    assert len(resumed_clocks) == 2 and 1000.0 < resumed_clocks[0] < resumed_clocks[1] <= 1000.0 + wall
    assert resumed.history == full.history


def test_checkpoints_on_disk_are_bounded(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method="finetune", epochs=2, checkpoint_every_steps=1)
    run_trial(cfg, LocalContext(tmp_path / "run", keep=2))
    kept = list((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    assert len(kept) == 2 and all(is_complete_folder(k) for k in kept)


def _run_cli(args, **kwargs):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "raysdpb.train", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600, **kwargs)


def test_cli_prints_metrics_json_last(shared_data_dir, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(
        f"task: superglue/cb\nmodel: tiny-bert\nmethod: random_dlb\ndata_dir: {shared_data_dir}\n"
        "epochs: 1\nbatch_size: 8\nmax_train_samples: 32\nmax_eval_samples: 16\nmax_length: 64\n"
        "search:\n  method: [dynsdpb, finetune]\n  seed: [5, 6]\n"
    )
    proc = _run_cli([str(config), "seed=7", "--output-dir", str(tmp_path / "out"), "-q"])
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    # a searched key takes its first value (method), an override wins (seed)
    assert last["method"] == "dynsdpb" and last["seed"] == 7 and last["task"] == "superglue/cb"
    assert {"eval_accuracy", "eval_macro_f1", "status"} <= set(last)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method=dlb", "unknown method 'dlb'"),
        ("task=glue/nope", "unknown task 'glue/nope'"),
        ("lr=-1", "lr"),
        ("batch_size=0", "batch_size"),
        ("learning_rate=1e-5", "learning_rate: unknown key"),
        ("model=/nonexistent/model", "is no folder on this machine"),
    ],
)
def test_cli_user_errors_are_one_clear_line(override, expected, shared_data_dir, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(f"task: superglue/cb\nmodel: tiny-bert\ndata_dir: {shared_data_dir}\nmax_train_samples: 16\n")
    proc = _run_cli([str(config), override, "--output-dir", str(tmp_path / "out"), "-q"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raysdpb: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = _run_cli([str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_custom_csv_task(tmp_path):
    import random

    rng = random.Random(0)
    rows = ["sentence,label"]
    for i in range(40):
        good = rng.random() < 0.5
        rows.append(f"\"{'great wonderful' if good else 'awful terrible'} movie {i}\",{'pos' if good else 'neg'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:17]) + "\n")
    cfg = load_trial_config(None, raw=dict(
        task="custom", model="tiny-bert", method="dynsdpb", epochs=3, batch_size=8, lr=3e-3, progress_bar=False,
        custom_task=dict(files={"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv")},
                         text_fields=["sentence"], label_field="label", metric="accuracy")))
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    assert result.status == "completed"
    assert result.metrics["eval_accuracy"] >= 0.9  # a trivially separable task is learned


def test_minilm_on_real_cb(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, model="minilm-l6", method="dynsdpb", lr=5e-5, max_train_samples=64,
                  max_eval_samples=56, max_length=128)
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    assert result.status == "completed"
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0 and "eval_macro_f1" in result.metrics


def test_eval_before_training_scores_the_model_as_loaded_and_survives_a_resume(shared_data_dir, tmp_path):
    """`eval_before_training`: the metrics of the untrained model (checked against evaluating a freshly built
    model with the same seed by hand), carried as initial_eval_* in every report and in the result, also
    after a resume from a mid-run checkpoint."""
    from raysdpb.data import collate, tokenize_records
    from raysdpb.recipe.evaluation import evaluate_split
    from raysdpb.models import build_model, load_tokenizer, resolve_model
    from raysdpb.recipe.components import seed_everything
    from raysdpb.tasks import get_task, load_examples

    cfg = _config(shared_data_dir, eval_before_training=True, epochs=2, max_eval_samples=56)
    result = run_trial(cfg, LocalContext(tmp_path / "a"))
    assert result.status == "completed"

    seed_everything(0)
    task = get_task("superglue/cb")
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    model = build_model(source, kind=task.kind, num_labels=task.num_labels, tokenizer=tokenizer)
    records = load_examples(task, "validation", str(shared_data_dir))[:56]
    by_hand = evaluate_split(model, task, tokenize_records(records, task.kind, tokenizer, 64), records,
                             batch_size=16, collator=collate(tokenizer.pad_token_id), device=torch.device("cpu"))
    assert {f"initial_{k}": v for k, v in by_hand.items()} == {k: v for k, v in result.metrics.items()
                                                               if k.startswith("initial_")}
    assert all(entry["initial_eval_accuracy"] == by_hand["eval_accuracy"] for entry in result.history)
    assert result.metrics["eval_accuracy"] == result.history[-1]["eval_accuracy"]

    # resumed from the checkpoint of epoch 1: the initial metrics come from the checkpoint (no new evaluation:
    # the trained model would score differently), the run ends as the uninterrupted one did
    epoch_one = sorted((tmp_path / "a" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[0]
    resumed = run_trial(cfg, LocalContext(tmp_path / "b", resume_from=epoch_one))
    assert resumed.metrics == result.metrics
