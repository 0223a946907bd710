"""Experiment trackers (raysdpb.trackers, raysdpb.sweep.trackers): a real sweep logging to a real MLflow tracking
server (started here on loopback, SQLite behind it) and to Weights & Biases in offline mode (its run files read
back record by record), `python -m raysdpb.train` logging to both and resuming into the same runs, and the one-line
error when a tracker's package is missing. The trackers' contents are checked against what the sweep recorded
itself (curves.parquet, trials.parquet, grid.json) and what the local run wrote to TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from trial_configs import fault_env, small_encoder_raw, sweep_env, sweep_raw

# --- a real MLflow tracking server and W&B's offline files ----------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (one worker, a SQLite store), as its own process group; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = root / "server.log"
    proc = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # ~16 s on 2 idle cores, 111 s with 4 agents' sweeps on them
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:  # not listening yet
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the worker it started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wandb_env(root: Path) -> dict:
    """W&B offline, every file of it under `root` (no account, no network, nothing in the home folder)."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"), "WANDB_SILENT": "true"}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): W&B's own protobuf messages (`wandb_internal_pb2.Record`)
    in its log framing (a 7-byte header; 32 KiB blocks of chunks, each with a CRC-32 of its type and data, a length
    and a type: whole, first, middle, last). Each chunk's checksum is checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, header = 32768, 7
    records, pending, pos = [], b"", 7
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad chunk at {pos}"
        pos += header + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wandb_run(run_dir: Path) -> SimpleNamespace:
    """An offline run folder as the run record (id, name, group, project), its config and its history rows."""
    (path,) = run_dir.glob("run-*.wandb")
    run, config, history = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({(u.key or ".".join(u.nested_key)): json.loads(u.value_json) for u in record.history.item})
    config = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    return SimpleNamespace(id=run.run_id, name=run.display_name, group=run.run_group, project=run.project,
                           config=config, history=history)


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "trial_id"}


# --- a sweep logging to MLflow and W&B ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, shared_data_dir, mlflow_server):
    """A real 2-trial sweep (finetune and dynsdpb on the tiny BERT, 2 epochs, a report every 3 steps) with
    `sweep.loggers: [tensorboard, mlflow, wandb]`, the trackers' settings from the environment
    ($MLFLOW_TRACKING_URI, $WANDB_MODE=offline)."""
    root = tmp_path_factory.mktemp("tracked")
    raw = sweep_raw(shared_data_dir, root / "results", "tracked", {"method": ["finetune", "dynsdpb"]},
                    sweep={"loggers": ["tensorboard", "mlflow", "wandb"]})
    config = root / "tracked.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = sweep_env(MLFLOW_TRACKING_URI=mlflow_server, **_wandb_env(root / "wandb"))
    out = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    experiment = root / "results" / "tracked"
    return SimpleNamespace(experiment=experiment, root=root, uri=mlflow_server,
                           trials={r["trial_id"]: r for r in pq.read_table(experiment / "trials.parquet").to_pylist()},
                           curves=pq.read_table(experiment / "curves.parquet").to_pylist(),
                           grid=json.loads((experiment / "grid.json").read_text())["trials"])


@pytest.mark.slow  # the default suite's 15 minutes (2-core machine, 2026-12-07: 965 s with it)
def test_a_sweep_logs_one_mlflow_run_per_trial_with_its_config_and_every_report(tracked_sweep):
    from mlflow import MlflowClient

    client = MlflowClient(tracked_sweep.uri)
    experiment = client.get_experiment_by_name("tracked")  # the sweep's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(tracked_sweep.trials) and len(runs) == 2  # one run per trial, named by its id
    for trial_id, run in runs.items():
        row, config = tracked_sweep.trials[trial_id], tracked_sweep.grid[trial_id]
        assert run.info.status == "FINISHED" and row["status"] == "completed"
        assert run.data.tags["raysdpb.sweep"] == "tracked" and run.data.tags["raysdpb.trial_id"] == trial_id
        params = run.data.params
        # the whole trial config as it ran (grid.json), not Tune's {trial_id}
        assert params["method"] == config["method"] == row["method"]
        assert float(params["lr"]) == config["lr"] == row["lr"] == 1e-4
        assert int(params["seed"]) == row["seed"] and params["task"] == "superglue/cb"
        assert params["data_dir"] == config["data_dir"] and params["label"] == f"method={row['method']}"
        assert "loggers" not in params and params["trial_id"] == trial_id
        # every report, at its step: the metric histories are the trial's curves.parquet rows
        curves = sorted((c for c in tracked_sweep.curves if c["trial_id"] == trial_id), key=lambda c: c["step"])
        assert len(curves) == row["reports"] >= 4  # steps 3, 4 (epoch 1), 6, 8 (epoch 2)
        keys = set().union(*(_numbers(c) for c in curves))
        assert {"eval_accuracy", "eval_macro_f1", "train_loss", "epoch", "step", "lr"} <= keys
        assert keys == set(run.data.metrics)
        for key in keys:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            expected = [(c["step"], float(c[key])) for c in curves if c.get(key) is not None]
            assert [(m.step, m.value) for m in history] == pytest.approx(expected), key
        assert run.data.metrics["eval_accuracy"] == row["last_eval_accuracy"]


@pytest.mark.slow  # the default suite's 15 minutes (2-core machine, 2026-12-07: 965 s with it)
def test_a_sweep_writes_one_offline_wandb_run_per_trial_in_the_sweeps_group(tracked_sweep):
    folders = sorted((tracked_sweep.experiment.parent.parent / "wandb" / "wandb").glob("offline-run-*"))
    runs = {run.name: run for run in map(wandb_run, folders)}
    assert len(folders) == len(runs) == 2 and set(runs) == set(tracked_sweep.trials)
    for trial_id, run in runs.items():
        row, config = tracked_sweep.trials[trial_id], tracked_sweep.grid[trial_id]
        assert run.project == run.group == "tracked" and run.id.startswith(f"{trial_id}-")
        assert run.config["method"] == config["method"] == row["method"] and run.config["lr"] == config["lr"]
        assert run.config["seed"] == row["seed"] and run.config["label"] == f"method={row['method']}"
        assert run.config["trial_id"] == trial_id and run.config["max_train_samples"] == 32
        curves = sorted((c for c in tracked_sweep.curves if c["trial_id"] == trial_id), key=lambda c: c["step"])
        # one history row per report, at the trial's step, with the report's numbers
        assert [h["_step"] for h in run.history] == [c["step"] for c in curves]
        for logged, curve in zip(run.history, curves):
            assert {k: logged[k] for k in _numbers(curve)} == pytest.approx(_numbers(curve))


@pytest.mark.slow  # the default suite's 15 minutes (2-core machine, 2026-12-07: 965 s with it)
def test_the_tracked_sweep_still_writes_tensorboard(tracked_sweep):
    for trial_id in tracked_sweep.trials:
        assert list((tracked_sweep.experiment / "tensorboard" / trial_id).glob("events.out.tfevents.*"))


# --- local mode ------------------------------------------------------------------------------------------------

def _scalars(tensorboard_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_local_run_logs_params_and_every_step_to_mlflow_and_wandb_and_resumes_into_the_same_runs(
        tmp_path, shared_data_dir):
    """`python -m raysdpb.train` with `loggers: [mlflow, wandb]` (MLflow in a SQLite file): killed after step 5
    (its last checkpoint step 4's), then `--resume latest`. One MLflow run, its parameters the trial's config, every
    step's scalars once (the steps trained again after the checkpoint are not logged twice) and equal to
    TensorBoard's; the W&B run continues under the same id."""
    from mlflow import MlflowClient

    from raysdpb.methods import get_method
    from raysdpb.recipe.components import make_sampler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = small_encoder_raw(shared_data_dir, epochs=2, log_every_steps=1, checkpoint_every_steps=2,
                            loggers=["mlflow", "wandb"], mlflow={"tracking_uri": uri, "experiment_name": "local"})
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(raw))
    out_dir = tmp_path / "run"
    env = sweep_env(**_wandb_env(tmp_path / "wb"))
    command = [sys.executable, "-m", "raysdpb.train", str(config), "-q", "--output-dir", str(out_dir)]
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**env, **fault_env({"point": "after_step", "step": 5})})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first_state = json.loads((out_dir / "trackers.json").read_text())
    done = subprocess.run(command + ["--resume", "latest"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((out_dir / "trackers.json").read_text()) == first_state  # the same runs

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert run.info.run_id == first_state["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run"  # the output folder's name
    params = run.data.params
    assert params["method"] == "dynsdpb" and float(params["lr"]) == raw["lr"] and int(params["seed"]) == 0
    assert params["output_dir"] == str(out_dir) and params["max_train_samples"] == "32" and "loggers" not in params
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    steps = [s for s, _ in losses]
    sampler = make_sampler(get_method("dynsdpb"), 32, 8, seed=0)  # 32 examples in overlapping batches of 8
    assert steps == list(range(1, sampler.total_batches(2) + 1))  # every step of the 2 epochs, once
    # TensorBoard has every step (twice, those trained again after the checkpoint); the values agree
    board = dict(_scalars(out_dir / "tensorboard", "train/loss"))
    assert losses == pytest.approx([(s, board[s]) for s in steps])
    accuracy = client.get_metric_history(run.info.run_id, "eval_accuracy")
    evaluated = {s for s, _ in _scalars(out_dir / "tensorboard", "eval/accuracy")}
    assert sorted(m.step for m in accuracy) == sorted(evaluated)
    assert len(accuracy) == 2  # an evaluation at each epoch's end
    assert max(accuracy, key=lambda m: m.step).value == pytest.approx(final["eval_accuracy"])

    # W&B: the resumed run under the same id, in a folder of its own with every step it trained (the killed
    # attempt's folder holds what W&B had written before the SIGKILL, here nothing but its header)
    folders = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and {f.name.rsplit("-", 1)[1] for f in folders} == {first_state["wandb_run_id"]}
    resumed = wandb_run(folders[-1])
    assert resumed.id == first_state["wandb_run_id"] and resumed.name == "run" and resumed.project == "raysdpb"
    assert resumed.config["method"] == "dynsdpb" and resumed.config["lr"] == raw["lr"]
    logged = {h["_step"]: h for h in resumed.history}
    resumed_from = min(logged)
    assert resumed_from == 5 and sorted(logged) == steps[resumed_from - 1:]  # from the step-4 checkpoint
    assert [(s, logged[s]["train/loss"]) for s in sorted(logged)] == pytest.approx(
        [(s, board[s]) for s in sorted(logged)])
    assert logged[steps[-1]]["eval_accuracy"] == pytest.approx(final["eval_accuracy"])


# --- configuration and missing packages ------------------------------------------------------------------------

def test_logger_names_are_checked_and_tensorboard_is_always_on(tmp_path, shared_data_dir):
    raw = sweep_raw(shared_data_dir, tmp_path, "s", {}, sweep={"loggers": ["mlflow"]})
    experiment = load_experiment(None, raw=raw)
    assert experiment.sweep.loggers == ["tensorboard", "mlflow"] and experiment.trial.loggers == ["tensorboard"]
    with pytest.raises(UserError, match=r"sweep\.loggers: unknown logger\(s\) 'mlfow'; allowed: tensorboard, "
                                        r"mlflow, wandb"):
        load_experiment(None, raw=sweep_raw(shared_data_dir, tmp_path, "s", {}, sweep={"loggers": ["mlfow"]}))
    with pytest.raises(UserError, match=r"^<config>: loggers: unknown logger\(s\) 'comet'"):
        load_experiment(None, raw=small_encoder_raw(shared_data_dir, loggers=["comet"]))
    with pytest.raises(UserError, match=r"sweep\.wandb\.projekt: unknown key; allowed keys: project, entity, group, "
                                        r"mode"):
        load_experiment(None, raw=sweep_raw(shared_data_dir, tmp_path, "s", {}, sweep={"wandb": {"projekt": "x"}}))


def test_settings_default_to_the_sweep_name_and_the_trackers_environment(monkeypatch):
    from raysdpb.config import MlflowConfig, WandbConfig
    from raysdpb.trackers import mlflow_settings, wandb_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert mlflow_settings(MlflowConfig(), "sw") == mlflow_settings(MlflowConfig(experiment_name="sw"), "x")
    assert mlflow_settings(MlflowConfig(), "sw").tracking_uri == "http://tracking:5000"
    assert mlflow_settings(MlflowConfig(tracking_uri="sqlite:///a.db"), "sw").tracking_uri == "sqlite:///a.db"
    settings = wandb_settings(WandbConfig(entity="team"), "sw", "sw")
    assert (settings.project, settings.group, settings.entity, settings.mode) == ("sw", "sw", "team", "offline")
    assert wandb_settings(WandbConfig(mode="disabled", project="p"), "sw", "sw").mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match=r"\$WANDB_MODE='sometimes' is not a W&B mode; allowed: online, offline"):
        wandb_settings(WandbConfig(), "sw", "sw")


def test_online_wandb_without_an_api_key_stops_the_sweep_before_ray(tmp_path, shared_data_dir):
    """No $WANDB_API_KEY and no saved login (a fresh home and W&B config folder), W&B online: one line, with --dry-run
    too; offline needs no key."""
    raw = sweep_raw(shared_data_dir, tmp_path / "results", "online", {}, sweep={"loggers": ["wandb"]})
    config = tmp_path / "online.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in sweep_env(**_wandb_env(tmp_path / "wb"), HOME=str(tmp_path / "home")).items()
           if k not in ("WANDB_API_KEY", "NETRC")}
    command = [sys.executable, "-m", "raysdpb.sweep", str(config), "--dry-run"]
    online = subprocess.run(command, cwd=tmp_path, env={**env, "WANDB_MODE": "online"}, capture_output=True,
                            text=True, timeout=120)
    assert online.returncode == 2, online.stderr[-3000:]
    assert online.stderr.strip().splitlines()[-1] == (
        f"raysdpb: error: {config}: sweep.wandb: W&B is online but has no API key: set WANDB_API_KEY or run `wandb "
        "login`, or log offline (sweep.wandb.mode: offline, or WANDB_MODE=offline) and upload with `wandb sync`")
    offline = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0 and "1 trials" in offline.stdout, offline.stderr[-3000:]


_WITHOUT = """
import sys
sys.modules[{module!r}] = None  # as if it were not installed: importing it raises ImportError
from raysdpb.errors import run_cli
from {cli} import main
sys.exit(run_cli(main, sys.argv[1:]))
"""


@pytest.mark.parametrize("cli, module, key, extra", [
    ("raysdpb.sweep.cli", "mlflow", "sweep.loggers", {"sweep": {"loggers": ["mlflow"]}}),
    ("raysdpb.sweep.cli", "wandb", "sweep.loggers", {"sweep": {"loggers": ["wandb"]}}),
    ("raysdpb.train", "wandb", "loggers", {"loggers": ["wandb"]}),
])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, shared_data_dir, cli, module, key, extra):
    raw = sweep_raw(shared_data_dir, tmp_path / "results", "missing", {})
    for name, value in extra.items():
        raw[name] = {**raw[name], **value} if isinstance(value, dict) else value
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-c", _WITHOUT.format(module=module, cli=cli), str(config), "--dry-run"
                          if cli.endswith("cli") else "-q"], cwd=tmp_path, env=sweep_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"raysdpb: error: {config}: {key}: logger {module!r} needs the {module} package, which is not installed "
        f"(import of {module} halted; None in sys.modules); install it with pip install 'raysdpb[trackers]' (or pip "
        f"install {module}), or remove {module} from {key}"]
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()  # nothing started


# --- --resume: the same run per trial ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resumed_sweep_goes_on_in_each_trials_runs(tmp_path, shared_data_dir, mlflow_server):
    """Two trials of 1 and 3 epochs, killed (driver and local Ray at once) when the short one has finished (its
    MLflow run too) and the long one has reported its first epoch and is held after step 5; then `--resume`.
    MLflow: still one run per trial, the same ones, their metric histories their curves.parquet rows, each step
    once. W&B: the long trial's resumed attempt writes a second offline folder under the same run id."""
    from mlflow import MlflowClient

    from raysdpb.results.storage import read_rows

    storage = tmp_path / "results"
    raw = sweep_raw(shared_data_dir, storage, "resumed", {"epochs": [1, 3]}, method="finetune",
                    sweep={"loggers": ["mlflow", "wandb"], "max_failures": 0})
    raw.pop("eval_every_steps")  # a report per epoch
    config = tmp_path / "resumed.yaml"
    config.write_text(yaml.safe_dump(raw))
    release = tmp_path / "release"
    env = sweep_env(MLFLOW_TRACKING_URI=mlflow_server, **_wandb_env(tmp_path / "wb"),
                    **fault_env({"point": "after_step", "step": 5, "where": {"epochs": 3}, "until": str(release)}))
    client = MlflowClient(mlflow_server)
    exp = storage / "resumed"
    first = subprocess.Popen([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], cwd=tmp_path, env=env,
                             start_new_session=True, stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trials did not get far enough in time"
            time.sleep(0.5)
            rows = {r["epochs"]: r for r in read_rows(str(exp / "trials.parquet"))}
            if not rows or rows[1]["status"] != "completed" or rows[3]["reports"] < 1:
                continue
            experiment = client.get_experiment_by_name("resumed")
            runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
            if runs.get(rows[1]["trial_id"]) and runs[rows[1]["trial_id"]].info.status == "FINISHED":
                break
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    short, long = rows[1]["trial_id"], rows[3]["trial_id"]
    assert runs[long].info.status == "RUNNING"

    release.touch()
    out = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-q", "--resume"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = {r["trial_id"]: r for r in read_rows(str(exp / "trials.parquet"))}
    assert trials[long]["status"] == "completed" and trials[long]["attempts"] == 2
    curves = read_rows(str(exp / "curves.parquet"))

    after = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(after) == {short, long}  # one run per trial, the same runs
    assert {n: r.info.run_id for n, r in after.items()} == {n: r.info.run_id for n, r in runs.items()}
    assert after[long].info.status == after[short].info.status == "FINISHED"
    for trial_id, run in after.items():
        rows_of = sorted((c for c in curves if c["trial_id"] == trial_id), key=lambda c: c["step"])
        for key in ("step", "epoch", "eval_accuracy", "train_loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert history == pytest.approx([(c["step"], float(c[key])) for c in rows_of]), (trial_id, key)

    # W&B: every attempt of a trial under the trial's one run id; the long trial's resumed attempt is a folder of
    # its own that holds every report of the trial (those up to its checkpoint sent again, then the new ones): the
    # killed attempt's folder may hold less, W&B had not written all of it
    uid = runs[long].data.tags["raysdpb.sweep_uid"][:8]
    by_trial: dict[str, list] = {}
    for folder in sorted((tmp_path / "wb" / "wandb").glob("offline-run-*")):
        run = wandb_run(folder)
        assert run.id in (f"{short}-{uid}", f"{long}-{uid}") and folder.name.endswith(run.id)
        by_trial.setdefault(run.name, []).append(run)
    assert len(by_trial[long]) == 2 and len(by_trial[short]) in (1, 2)  # (2: Tune had not saved its end)
    resumed = by_trial[long][-1]
    reports = sorted((c for c in curves if c["trial_id"] == long), key=lambda c: c["step"])
    assert [h["_step"] for h in resumed.history] == [c["step"] for c in reports]
    assert [h["eval_accuracy"] for h in resumed.history] == pytest.approx([c["eval_accuracy"] for c in reports])
    print(f"\nW&B offline folders: {len(by_trial[short])} of the short trial, 2 of the long one (its killed attempt's "
          f"steps: {[h['_step'] for h in by_trial[long][0].history]}; its resumed one's: "
          f"{[h['_step'] for h in resumed.history]})")
