"""The GPU Ray check's pieces that can be checked in seconds, without a download or a GPU (the check itself runs on
the lent GPU machine; its CPU rehearsal, by hand, is recorded in benchmarks/results/gpu_ray_rehearsal/):

* scripts/gpu_ray_wheels.py: stripping a wheel leaves one pip really installs, with the dropped parts gone and the
  rest intact; the wheel set is the roots' closure through what the image lacks;
* scripts/gpu_ray_probe.py: step times from step start times;
* scripts/gpu_ray_driver.py: the checks read from real Parquet files and probe files, the summary JSON, and the
  size a device call would send;
* scripts/gpu_ray_check.sh: its modes and the errors of a wrong call."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_ray_driver as driver  # noqa: E402
import gpu_ray_wheels as wheels  # noqa: E402
from gpu_ray_probe import step_time_stats  # noqa: E402


# --- a wheel, stripped --------------------------------------------------------------------------------------------

def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def _make_wheel(folder: Path) -> Path:
    """A small wheel laid out like Ray's: a package with a Java jar, RLlib, tests and a dashboard client."""
    files = {
        "toyray/__init__.py": b"VERSION = '1.0'\n",
        "toyray/core.py": b"def answer():\n    return 42\n",
        "toyray/jars/dist.jar": os.urandom(4096),
        "toyray/rllib/__init__.py": b"raise ImportError('not here')\n",
        "toyray/train/__init__.py": b"",
        "toyray/train/tests/test_x.py": b"def test(): pass\n",
        "toyray/dashboard/client/build/index.html": b"<html></html>",
        "toyray/dashboard/head.py": b"HEAD = 1\n",
        "toyray-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: toyray\nVersion: 1.0\n",
        "toyray-1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "toyray-1.0.dist-info/entry_points.txt":
            b"[console_scripts]\ntoyray = toyray.core:answer\nrllib = toyray.rllib:main\n",
    }
    wheel = folder / "toyray-1.0-py3-none-any.whl"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        [_record_line(n, d) for n, d in files.items()] + [["toyray-1.0.dist-info/RECORD", "", ""]])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("toyray-1.0.dist-info/RECORD", buffer.getvalue())
    return wheel


DROP = [wheels.re.compile(p) for p in (r"^toyray/jars/", r"^toyray/rllib/", r"^toyray/(.+/)?tests/",
                                       r"^toyray/dashboard/client/build/")]


def test_a_stripped_wheel_installs_without_the_dropped_parts(tmp_path):
    src = _make_wheel(tmp_path)
    result = wheels.strip_wheel(src, tmp_path / "out", DROP, {"rllib"})
    assert result.wheel.name == src.name and result.removed_files == 4 and result.kept_files == 7
    assert result.removed_scripts == ["rllib"]
    wheels.check_record(result.wheel)  # RECORD: every file left, with its hash and size

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(result.wheel)], check=True, capture_output=True)
    installed = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert {"toyray/core.py", "toyray/dashboard/head.py", "toyray/train/__init__.py", "bin/toyray"} <= installed
    assert not [p for p in installed if "/jars/" in p or "/rllib/" in p or "/tests/" in p or "/client/" in p]
    assert "bin/rllib" not in installed
    out = subprocess.run([sys.executable, "-c", "import toyray.core; print(toyray.core.answer())"],
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42"


def test_a_wheel_travels_as_an_xz_tarball_that_unpacks_to_its_files(tmp_path):
    """Ray's stripped wheel travels as `<name>.tar.xz` (smaller): unpacked with tar it gives the wheel's files, byte
    for byte, with their modes (an executable stays one), and the package imports from there; the wheel is gone."""
    src = _make_wheel(tmp_path)
    wheel = tmp_path / "exec" / src.name
    wheel.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(wheel, "w") as zout:
        for info in zin.infolist():
            if info.filename == "toyray/core.py":
                info.external_attr = 0o100755 << 16  # as Ray's gcs_server and raylet binaries are recorded
            zout.writestr(info, zin.read(info))
    tarball = wheels.wheel_to_tarball(wheel)
    assert tarball.name == "toyray-1.0-py3-none-any.tar.xz" and not wheel.exists()
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(["tar", "-xJf", str(tarball), "-C", str(site)], check=True)
    with zipfile.ZipFile(src) as z:
        expected = {n: z.read(n) for n in z.namelist()}
    unpacked = {p.relative_to(site).as_posix(): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert unpacked == expected
    assert os.access(site / "toyray" / "core.py", os.X_OK) and not os.access(site / "toyray" / "train" /
                                                                             "__init__.py", os.X_OK)
    out = subprocess.run([sys.executable, "-c", "import toyray.core; print(toyray.core.answer())"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42"


def test_a_wrong_record_is_caught_and_a_wheel_is_never_stripped_onto_itself(tmp_path):
    src = _make_wheel(tmp_path)
    tampered = tmp_path / "bad" / src.name
    tampered.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b"# changed\n" if info.filename == "toyray/core.py" else data)
    with pytest.raises(ValueError, match="toyray/core.py"):
        wheels.check_record(tampered)
    with pytest.raises(ValueError, match="overwrite"):
        wheels.strip_wheel(src, tmp_path, DROP)


def _node(name: str, version: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_the_wheel_set_is_the_closure_through_what_the_image_lacks():
    report = {"install": [
        _node("ray", "2.60.0", "click>=7", "jsonschema", "numpy; extra == 'data'", "pydantic; python_version < '3.14'"),
        _node("click", "8.0"), _node("jsonschema", "4.26", "referencing", "attrs"),
        _node("referencing", "0.37", "rpds-py"), _node("rpds_py", "1.0"), _node("attrs", "26.1"),
        _node("pydantic", "2.13.4", "pydantic-core==2.46.4", "typing_extensions"), _node("pydantic-core", "2.46.4"),
        _node("typing-extensions", "4.16"), _node("numpy", "2.4"),
        _node("datasets", "5.2.0", "pandas", "dill<0.4.2", "multiprocess"), _node("pandas", "3.1", "tzdata"),
        _node("tzdata", "2026.6"), _node("dill", "0.4.1"), _node("multiprocess", "0.70.19", "dill>=0.4"),
        _node("google-auth", "2.63", "cryptography"), _node("cryptography", "51")]}
    image = frozenset({"click", "attrs", "typing-extensions", "numpy", "pandas"})
    chosen = wheels.select(report, ["ray==2.60.0", "datasets==5.2.0", "google-auth"], image, {"cryptography"},
                           "3.12")
    assert [p["name"] for p in chosen] == ["datasets", "dill", "google-auth", "jsonschema", "multiprocess",
                                           "pydantic", "pydantic-core", "ray", "referencing", "rpds_py"]
    # pandas is the image's: its tzdata is not brought; numpy only for an extra; cryptography skipped
    assert {p["name"]: p["requires"] for p in chosen}["ray"] == ["click", "jsonschema", "pydantic"]
    # on 3.14 the marker leaves pydantic out of ray's needs
    on_314 = wheels.select(report, ["ray"], image, set(), "3.14")
    assert [p["name"] for p in on_314] == ["jsonschema", "ray", "referencing", "rpds_py"]


def test_the_image_list_holds_what_the_device_readme_says_and_not_what_the_check_brings():
    assert {"torch", "transformers", "peft", "pyarrow", "pyyaml", "scikit-learn", "tensorboard", "pandas"} \
        <= wheels.IMAGE_PACKAGES
    brought = {wheels.normalize(Requirement(r).name) for r in wheels.ROOTS}
    assert {"ray", "pydantic", "datasets", "tensorboardx"} <= brought
    assert not brought & wheels.IMAGE_PACKAGES


# --- the probe's step time -------------------------------------------------------------------------------------

def test_step_time_stats_leave_out_evaluation_gaps():
    starts = [0.0, 0.1, 0.2, 0.3, 2.3, 2.4, 2.5]  # five 0.1 s steps and one 2 s gap (an evaluation)
    stats = step_time_stats(starts)
    assert stats["step_time_median_s"] == pytest.approx(0.1)
    assert stats["step_time_mean_s"] == pytest.approx(0.1) and stats["gaps_left_out"] == 1
    assert stats["steps_timed"] == 5
    assert step_time_stats([1.0])["step_time_median_s"] is None


# --- the driver's checks and summary -------------------------------------------------------------------------------

def _experiment(tmp_path: Path, rows: list[dict], curves: list[dict], events: bool = True) -> Path:
    exp = tmp_path / "grid"
    exp.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), exp / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(curves), exp / "curves.parquet")
    for row in rows if events else []:
        for folder in (exp / "tensorboard" / row["trial_id"], exp / row["trial_id"]):
            folder.mkdir(parents=True)
            (folder / "events.out.tfevents.1.host").write_bytes(b"\0")
    return exp


def _row(tid: str, method: str, lr: float, status: str) -> dict:
    return {"trial_id": tid, "label": f"lr={lr:g},method={method}", "method": method, "lr": lr, "status": status,
            "stop_reason": "", "epochs_run": 2 if status == "completed" else 1, "steps": 8, "wall_time_s": 3.0,
            "attempts": 1, "best_train_loss": 1.0, "best_eval_accuracy": 0.5, "last_world_size": 1}


def _probe(tmp_path: Path, tid: str, dtype: str | None, device: str = "cuda:0") -> None:
    probe = {"trial_id": tid, "rank": 0, "pid": 7, "device": device, "gpu_name": "NVIDIA H100", "autocast_dtype": dtype,
             "linear_output_dtypes": [dtype or "float32"], "steps": 8, "step_time_median_s": 0.01}
    (tmp_path / f"probe-{tid}.json").write_text(json.dumps(probe))


def test_grid_checks_pass_a_good_grid_and_name_each_fault(tmp_path):
    rows = [_row("a", "finetune", 1e-4, "completed"), _row("b", "finetune", 0.5, "stopped_by_asha")]
    exp = _experiment(tmp_path, rows, [{"trial_id": "a", "step": 4, "epoch": 1.0},
                                       {"trial_id": "b", "step": 4, "epoch": 1.0}])
    for tid in "ab":
        _probe(tmp_path, tid, "bfloat16")
    trials = driver.trial_summaries(driver.read_rows(exp / "trials.parquet"), driver.read_probes(tmp_path))
    assert [t["workers"][0]["gpu_name"] for t in trials] == ["NVIDIA H100"] * 2
    assert trials[0]["step_time_median_s"] == 0.01
    assert driver.check_grid(exp, trials, 2) == []
    assert driver.check_precision(trials, "cuda", bf16=True) == []

    # ASHA stopped nothing, a trial without events, and one that ran in fp32 on the CPU
    rows[1]["status"] = "completed"
    bad = tmp_path / "bad"
    bad.mkdir()
    exp = _experiment(bad, rows, [{"trial_id": "a", "step": 4, "epoch": 1.0}], events=False)
    _probe(bad, "a", None, device="cpu")
    trials = driver.trial_summaries(driver.read_rows(exp / "trials.parquet"), driver.read_probes(bad))
    problems = driver.check_grid(exp, trials, 2) + driver.check_precision(trials, "cuda", bf16=True)
    text = "\n".join(problems)
    assert "ASHA stopped no trial" in text and "no TensorBoard events of the engine" in text
    assert "no curves for lr=0.5,method=finetune" in text
    assert "ran on cpu, not cuda" in text and "autocast None, expected bfloat16" in text
    assert "lr=0.5,method=finetune: no probe from its workers" in text


def test_resume_check_wants_reports_from_a_new_worker_after_the_checkpoint(tmp_path):
    rows = [_row("r", "dynsdpb", 1e-4, "completed")]
    good = [{"trial_id": "r", "step": 3, "epoch": 0.5, "worker_pid": 11, "resumed_from_step": None},
            {"trial_id": "r", "step": 6, "epoch": 1.0, "worker_pid": 12, "resumed_from_step": 3}]
    exp = _experiment(tmp_path, rows, good)
    trials = driver.trial_summaries(rows, [])
    assert driver.check_resume(exp, trials, killed_pid=11, from_step=3) == []
    assert driver.check_resume(exp, trials, killed_pid=None, from_step=3)[0].startswith("the fault never fired")
    # the killed worker's pid after the checkpoint: it was not restarted
    assert "not from a new worker resumed at step 3" in driver.check_resume(exp, trials, killed_pid=12, from_step=3)[0]


def test_the_summary_json_and_its_failed_check_count(tmp_path):
    summary = {"sweeps": {"grid": {"rc": 0, "problems": []}, "resume": {"rc": 1, "problems": []},
                          "ddp": {"skipped": "1 GPU(s)", "problems": []}},
               "trials": {"grid": [{"step_time_median_s": 0.012}]}}
    assert driver.failed_checks(summary) == 1
    summary["sweeps"]["grid"]["problems"] = ["ASHA stopped no trial"]
    assert driver.failed_checks(summary) == 2
    summary["sweeps"]["resume"]["not_run"] = "deadline reached"
    summary.update(failed_checks=driver.failed_checks(summary), total_s=412.0)
    summary["trials"]["grid"][0].update(label="lr=0.5,method=dynsdpb", status="stopped_by_asha", steps=7,
                                        workers=[{"device": "cuda:0", "autocast_dtype": "bfloat16"}])
    lines = driver.verdict_lines(summary)
    assert lines[0] == "== grid: FAILED: ASHA stopped no trial"
    assert lines[1] == "== resume: FAILED: exit 1; deadline reached" and lines[2] == "== ddp: skipped: 1 GPU(s)"
    assert lines[3].split() == ["grid", "lr=0.5,method=dynsdpb", "stopped_by_asha", "steps", "7", "step", "12.0",
                                "ms", "cuda:0", "bfloat16"]
    assert lines[-1] == "== gpu ray check: 2 failed check(s) in 412 s"
    path = tmp_path / "summary.json"
    driver.write_summary(path, {**summary, "date": driver.datetime(2026, 12, 6)})
    back = json.loads(path.read_text())
    assert back["sweeps"]["ddp"]["skipped"] == "1 GPU(s)" and back["date"].startswith("2026-12-06")
    assert not list(tmp_path.glob("*.tmp"))


def test_travel_size_counts_the_tree_and_the_carried_folder(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/.gpu_ray/\n")
    (tmp_path / "a.py").write_bytes(b"x" * 2**20)
    carried = tmp_path / ".gpu_ray" / "wheels"
    carried.mkdir(parents=True)
    (carried / "w.whl").write_bytes(b"y" * 3 * 2**20)
    size = driver.travel_size([Path(".gpu_ray")], root=tmp_path)
    assert size["tree_mib"] == pytest.approx(1.0, abs=0.01)  # the ignored folder is not counted twice
    assert size["carried_mib"][".gpu_ray"] == pytest.approx(3.0) and size["total_mib"] == pytest.approx(4.0, abs=0.01)


def test_a_command_past_its_limit_is_ended_with_its_whole_process_group(tmp_path):
    child = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {child}; echo started; wait"
    start = driver.time.monotonic()
    rc, timed_out = driver._run_logged(["bash", "-c", script], tmp_path, dict(os.environ), 2.0,
                                       tmp_path / "out", tmp_path / "err")
    assert timed_out and rc != 0 and driver.time.monotonic() - start < 20
    assert (tmp_path / "out").read_text() == "started\n"
    stat = Path(f"/proc/{int(child.read_text())}/stat")
    for _ in range(50):  # the background sleep went with the group: gone, or a zombie until its new parent reaps it
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        driver.time.sleep(0.1)
    else:
        pytest.fail(f"the group's background process is still running: {stat.read_text()}")
    assert driver._run_logged(["bash", "-c", "exit 3"], tmp_path, dict(os.environ), 10, tmp_path / "o",
                              tmp_path / "e") == (3, False)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_runs_sweeps_are_valid_configs_that_plan_as_the_checks_expect(tmp_path, shared_data_dir, device):
    """The configs `run` writes, planned by raysdpb itself (no Ray): the grid's lr-1e-4 trials come first, three
    fit at a time on one GPU of 16 CPUs (or the 2-core CPU), ASHA ranks train_loss per method; the resume trial
    reports every 3 steps; the DDP trial wants two whole GPUs."""
    from raysdpb.config import load_experiment
    from raysdpb.sweep.checks import check_resources, max_concurrent_trials
    from raysdpb.sweep.plan import plan_sweep

    profile, model = driver.PROFILES[device], tmp_path / "model"
    model.mkdir()
    machine = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0} if device == "cuda" else {"CPU": 2.0}}]
    grid = driver.grid_config(profile, shared_data_dir.parent, model, tmp_path / "results")
    grid["data_dir"] = str(shared_data_dir)
    plan = plan_sweep(load_experiment(None, raw=grid))
    assert [(p.config.lr, p.config.method) for p in plan.points] == [
        (lr, m) for lr in (driver.GOOD_LR, driver.BAD_LR) for m in ("finetune", "random_dlb", "dynsdpb")]
    assert plan.metric == "train_loss" and plan.mode == "min"
    assert {p.config.precision for p in plan.points} == {"auto"} and plan.sweep.use_gpu == (device == "cuda")
    check_resources(plan.sweep, machine)
    assert max_concurrent_trials(plan.sweep, machine) == 3

    resume = driver.resume_config(profile, shared_data_dir.parent, model, tmp_path / "results")
    assert load_experiment(None, raw=resume).first_point().eval_every_steps == 3
    ddp = load_experiment(None, raw=driver.ddp_config(profile, shared_data_dir.parent, model, tmp_path / "r"))
    assert ddp.sweep.num_workers == 2 and ddp.sweep.gpus_per_worker == 1


# --- the script's modes -------------------------------------------------------------------------------------------

def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_ray_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_the_script_names_its_modes_and_refuses_a_run_without_wheels(tmp_path):
    for args in ([], ["deploy"]):
        out = _script(*args)
        assert out.returncode == 2 and "bash scripts/gpu_ray_check.sh prepare" in out.stderr
        assert "set -u" not in out.stderr  # the usage is the header comment only
    out = _script("run", str(tmp_path / "out"), str(tmp_path / "no-assets"))
    assert out.returncode == 2
    assert f"no wheels in {tmp_path / 'no-assets'}/wheels: run 'bash scripts/gpu_ray_check.sh prepare'" in out.stderr
    assert not (tmp_path / "out").exists()
    out = _script("efficiency", str(tmp_path / "out"), str(tmp_path / "no-assets"))
    assert out.returncode == 2 and "no wheels or no glue/rte in" in out.stderr and not (tmp_path / "out").exists()


def test_the_driver_refuses_missing_assets_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "scripts/gpu_ray_driver.py", "run", "--assets", str(tmp_path), "--out",
                          str(tmp_path / "out"), "--device", "cpu", "--work", str(tmp_path / "work")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "missing: run `bash scripts/gpu_ray_check.sh prepare` first" in out.stderr
