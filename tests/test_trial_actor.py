"""Warm single-worker trials (`raysdpb.sweep.trial_actor`): the checkpoints they keep, as Ray Train would, the data
a reused actor keeps between trials, and a real sweep whose trials run in reused Tune actors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysdpb.recipe.checkpoint import checkpoint_name, complete_checkpoints, mark_complete
from raysdpb.recipe.components import data_key
from raysdpb.sweep.cleanup import prune_finished_checkpoints, prune_unregistered_checkpoints
from raysdpb.sweep.trial_actor import SNAPSHOT_FILE, CheckpointKeeper
from trial_configs import encoder_trial, sweep_env, sweep_raw


def _whole(run: Path, step: int) -> str:
    folder = run / checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"x" * 10)
    mark_complete(folder)
    return folder.name


@pytest.mark.parametrize("seed", range(20))
def test_the_keeper_keeps_the_best_k_and_the_latest_as_ray_train_does(tmp_path, seed):
    """Over random report sequences: after every checkpoint the run holds exactly the `keep` best by the metric
    (ties to the older) plus the latest, and the snapshot lists just those; a second keeper (a retried attempt)
    starts from that snapshot; the cleanup that reads Ray Train's snapshot reads this one the same way."""
    rng = random.Random(seed)
    keep, mode = rng.choice([1, 2, 3]), rng.choice(["max", "min"])
    run = tmp_path / "run"
    keeper = CheckpointKeeper(str(run), "eval_accuracy", mode, keep)
    reports: list[tuple[int, float | None]] = []
    for step in range(1, rng.randint(2, 9) * 3, 3):
        value = rng.choice([None, round(rng.random(), 1)])
        name = _whole(run, step)
        metrics = {"step": step} | ({"eval_accuracy": value} if value is not None else {})
        if rng.random() < 0.3:  # a retried attempt picks up where the last left off
            keeper = CheckpointKeeper(str(run), "eval_accuracy", mode, keep)
        keeper.add(name, metrics)
        reports.append((step, value))
        sign = 1 if mode == "max" else -1
        ranked = sorted(reports, key=lambda r: float("-inf") if r[1] is None else sign * r[1], reverse=True)
        expected = {s for s, _ in ranked[:keep]} | {step}
        assert {s for s, _ in complete_checkpoints(str(run))} == expected
        snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
        assert {r["metrics"]["step"] for r in snapshot["checkpoint_results"]} == expected
        assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == checkpoint_name(step)
    assert prune_unregistered_checkpoints(str(run)) == []  # everything on disk is registered
    (run / ".step_00000099_x.tmp").mkdir()  # a checkpoint being written when its attempt died
    CheckpointKeeper(str(run), "eval_accuracy", mode, keep)  # the next attempt removes it
    assert not list(run.glob(".*"))
    scored = [(s, v) for s, v in reports if v is not None and s in {x for x, _ in complete_checkpoints(str(run))}]
    prune_finished_checkpoints(str(run), "eval_accuracy", mode, keep=1)
    left = [s for s, _ in complete_checkpoints(str(run))]
    if scored:
        best = max(v * (1 if mode == "max" else -1) for _, v in scored)
        assert len(left) == 1 and [v * (1 if mode == "max" else -1) for s, v in scored if s == left[0]] == [best]


def test_the_data_key_ignores_what_does_not_change_the_data(shared_data_dir):
    """Trials of one grid that differ in method, hyperparameters or seed read the same tokenized data (so a reused
    actor tokenizes once); a different task, length, subset or model does not."""
    base = encoder_trial(shared_data_dir)
    same = [dict(method="finetune"), dict(lr=3e-4, alpha=0.5, tau=3.0), dict(seed=7), dict(epochs=3, batch_size=4),
            dict(eval_every_steps=2, progress_bar=True), dict(num_layers=1)]
    for change in same:
        assert data_key(encoder_trial(shared_data_dir, **change)) == data_key(base), change
    differ = [dict(max_length=32), dict(max_train_samples=16), dict(max_eval_samples=8), dict(task="glue/rte"),
              dict(model="minilm-l6")]
    for change in differ:
        assert data_key(encoder_trial(shared_data_dir, **change)) != data_key(base), change


def test_warm_trials_reuse_one_actor_and_train_as_a_ray_train_run_does(tmp_path, shared_data_dir):
    """A sweep of three single-worker trials one at a time: all three run in one Tune actor (one process), the later
    ones on the tokenized data the first one left; a trial run as a Ray Train run instead (`warm_trials: false`)
    reports the same losses and metrics at every step as the same trial run warm."""
    from raysdpb.results.storage import read_rows

    def sweep(name, search, **settings):
        raw = sweep_raw(shared_data_dir, tmp_path / "results", name, search, method="dynsdpb",
                        sweep={"max_concurrent_trials": 1, **settings})
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        out = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-v"], cwd=tmp_path, env=sweep_env(),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        exp = tmp_path / "results" / name
        return read_rows(str(exp / "trials.parquet")), read_rows(str(exp / "curves.parquet")), out.stdout + out.stderr

    trials, curves, _ = sweep("warm", {"seed": [0, 1], "lr": [1e-4, 3e-4]})
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    assert len({c["worker_pid"] for c in curves}) == 1  # one actor ran every trial
    first = {t["trial_id"]: min(c["actor_trial"] for c in curves if c["trial_id"] == t["trial_id"]) for t in trials}
    assert sorted(first.values()) == [1, 2, 3, 4]
    for c in curves:  # all but the actor's first trial found their tokenized data there
        assert c["data_reused"] == (c["actor_trial"] > 1)
    cold_trials, cold_curves, _ = sweep("cold", {"seed": [0], "lr": [1e-4]}, warm_trials=False)
    assert cold_trials[0]["trial_id"] in {t["trial_id"] for t in trials}
    assert cold_curves[0]["worker_pid"] not in {c["worker_pid"] for c in curves}
    warm = {c["step"]: c for c in curves if c["trial_id"] == cold_trials[0]["trial_id"]}
    assert sorted(warm) == sorted(c["step"] for c in cold_curves) and len(warm) >= 4
    for c in cold_curves:
        for key in ("train_loss", "eval_accuracy", "eval_macro_f1", "lr"):
            assert c[key] == pytest.approx(warm[c["step"]][key], rel=1e-5, abs=1e-7), (c["step"], key)
