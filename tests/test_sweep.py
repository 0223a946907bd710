"""The sweep on real Ray: planning and validation (no Ray), then real sweeps of a tiny BERT on SuperGLUE CB:
two DDP workers per trial with ASHA stopping a trial, an interrupted sweep resumed, and (slow, `-m slow`) a
two-node cluster and a LoRA decoder sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.sweep.checks import check_resources, max_concurrent_trials
from raysdpb.sweep.plan import describe_asha, plan_sweep
from trial_configs import fault_env, sweep_env

REPO = Path(__file__).resolve().parents[1]


def _raw(data_dir, storage, name, search, sweep=None, **trial) -> dict:
    raw = dict(task="superglue/cb", model="tiny-bert", method="dynsdpb", data_dir=str(data_dir), epochs=2,
               batch_size=8, eval_batch_size=16, max_length=32, max_train_samples=32, max_eval_samples=16,
               lr=1e-4, alpha=1.0, tau=2.0, seed=0, log_every_steps=1)
    raw.update(trial)
    raw["search"] = search
    raw["sweep"] = {"name": name, "storage_path": str(storage), "num_workers": 1, "cpus_per_worker": 1,
                    "keep_checkpoints": 1, "max_failures": 0, **(sweep or {})}
    return raw


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / f"{raw['sweep']['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(config: Path, *args: str, env: dict | None = None, timeout: float = 480,
           quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), *(["-q"] if quiet else []), *args],
                          cwd=config.parent, env=env or sweep_env(), capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# --- planning and validation, before Ray -------------------------------------------------------------------

def test_plan_defaults_to_the_tasks_main_metric_and_the_longest_trial(tmp_path, shared_data_dir):
    raw = _raw(shared_data_dir, tmp_path, "plan", {"method": ["finetune", "double_finetune"]}, epochs=3)
    plan = plan_sweep(load_experiment(None, raw=raw))
    assert plan.metric == "eval_accuracy" and plan.mode == "max"
    assert plan.max_t == 6  # double_finetune runs 2 x 3 epochs
    assert plan.experiment_path == f"{tmp_path}/plan"
    assert [t.planned_epochs for t in plan.trials] == [3, 6]


def test_plan_rejects_a_metric_not_every_trial_reports(tmp_path, shared_data_dir):
    raw = _raw(shared_data_dir, tmp_path, "p", {"task": ["glue/cola", "superglue/cb"]})
    # different main metrics: each trial's own one, reported as `score`, in one ASHA group per task
    plan = plan_sweep(load_experiment(None, raw=raw))
    assert plan.metric == "score"
    assert sorted(plan.score_metrics.values()) == ["eval_accuracy", "eval_matthews"]
    assert len(set(plan.asha_groups.values())) == 2
    assert ("score = each trial's main metric (glue/cola: eval_matthews, superglue/cb: eval_accuracy)"
            in describe_asha(plan))
    raw["sweep"]["asha"] = {"metric": "eval_accuracy"}  # both report accuracy
    assert plan_sweep(load_experiment(None, raw=raw)).metric == "eval_accuracy"
    raw["sweep"]["asha"] = {"metric": "eval_f1"}
    with pytest.raises(UserError, match=r"sweep\.asha\.metric: 'eval_f1' is not reported"):
        plan_sweep(load_experiment(None, raw=raw))
    raw["sweep"]["asha"] = {"grace_period": 9}
    raw["search"] = {}
    with pytest.raises(UserError, match=r"sweep\.asha\.grace_period"):
        plan_sweep(load_experiment(None, raw=raw))
    with pytest.raises(UserError, match=r"device: cuda needs sweep\.use_gpu"):
        plan_sweep(load_experiment(None, raw=_raw(shared_data_dir, tmp_path, "p", {}, device="cuda")))


NODES = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}},
         {"NodeID": "b", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}},
         {"NodeID": "c", "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]


@pytest.mark.parametrize("sweep, key", [
    ({"use_gpu": True, "gpus_per_worker": 8}, "sweep.gpus_per_worker"),
    ({"cpus_per_worker": 16}, "sweep.cpus_per_worker"),
    ({"use_gpu": True, "gpus_per_worker": 1, "num_workers": 9}, "sweep.num_workers"),
    ({"num_workers": 17}, "sweep.num_workers"),
])
def test_resources_a_trial_can_never_get_are_refused_naming_the_key(sweep, key):
    from raysdpb.config import SweepConfig

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        check_resources(SweepConfig(name="x", **sweep), NODES)


def test_no_gpu_in_the_cluster_and_concurrency():
    from raysdpb.config import SweepConfig

    with pytest.raises(UserError, match=r"sweep\.use_gpu: true, but no node"):
        check_resources(SweepConfig(name="x", use_gpu=True), [{"Resources": {"CPU": 2.0}}])
    check_resources(SweepConfig(name="x", use_gpu=True, num_workers=8, gpus_per_worker=1), NODES)
    assert max_concurrent_trials(SweepConfig(name="x", use_gpu=True, num_workers=2, gpus_per_worker=1), NODES) == 4
    assert max_concurrent_trials(SweepConfig(name="x", num_workers=2, cpus_per_worker=1), NODES) == 8
    assert max_concurrent_trials(SweepConfig(name="x", num_workers=2, cpus_per_worker=1),
                                 [{"Resources": {"CPU": 2.0}}]) == 1
    assert max_concurrent_trials(SweepConfig(name="x", max_concurrent_trials=3), NODES) == 3


def test_single_worker_trials_share_gpus_and_ddp_trials_take_whole_ones(tmp_path, shared_data_dir):
    """A quarter of a GPU per single-worker trial: the plan accepts it and four trials share each GPU (NODES: 8
    GPUs over the two live nodes, 32 shares, but 16 CPUs: 16 trials at a time, 32 at half a CPU each); two workers
    of one trial on shares are refused before Ray (tests/test_input_errors.py has the messages through the CLI)."""
    from raysdpb.config import SweepConfig
    from raysdpb.sweep.plan import check_gpu_shares

    shared = SweepConfig(name="x", use_gpu=True, gpus_per_worker=0.25)
    check_gpu_shares(shared)
    check_resources(shared, NODES)
    assert max_concurrent_trials(shared, NODES) == min(4 * 8, 16)
    assert max_concurrent_trials(SweepConfig(name="x", use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=0.5),
                                 NODES) == 32
    raw = _raw(shared_data_dir, tmp_path, "share", {"lr": [1e-4, 2e-4]},
               sweep={"use_gpu": True, "gpus_per_worker": 0.25})
    assert len(plan_sweep(load_experiment(None, raw=raw)).points) == 2
    check_gpu_shares(SweepConfig(name="x", use_gpu=True, num_workers=2, gpus_per_worker=1))
    check_gpu_shares(SweepConfig(name="x", use_gpu=False, num_workers=2, gpus_per_worker=0.5))  # CPU workers
    for sweep in (dict(num_workers=2, gpus_per_worker=0.5), dict(gpus_per_worker=2.5)):
        with pytest.raises(UserError, match=r"sweep\.gpus_per_worker"):
            check_gpu_shares(SweepConfig(name="x", use_gpu=True, **sweep))


def test_cli_dry_run_and_one_line_errors(tmp_path, shared_data_dir):
    config = _write(tmp_path, _raw(shared_data_dir, tmp_path / "results", "cli",
                                   {"method": ["finetune", "dynsdpb"], "alpha": [0.5, 1.0]}))
    out = _sweep(config, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-3].startswith("3 trials; metric eval_accuracy (max)")
    assert out.stdout.splitlines()[-2] == "search: grid (alpha: [0.5, 1.0], method: ['finetune', 'dynsdpb'])"
    assert out.stdout.splitlines()[-1] == ("ASHA: 2 group(s) by task/model/num_layers/method; grace_period 1, "
                                           "reduction_factor 2, max_t 2 (epoch); rungs at epoch 1, 2")
    bad = _sweep(config, "sweep.num_workerz=2")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("raysdpb: error:")
    assert "sweep.num_workerz: unknown key" in bad.stderr and "Traceback" not in bad.stderr
    missing = _sweep(config, "--resume")
    assert missing.returncode == 2 and "there is no sweep to resume" in missing.stderr


def test_a_sweep_of_an_older_raysdpb_is_not_resumed(tmp_path, shared_data_dir):
    """A sweep whose grid.json has no format (started before the format was recorded) or another one is refused on
    --resume with one line, before Ray starts: its pickled Tune state names classes this version no longer has."""
    import json

    from raysdpb.sweep.checks import check_experiment
    from raysdpb.sweep.plan import SWEEP_FORMAT

    plan = plan_sweep(load_experiment(None, raw=_raw(shared_data_dir, tmp_path, "old", {"lr": [1e-4, 2e-4]})))
    folder = Path(plan.experiment_path)
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"a Tune experiment's state")  # what Tuner.can_restore looks for
    ids = [p.trial_id for p in plan.points]
    for grid, found in (({"trial_ids": ids}, "format 1"), ({"format": SWEEP_FORMAT + 1, "trial_ids": ids},
                                                          f"format {SWEEP_FORMAT + 1}")):
        (folder / "grid.json").write_text(json.dumps(grid))
        with pytest.raises(UserError, match=rf"started by an older raysdpb \({found};.*start a new sweep"):
            check_experiment(plan, resume=True)
    (folder / "grid.json").write_text(json.dumps({"format": SWEEP_FORMAT, "trial_ids": ids}))
    check_experiment(plan, resume=True)  # this version's own
    with pytest.raises(UserError, match="a sweep already exists"):
        check_experiment(plan, resume=False)


# --- real sweeps --------------------------------------------------------------------------------------------

def test_sweep_ddp_workers_asha_and_parquet(tmp_path, shared_data_dir):
    """Two gloo DDP workers per trial running DynSDPB's overlap sampler; ASHA (on train_loss, which a huge
    learning rate ruins at once) stops the second trial at its first rung; the Parquet files tell it all."""
    storage = tmp_path / "results"
    raw = _raw(shared_data_dir, storage, "ddp", {"lr": [1e-4, 0.5]},
               sweep={"num_workers": 2, "asha": {"metric": "train_loss", "mode": "min", "grace_period": 1,
                                                  "reduction_factor": 2}})
    out = _sweep(_write(tmp_path, raw), quiet=False)  # the default console (raysdpb.sweep.console)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "best trial per method by train_loss (min)" in out.stdout
    exp = storage / "ddp"

    trials = {r["lr"]: r for r in _rows(exp / "trials.parquet")}
    assert set(trials) == {1e-4, 0.5}
    good, bad = trials[1e-4], trials[0.5]
    assert good["status"] == "completed" and good["epochs_run"] == 2 and good["stop_reason"] == "ran all 2 epochs"
    assert bad["status"] == "stopped_by_asha" and bad["epochs_run"] == 1
    assert bad["stop_reason"].startswith("ASHA stopped it at epoch 1: train_loss=")
    assert bad["best_train_loss"] > good["best_train_loss"]
    for row in (good, bad):
        assert row["last_world_size"] == 2  # both DDP ranks ran
        assert row["cpus_per_trial"] == 2.0 and row["gpus_per_trial"] == 0.0  # what it held (the report's cost)
        assert row["method"] == "dynsdpb" and row["task"] == "superglue/cb" and row["batch_size"] == 8
        assert 0.0 <= row["best_eval_accuracy"] <= 1.0 and 0.0 <= row["last_eval_macro_f1"] <= 1.0
        assert row["wall_time_s"] > 0 and row["attempts"] == 1 and row["message"] == ""
    columns = pq.read_table(exp / "trials.parquet").column_names
    assert {"trial_id", "label", "status", "stop_reason", "epochs_run", "wall_time_s", "alpha", "tau", "seed",
            "best_eval_accuracy", "last_eval_accuracy", "best_train_loss", "last_alpha_mean", "last_tau_mean",
            "last_worker_node_id"} <= set(columns)

    # the console: a line per trial event and the sweep's summary; none of Tune's tables, Ray Train's per-report
    # lines or the workers' logs
    lines = out.stdout.splitlines()
    events = [line for line in lines if line.startswith("[")]
    for row in (good, bad):
        mine = [line.split("] ", 1)[1] for line in events if f"] {row['trial_id']} " in line]
        assert mine[0] == f"{row['trial_id']} ({row['label']}) started", mine
        assert len(mine) == row["epochs_run"] + 2, mine  # started, each epoch's report, how it ended
        for epoch, line in enumerate(mine[1:-1], 1):
            assert line.startswith(f"{row['trial_id']} epoch {epoch} step ") and ": train_loss=" in line, mine
    assert f"] {good['trial_id']} completed: ran all 2 epochs" in out.stdout
    assert f"] {bad['trial_id']} stopped by ASHA: {bad['stop_reason']}" in out.stdout
    assert events[-1].endswith(" elapsed") and "2/2 done (1 stopped by ASHA) | 0 running | 0 pending |" in events[-1]
    assert f"best train_loss: dynsdpb {good['best_train_loss']:.4g}" in events[-1]
    for noise in ("Trial status", "Reporting training result", "Checkpoint successfully created", "INFO"):
        assert noise not in out.stdout + out.stderr
    assert len(lines) < 25, out.stdout

    curves = _rows(exp / "curves.parquet")
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == sorted(
        [(good["trial_id"], 1), (good["trial_id"], 2), (bad["trial_id"], 1)])
    good_curve = [c for c in curves if c["trial_id"] == good["trial_id"]]
    assert good_curve[0]["step"] < good_curve[1]["step"]
    # samples seen over both ranks: 32 examples, halves of 4 per rank, so 4 halves a rank an epoch; the first
    # epoch's 3 batches of 8 on 2 ranks, then 4 more
    assert [c["samples_seen"] for c in good_curve] == [48, 112]
    assert (good["samples_seen"], bad["samples_seen"]) == (112, 48)
    assert {"step", "epoch", "eval_accuracy", "train_loss", "train_distill", "alpha_mean", "tau_mean", "lr",
            "training_iteration", "time_total_s"} <= set(pq.read_table(exp / "curves.parquet").column_names)

    # TensorBoard: the engine's per-step scalars and Tune's per-report metrics, under the experiment folder
    for row in (good, bad):
        assert list((exp / "tensorboard" / row["trial_id"]).glob("events.out.tfevents.*"))
        assert list((exp / row["trial_id"]).glob("events.out.tfevents.*"))
    # lean storage (raysdpb.sweep.cleanup), keep_weights at its default of 1: both trials finished (one completed,
    # one stopped by ASHA) and share task, model and method, so only the better by the task's main metric (ties: the
    # first in grid order, `good`) keeps a checkpoint, its best by the sweep's metric, slimmed to its weights
    main = f"best_{good['main_metric']}"
    winner, loser = (good, bad) if good[main] >= bad[main] else (bad, good)
    kept = list((exp / "train_runs" / winner["trial_id"]).glob("checkpoint_step_*"))
    assert len(kept) == 1 and not list((exp / "train_runs" / loser["trial_id"]).glob("checkpoint_step_*"))
    assert sorted(f.name for f in kept[0].iterdir()) == ["model.safetensors", "raysdpb_manifest.json",
                                                         "raysdpb_report.json"]
    assert json.loads((kept[0] / "raysdpb_report.json").read_text())[-1]["train_loss"] == winner["best_train_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """End a process started with start_new_session=True and everything it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray head (1 CPU) and a second node (1 CPU) on this machine, each a `ray start --block` process group.
    Yields `env` (the sweep's environment, RAY_ADDRESS set), `address` and `worker` (the second node's process
    group). A lost node is noticed in about 3 s (health checks every second, 3 missed), not the default 15 s."""
    env = sweep_env(RAY_AUTH_MODE="token", RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    port = _free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--block", "--disable-usage-stats"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={_free_port()}", *common],
            env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        procs.append(subprocess.Popen(
            ["ray", "start", f"--address={address}", f"--dashboard-agent-listen-port={_free_port()}", *common],
            env=env, start_new_session=True, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        while "2 node" not in _nodes_line(address, env):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield SimpleNamespace(env={**env, "RAY_ADDRESS": address}, address=address, worker=procs[1])
    finally:
        for proc in reversed(procs):
            _stop_group(proc, timeout=5)
        # `ray start --head` recorded this cluster as the machine's current one; it is gone now
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _nodes_line(address: str, env: dict) -> str:
    code = f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(len(ray.nodes()), 'node')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout


# slow (~100 s: two Ray nodes and their trials); the default suite's sweeps all run on one local node
@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, shared_data_dir, two_node_cluster):
    storage = tmp_path / "shared-storage"  # one folder both nodes see (a stand-in for NFS or S3)
    raw = _raw(shared_data_dir, storage, "cluster", {"task": ["glue/cola", "superglue/cb"]}, method="finetune",
               epochs=1, sweep={"asha": None})
    out = _sweep(_write(tmp_path, raw), env=two_node_cluster.env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(storage / "cluster" / "trials.parquet")
    assert [r["status"] for r in rows] == ["completed", "completed"]
    # one CPU per node and one 1-CPU worker per trial: the two trials ran at once, one on each node
    assert len({r["last_worker_node_id"] for r in rows}) == 2
    # two tasks with different main metrics: each trial's `score` is its own task's main metric
    assert "best trial per method by score (max)" in out.stdout
    by_task = {r["task"]: r for r in rows}
    assert by_task["glue/cola"]["last_score"] == by_task["glue/cola"]["last_eval_matthews"]
    assert by_task["superglue/cb"]["last_score"] == by_task["superglue/cb"]["last_eval_accuracy"]
    assert by_task["superglue/cb"]["best_score"] == by_task["superglue/cb"]["best_eval_accuracy"]


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` node: the raylet and every process under it (Ray's workers are not all in
    its process group), as a machine that is reclaimed takes them all at once."""
    import psutil

    root = psutil.Process(node.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _head_node_id(address: str, env: dict) -> str:
    code = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
            "print(next(n['NodeID'] for n in ray.nodes() if 'node:__internal_head__' in n['Resources']))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_a_lost_node_s_trial_resumes_on_the_remaining_node(tmp_path, shared_data_dir, two_node_cluster, capsys):
    """A spot reclaim on the two-node local cluster: the second node's raylet, and every process it runs, is
    SIGKILLed mid-trial (its local scratch with them). The trial that was on it resumes on the head from its last
    checkpoint on the shared storage, the other trial runs undisturbed, each report is recorded once and the sweep
    completes. Both trials are held once after step 5 (a report and a checkpoint at step 4; each hold leaves a
    marker file), so the node dies at a known step; the timeline is printed."""
    storage = tmp_path / "shared-storage"
    raw = _raw(shared_data_dir, storage, "lost", {"seed": [0, 1]}, method="finetune", eval_every_steps=2,
               sweep={"asha": None, "max_failures": 2})
    release, held = tmp_path / "release", [tmp_path / f"held-{seed}" for seed in (0, 1)]
    env = {**two_node_cluster.env, **fault_env(*({"point": "after_step", "step": 5, "where": {"seed": seed},
                                                   "marker": str(held[seed]), "until": str(release)}
                                                  for seed in (0, 1)))}
    sweep = subprocess.Popen([sys.executable, "-m", "raysdpb.sweep", str(_write(tmp_path, raw)), "-q"], cwd=tmp_path,
                             env=env, start_new_session=True, stdout=open(tmp_path / "sweep.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not all(marker.exists() for marker in held):  # both trials at their hold, one on each node
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trials did not reach step 5 in time"
            time.sleep(0.5)
        t_kill = time.time()
        _kill_node(two_node_cluster.worker)  # the node is gone, with every process it ran and its scratch
        release.touch()
        sweep.wait(480)
        t_done = time.time()
    finally:
        _stop_group(sweep, timeout=5)
    assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    head = _head_node_id(two_node_cluster.address, two_node_cluster.env)
    rows = {r["trial_id"]: r for r in _rows(storage / "lost" / "trials.parquet")}
    assert [r["status"] for r in rows.values()] == ["completed", "completed"]
    curves = _rows(storage / "lost" / "curves.parquet")
    first_node = {t: next(c["worker_node_id"] for c in sorted(curves, key=lambda c: c["step"]) if c["trial_id"] == t)
                  for t in rows}
    [lost] = [t for t in rows if first_node[t] != head]  # the trial that ran on the second node
    [kept] = [t for t in rows if first_node[t] == head]
    assert rows[lost]["last_worker_node_id"] == head  # it finished on the remaining node
    for trial_id in rows:
        steps = [c["step"] for c in curves if c["trial_id"] == trial_id]
        assert sorted(steps) == sorted(set(steps)) and max(steps) == rows[trial_id]["steps"]  # each report once
    resumed = sorted((c for c in curves if c["trial_id"] == lost and c.get("resumed_from_step")),
                     key=lambda c: c["step"])
    assert resumed and resumed[0]["resumed_from_step"] == 4  # from its step-4 checkpoint, not from scratch
    # the other trial's worker was on the head, but its Tune trial (a 0-CPU actor) may have been on the lost node;
    # then Tune retried it too, from its newest checkpoint
    assert all(c["resumed_from_step"] >= 4 for c in curves if c["trial_id"] == kept and c.get("resumed_from_step"))
    first_new = next(c for c in resumed if c["step"] > c["resumed_from_step"])  # not a report sent again
    with capsys.disabled():
        print(f"\nnode loss timeline: the node killed at 0 s (trial {lost} held after step 5); the first new report of "
              f"its resumed run (step {first_new['step']}) at {first_new['timestamp'] - t_kill:+.0f} s; the other "
              f"trial done at {rows[kept]['finished_at'] - t_kill:+.0f} s; the lost one at "
              f"{rows[lost]['finished_at'] - t_kill:+.0f} s; the sweep done at {t_done - t_kill:+.0f} s")


# on S3 (a real S3 API server on loopback, conftest.s3_server) slow: the local run is the same path but the storage
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, shared_data_dir, where, request):
    """Two trials side by side, of 1 and 3 (short) epochs. The sweep is killed (driver and local Ray at once) when the
    short one has finished and the long one has reported (and checkpointed) its first epoch; `--resume` must
    leave the finished trial alone and continue the other from its checkpoint. The long trial is held after step
    5, the first of its second epoch (`$RAYSDPB_FAULTS`), so it cannot run ahead while Ray Train shuts the short
    one down (up to 12 s on 2 busy cores); the resumed run gets past it. With the experiment in a bucket, the
    `finished/` markers and the Parquet files are objects written whole, with no rename."""
    from raysdpb.results.storage import join, read_rows

    s3 = request.getfixturevalue("s3") if where == "s3" else None  # the bucket, and its settings in this process
    storage = s3.uri(f"resume-{tmp_path.name}") if s3 else str(tmp_path / "results")
    config = _write(tmp_path, _raw(shared_data_dir, storage, "resume", {"epochs": [1, 3]}, method="finetune",
                                   sweep={"asha": None}))
    exp = join(storage, "resume")
    release = tmp_path / "release"
    env = sweep_env(**(s3.env if s3 else {}),
                    **fault_env({"point": "after_step", "step": 5, "where": {"epochs": 3}, "until": str(release)}))
    first = subprocess.Popen([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], cwd=tmp_path, env=env,
                             start_new_session=True, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the trials did not get far enough in time"
            time.sleep(0.5)
            before = {r["epochs"]: r for r in read_rows(join(exp, "trials.parquet"))}
            if not before:
                continue
            if before[1]["status"] == "completed" and before[3]["reports"] >= 1:
                break
        before_curves = {(c["trial_id"], c["step"]): c["timestamp"] for c in read_rows(join(exp, "curves.parquet"))}
    finally:
        # a crash: the driver and the local Ray it started die at once, with no chance to save anything
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    short, long = before[1], before[3]
    assert long["status"] == "running" and long["epochs_run"] == 1

    release.touch()
    out = _sweep(config, "--resume", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["epochs"]: r for r in read_rows(join(exp, "trials.parquet"))}
    assert len(read_rows(join(exp, "trials.parquet"))) == 2  # every trial once
    assert rows[1]["status"] == rows[3]["status"] == "completed" and rows[3]["epochs_run"] == 3
    # the finished trial was not trained again: same row, same reports
    assert rows[1]["attempts"] == 1 and rows[1]["finished_at"] == short["finished_at"]
    # the other continued from its checkpoint: its first attempt's reports stand, it did not redo them
    assert rows[3]["attempts"] == 2
    curves = read_rows(join(exp, "curves.parquet"))
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == sorted(
        [(short["trial_id"], 1)] + [(long["trial_id"], e) for e in range(1, 4)])
    for c in curves:
        if (c["trial_id"], c["step"]) in before_curves:
            assert before_curves[(c["trial_id"], c["step"])] == c["timestamp"]
    assert len([k for k in before_curves if k[0] == long["trial_id"]]) >= 1


@pytest.mark.parametrize("name, trials, metric", [("quickstart", 10, "eval_accuracy"),
                                                  ("superglue", 1305, "eval_accuracy"),
                                                  ("glue", 1764, "score"), ("heatmap", 60, "eval_accuracy"),
                                                  ("nlg", 600, "eval_exact_match"),
                                                  ("nlg-quickstart", 6, "eval_exact_match")])
def test_the_shipped_sweep_files_plan(name, trials, metric):
    """Every file in sweeps/ validates and expands to the grid its header describes."""
    plan = plan_sweep(load_experiment(REPO / "sweeps" / f"{name}.yaml"))
    assert len(plan.points) == trials and plan.metric == metric
    assert len({p.trial_id for p in plan.points}) == trials


def test_an_offline_hub_without_a_mirror_stops_the_sweep_before_ray(tmp_path, shared_data_dir, monkeypatch):
    from raysdpb.sweep.checks import check_data

    raw = _raw(shared_data_dir, tmp_path, "offline", {})
    del raw["data_dir"]
    monkeypatch.delenv("RAYSDPB_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = plan_sweep(load_experiment(None, raw=raw))
    with pytest.raises(UserError, match=r"task superglue/cb: no data_dir and no \$RAYSDPB_DATA_DIR, and the Hugging "
                                        r"Face hub is offline .*set RAYSDPB_DATA_DIR"):
        check_data(plan)
    monkeypatch.setenv("RAYSDPB_DATA_DIR", str(shared_data_dir))  # the mirror: read and checked, no error
    check_data(plan)
    monkeypatch.delenv("RAYSDPB_DATA_DIR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the workers will read the hub
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    check_data(plan)


def test_a_missing_model_stops_the_sweep_before_ray_unless_a_cluster_worker_may_have_it(tmp_path, shared_data_dir,
                                                                                       caplog):
    """Each distinct model of the grid is checked once, by its config: the first missing one is the error; on a
    cluster a local folder this machine lacks is a warning (the workers have their own disks)."""
    from raysdpb.sweep.checks import check_models

    model_dir = tmp_path / "my-model"
    raw = _raw(shared_data_dir, tmp_path, "models", {"model": ["tiny-bert", "minilm-l6", str(model_dir)]})
    plan = plan_sweep(load_experiment(None, raw=raw))
    with pytest.raises(UserError, match=f"model: '{model_dir}' is no folder on this machine"):
        check_models(plan)
    with caplog.at_level("WARNING", logger="raysdpb.sweep"):
        check_models(plan, cluster=True)
    assert f"model folder {model_dir} is not on this machine" in caplog.text
    model_dir.mkdir()  # there, but holding no model: an error on a cluster too
    with pytest.raises(UserError, match=f"model '{model_dir}' could not be loaded from '{model_dir}'"):
        check_models(plan, cluster=True)
    from transformers import BertConfig

    tiny = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    tiny.save_pretrained(model_dir)
    check_models(plan)  # its config reads: fine
    deeper = plan_sweep(load_experiment(None, raw={**raw, "num_layers": 3}))
    with pytest.raises(UserError, match="num_layers=3 exceeds the 2 layers of"):
        check_models(deeper)


# slow (~85 s): the decoder trial's loop, LoRA and predictions are in test_decoder's in-process tests
@pytest.mark.slow
def test_a_decoder_sweep_saves_its_predictions_and_the_before_score(tmp_path, shared_data_dir):
    """A LoRA decoder trial on Ray: exact match before and after training in trials.parquet, and every
    generated answer of both evaluations under <experiment>/artifacts/<trial_id>/predictions."""
    storage = tmp_path / "results"
    raw = _raw(shared_data_dir, storage, "nlg", {}, task="nlg/gsm8k", model="tiny-llama", method="dynsdpb", epochs=1,
               batch_size=2, eval_batch_size=4, max_length=96, max_train_samples=6, max_eval_samples=4,
               max_new_tokens=4, eval_before_training=True, lora={"r": 4, "alpha": 8, "dropout": 0.0},
               sweep={"asha": None})
    out = _sweep(_write(tmp_path, raw))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = _rows(storage / "nlg" / "trials.parquet")
    assert row["status"] == "completed"
    assert 0.0 <= row["last_initial_eval_exact_match"] <= 1.0 and 0.0 <= row["last_eval_exact_match"] <= 1.0
    files = sorted((storage / "nlg" / "artifacts" / row["trial_id"] / "predictions").glob("*.jsonl"))
    assert [f.name for f in files] == ["eval_step00000000.jsonl", f"eval_step{row['steps']:08d}.jsonl"]
    for f in files:
        predictions = [json.loads(line) for line in f.read_text().splitlines()]
        assert [p["idx"] for p in predictions] == [0, 1, 2, 3]
        assert {"output", "prediction", "reference", "correct"} <= set(predictions[0])
    last = [json.loads(line) for line in files[-1].read_text().splitlines()]
    assert sum(p["correct"] for p in last) / 4 == row["last_eval_exact_match"]


# slow (a Ray trial): the split, the seeds and the saved predictions are in test_heldout's and test_engine's
# in-process tests
@pytest.mark.slow
def test_a_sweep_selects_on_the_heldout_dev_split_and_saves_predictions(tmp_path, shared_data_dir):
    """One encoder trial on Ray with a held-out dev split, a data_seed and save_predictions: the sweep's metric and
    the trial's main metric are eval_dev_accuracy, both splits are in trials.parquet, and the predictions under
    <experiment>/artifacts/<trial_id>/predictions give the last reported scores exactly."""
    from raysdpb.metrics import compute_metrics
    from raysdpb.tasks import get_task

    storage = tmp_path / "results"
    raw = _raw(shared_data_dir, storage, "dev", {}, method="finetune", epochs=1, heldout_dev={"size": 20, "seed": 2},
               data_seed=5, save_predictions=True, sweep={"asha": None})
    out = _sweep(_write(tmp_path, raw))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = _rows(storage / "dev" / "trials.parquet")
    assert row["status"] == "completed" and row["main_metric"] == "eval_dev_accuracy" and row["data_seed"] == 5
    folder = storage / "dev" / "artifacts" / row["trial_id"] / "predictions"
    assert sorted(p.name for p in folder.iterdir()) == [f"{name}_step{row['steps']:08d}.parquet"
                                                        for name in ("dev", "eval")]
    task = get_task("superglue/cb")
    for name, prefix, count in (("dev", "dev_", 20), ("eval", "", 16)):
        table = pq.read_table(folder / f"{name}_step{row['steps']:08d}.parquet").to_pydict()
        assert len(table["idx"]) == count
        for metric, value in compute_metrics(task.metrics, table["prediction"], table["label"]).items():
            assert row[f"last_eval_{prefix}{metric}"] == value


def test_the_console_summary_line_counts_trials_and_estimates_the_time_left():
    """`sweep_line` against a hand-made sweep: 3 of 6 trials done (one stopped by ASHA, one errored), 2 running
    (for 40 s and 200 s), 1 pending; trials that took 100, 200 and 120 s from start to end (mean 140 s), 2 at a
    time: (140 - 40) + 0 (past the mean) + 140 for the pending one = 240 s of work, over 2 at a time = 120 s."""
    from raysdpb.sweep.console import format_duration, sweep_line

    def row(method, status, score=None):
        return {"method": method, "status": status, "best_eval_accuracy": score}

    rows = [row("finetune", "completed", 0.70), row("dynsdpb", "stopped_by_asha", 0.60), row("dynsdpb", "errored"),
            row("dynsdpb", "running", 0.75), row("finetune", "running", 0.5), row("finetune", "pending")]
    line = sweep_line(rows, "eval_accuracy", "max", elapsed_s=3725.0, concurrent=2, durations=[100.0, 200.0, 120.0],
                      running_for=[40.0, 200.0])
    assert line == ("3/6 done (1 stopped by ASHA, 1 errored) | 2 running | 1 pending | best eval_accuracy: dynsdpb "
                    "0.75, finetune 0.7 | 1h02m elapsed | ~2m00s left")
    assert format_duration(59.9) == "0m59s" and format_duration(7200) == "2h00m"
    # nothing ended yet in this run: no estimate
    assert sweep_line(rows[-1:], "eval_accuracy", "max", 5.0, 1) == "0/1 done | 0 running | 1 pending | 0m05s elapsed"


def test_dry_run_shows_the_rungs_in_the_chosen_unit(tmp_path, shared_data_dir):
    raw = _raw(shared_data_dir, tmp_path, "rungs", {}, epochs=3)
    raw["sweep"]["asha"] = {"grace_period": 0.25, "reduction_factor": 2}
    plan = plan_sweep(load_experiment(None, raw=raw))
    assert "grace_period 0.25, reduction_factor 2, max_t 3 (epoch); rungs at epoch 0.25, 0.5, 1, 2" in \
        describe_asha(plan)
    raw["sweep"]["asha"] = {"time_attr": "samples_seen", "grace_period": 64, "max_t": 192, "reduction_factor": 3}
    assert "max_t 192 (samples_seen); rungs at samples_seen 64, 192" in describe_asha(
        plan_sweep(load_experiment(None, raw=raw)))
