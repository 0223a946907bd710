"""Experiments on S3, for real: every reader and writer of `raysdpb.results.storage`, checkpoints on the bucket, a
sweep with ASHA and a killed worker, `--resume` after a killed driver, the report and TensorBoard read back from
the bucket. The server is moto's S3 server on 127.0.0.1 (`conftest.s3_server`), reached through the same
`AWS_ENDPOINT_URL` setting a user gives for MinIO or another S3-compatible store; no storage call is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import yaml

from raysdpb.recipe.checkpoint import checkpoint_name, complete_checkpoints, is_slim, mark_complete
from raysdpb.results.recorder import read_finished_marker, write_finished_marker
from raysdpb.results.storage import exists, filesystem, join, read_json, read_rows, write_json, write_table
from trial_configs import fault_env, sweep_env, sweep_raw


def _prefix(s3, name: str) -> str:
    """A fresh folder in the bucket for one test."""
    return s3.uri(f"{name}-{uuid.uuid4().hex[:8]}")


def _upload(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def _keys(s3, uri: str) -> list[str]:
    """The objects under `uri`, relative to it; not the empty "directory" markers pyarrow keeps for prefixes."""
    prefix = uri.split(f"s3://{s3.bucket}/", 1)[1]
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    keys = [obj["Key"][len(prefix) + 1:] for page in pages for obj in page.get("Contents", [])]
    return sorted(k for k in keys if k and not k.endswith("/"))


def test_the_results_files_and_markers_on_s3(s3):
    root = _prefix(s3, "files")
    assert read_rows(join(root, "trials.parquet")) == [] and read_json(join(root, "grid.json")) is None
    write_table(pa.table({"trial_id": ["a", "b"], "x": [1.0, 2.0]}), join(root, "trials.parquet"))
    write_table(pa.table({"trial_id": ["a"], "x": [3.0]}), join(root, "trials.parquet"))  # replaced whole
    assert read_rows(join(root, "trials.parquet")) == [{"trial_id": "a", "x": 3.0}]
    write_json(join(root, "grid.json"), {"format": 2, "trial_ids": ["a"]})
    assert read_json(join(root, "grid.json")) == {"format": 2, "trial_ids": ["a"]}
    write_finished_marker(root, "a", "completed", {"epoch": 2.0})
    assert read_finished_marker(root, "a") == {"status": "completed", "last_result": {"epoch": 2.0}}
    assert read_finished_marker(root, "b") is None and exists(join(root, "finished", "a.json"))
    # the objects a reader sees: whole files, nothing temporary
    assert _keys(s3, root) == ["finished/a.json", "grid.json", "trials.parquet"]


def test_checkpoints_on_s3_are_whole_only_and_unregistered_ones_pruned(s3, tmp_path):
    """The size manifest is the one completeness rule on a bucket too: a checkpoint whose upload stopped halfway
    (a file shorter than recorded, or no manifest yet) is not one; Ray Train's unregistered leftovers are removed."""
    from raysdpb.sweep.cleanup import prune_unregistered_checkpoints

    run = _prefix(s3, "run")
    for step, whole in ((3, True), (6, True), (9, True), (12, False)):
        folder = tmp_path / checkpoint_name(step)
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 100)
        mark_complete(folder)
        if not whole:
            (folder / "state.pt").write_bytes(b"x" * 40)
        _upload(folder, join(run, checkpoint_name(step)))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "state.pt").write_bytes(b"x")
    _upload(tmp_path / "bare", join(run, checkpoint_name(15)))  # no manifest at all
    assert [step for step, _ in complete_checkpoints(run)] == [3, 6, 9]
    write_json(join(run, "checkpoint_manager_snapshot.json"), {
        "checkpoint_results": [{"checkpoint_dir_name": checkpoint_name(6)}],
        "latest_checkpoint_result": {"checkpoint_dir_name": checkpoint_name(6)}})
    removed = prune_unregistered_checkpoints(run)
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == [checkpoint_name(s) for s in (3, 12, 15)]
    assert {k.split("/")[0] for k in _keys(s3, run)} == {"checkpoint_manager_snapshot.json", checkpoint_name(6),
                                                         checkpoint_name(9)}


def _sweep(tmp_path: Path, raw: dict, env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    config = tmp_path / f"{raw['sweep']['name']}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-q", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the default suite's 15 minutes (2-core machine, 2026-12-07: 965 s with it)
def test_a_sweep_on_s3_with_asha_and_a_killed_worker(s3, tmp_path, shared_data_dir):
    """A sweep whose storage is the bucket, as on a cluster. The worker of the trial a huge learning rate ruins is
    SIGKILLed after step 5 and resumes from its newest whole checkpoint on the bucket (step 3); ASHA then stops it at
    its first rung, where the other trial (undisturbed, so there first) has the better training loss. The Parquet
    rows, one checkpoint per trial (`keep_checkpoints: 1`), the TensorBoard events and the report all come back
    from the bucket; the workers' scratch folder ends empty."""
    storage = _prefix(s3, "sweep")
    raw = sweep_raw(shared_data_dir, storage, "asha", {"lr": [1e-4, 0.5]}, log_every_steps=1,
                    sweep={"asha": {"metric": "train_loss", "mode": "min", "grace_period": 1, "reduction_factor": 2}})
    killed, scratch = tmp_path / "killed", tmp_path / "scratch"
    env = sweep_env(RAYSDPB_SCRATCH_DIR=str(scratch), **s3.env, **fault_env(
        {"point": "after_step", "step": 5, "where": {"lr": 0.5}, "marker": str(killed)}))
    out = _sweep(tmp_path, raw, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert killed.exists(), "the worker was not killed"
    experiment = join(storage, "asha")
    trials = {r["lr"]: r for r in read_rows(join(experiment, "trials.parquet"))}
    good, bad = trials[1e-4], trials[0.5]
    assert good["status"] == "completed" and good["epochs_run"] == 2
    assert bad["status"] == "stopped_by_asha" and bad["epochs_run"] == 1
    curves = read_rows(join(experiment, "curves.parquet"))
    for row in (good, bad):
        steps = sorted(c["step"] for c in curves if c["trial_id"] == row["trial_id"])
        assert steps == sorted(set(steps)) and steps[-1] == row["steps"]  # every report once, the killed run's too
    assert any(c.get("resumed_from_step") == 3 for c in curves if c["trial_id"] == bad["trial_id"])  # on the bucket
    assert not any(c.get("resumed_from_step") for c in curves if c["trial_id"] == good["trial_id"])
    for row in (good, bad):  # finished: one checkpoint each (keep_weights: all), slimmed to its weights, on the bucket
        run = join(experiment, "train_runs", row["trial_id"])
        ((_, path),) = complete_checkpoints(run)
        fs, _ = filesystem(run)
        assert is_slim(fs, path) and fs.get_file_info(f"{path}/state.pt").type == pafs.FileType.NotFound
    # a stopped trial's worker dies before it can remove its scratch folder; the next worker on the node removes
    # the folders of workers that are gone (tests/test_reliability.py::test_scratch_of_killed_workers_is_removed)
    for folder in scratch.iterdir():
        pid = int(folder.name.split("-")[2])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # TensorBoard's own reader on the bucket (what `tensorboard --logdir s3://...` runs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(join(experiment, "tensorboard", good["trial_id"]))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "eval/accuracy" in events.Tags()["scalars"]
    assert max(e.step for e in events.Scalars("train/loss")) == good["steps"]

    # the report of the experiment on the bucket, written to a local folder, with the figures that need the events
    report = subprocess.run([sys.executable, "-m", "raysdpb.report", experiment, "--out", str(tmp_path / "report")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "dynsdpb" in text and list((tmp_path / "report").glob("grad_norms_*.png"))
