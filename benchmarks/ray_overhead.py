"""What Ray costs a trial, and what ASHA saves a sweep.

    python benchmarks/ray_overhead.py [--asha reduced|full|off] [--max-train-samples 64] [--json PATH]
    python benchmarks/ray_overhead.py --asha full --skip-trial       # the whole quickstart grid, twice (long)

Part 1, one trial three ways: the first point of `sweeps/quickstart.yaml` pinned to one trial (finetune,
lr 5e-5; MiniLM-L6 on SuperGLUE CB, batch 8, 2 epochs; `--max-train-samples` keeps it short, 0 = all 250) run
by `python -m raysdpb.train`, by `python -m raysdpb.sweep` (a local Ray started by the command; the trial warm, in
Tune's own trial actor, the default) and by the sweep with `sweep.warm_trials=false` (the trial a Ray Train run:
a controller and a worker group of one). For each: the command's wall time; the time from the command's start to
the end of the first training step; the training span (end of step 1 to the last training event) and the tail
(to the command's exit: the last evaluation, checkpoint, shutdown). `--two-workers` (default) adds the same
trial over two 1-CPU Ray Train workers (DDP), which is always a Ray Train run. The end of step 1 is read from the
TensorBoard events the recipe writes: its first event is the per-layer gradient norms logged right after
optimizer step 1 (the recipe logs them at step 0 % grad_norm_every_steps == 0), and events carry their wall time.
The sweep's own log lines (timestamps of "starting a local Ray instance" and of the trial plan, logged once Ray is
up) split its start-up into imports and config, starting Ray, and starting the trial (Tune, the trial's
processes, model and data). `trial_wall_s` for the sweep is `wall_time_s` of trials.parquet (Tune's time of
the trial's reports).

Part 1b, `--series N` (default 3): N trials of that configuration (seeds 0..N-1) one at a time, warm and as Ray
Train runs: for each trial after the first, the gap from the previous trial's last TensorBoard event to its own
first, which is the previous trial's end, Tune starting the next trial, its start-up and its first step. The
target it is printed against: raysdpb.train's start (to step 1) and end (tail) plus 4 s (issue 33: a trial's
start within 3 s of raysdpb.train's, its end within 1 s).

Part 2, ASHA's saving: the quickstart grid (10 trials: finetune x 2 learning rates, random_dlb and dynsdpb x 2
learning rates x 2 alphas; 2 epochs, ASHA grace 1 epoch, reduction factor 2) swept with ASHA and again with
`sweep.asha=null`. Compute = the sum of the trials' wall times and of the epochs they ran; the saving is
1 - ASHA / full grid; and whether the best configuration (best validation accuracy over its reports; all tied
labels listed) is the same. `--asha reduced` (default, a few minutes): the grid with the `tiny-bert` model (a
small random BERT) on 64 training samples; such a model predicts one class, every trial ties on accuracy and
ASHA would stop nothing, so this grid ranks by the training loss (`sweep.asha.metric=train_loss`, mode min;
the best configuration likewise): it checks the mechanics and the bookkeeping, not which configuration is
better, and Ray's per-trial start-up dominates its trials' time. `--asha full`: the grid exactly as in
sweeps/quickstart.yaml (MiniLM-L6, all of CB, ranked by validation accuracy): 10 trials x 2 epochs each way,
tens of minutes on 2 CPUs. `--asha off` skips part 2.

Note that a sweep's Ray Train worker runs torch on `sweep.cpus_per_worker` threads (Ray sets OMP_NUM_THREADS to
the worker's CPUs; quickstart: 1), while `raysdpb.train` uses every core: `--sweep-override
sweep.cpus_per_worker=2` compares like with like on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine_info, offline_env, table, write_json  # noqa: E402

offline_env()

from raysdpb.results import read_rows  # noqa: E402  (imported up front: a missing package fails before the sweeps)

CONFIG = str(REPO / "sweeps" / "quickstart.yaml")
PIN = ["method=finetune", "lr=5.0e-5", "alpha=0.5", "tau=2.0"]
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # this checkout's raysdpb in the commands and in their Ray workers (which do not start in the checkout)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def tensorboard_times(folder: Path) -> dict | None:
    """First and last event times of the recipe's TensorBoard files under `folder` (with their steps)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in folder.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary"):
                tags = [v.tag for v in event.summary.value]
                events.append((event.wall_time, event.step, tags))
    if not events:
        return None
    events.sort()
    first, last = events[0], events[-1]
    return {"first_event": first[0], "first_step": first[1], "first_tags": first[2][:3], "last_event": last[0],
            "last_step": max(e[1] for e in events)}


def _log_times(text: str, needles: dict[str, str]) -> dict[str, float]:
    """Epoch times of the first log line containing each needle (the package's `asctime` format)."""
    found = {}
    for line in text.splitlines():
        m = _LOG_TIME.match(line)
        if not m:
            continue
        for key, needle in needles.items():
            if key not in found and needle in line:
                found[key] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[float, float, str]:
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}; log {log}")
    return start, wall, proc.stdout + proc.stderr


def one_trial_local(root: Path, overrides: list[str], timeout: float) -> dict:
    out = root / "train_run"
    cmd = [sys.executable, "-m", "raysdpb.train", CONFIG, *PIN, *overrides, "--output-dir", str(out)]
    start, wall, _ = _run(cmd + ["-q"], timeout, root / "train.log")
    tb = tensorboard_times(out / "tensorboard")
    return _trial_figures("train", start, wall, tb, trial_wall=None)


def one_trial_sweep(root: Path, overrides: list[str], timeout: float, sweep_overrides: list[str],
                    warm: bool = True, name: str | None = None) -> dict:
    label = name or ("sweep" if warm else "sweep, Train run")
    name = name or ("one_trial" if warm else "one_trial_train_run")
    cmd = [sys.executable, "-m", "raysdpb.sweep", CONFIG, *PIN, *overrides, *sweep_overrides, f"sweep.name={name}",
           f"sweep.storage_path={root / 'ray'}", f"sweep.warm_trials={str(warm).lower()}"]
    start, wall, text = _run(cmd, timeout, root / f"{name}.log")
    experiment = root / "ray" / name
    tb = tensorboard_times(experiment / "tensorboard")
    rows = _rows(experiment)
    figures = _trial_figures(label, start, wall, tb,
                             trial_wall=rows[0].get("wall_time_s") if rows else None)
    marks = _log_times(text, {"ray_init": "starting a local Ray instance", "ray_ready": " trials, at most "})
    if "ray_init" in marks:
        figures["to_ray_init_s"] = marks["ray_init"] - start
    if "ray_init" in marks and "ray_ready" in marks:
        figures["ray_start_s"] = marks["ray_ready"] - marks["ray_init"]
    if "ray_ready" in marks and tb:
        figures["trial_start_to_first_step_s"] = tb["first_event"] - marks["ray_ready"]
    figures["status"] = rows[0].get("status") if rows else None
    return figures


def trial_series(root: Path, overrides: list[str], n: int, warm: bool, timeout: float,
                 sweep_overrides: list[str]) -> dict:
    """`n` trials of the pinned configuration (seeds 0..n-1) one at a time: for each trial after the first, the time
    from the previous trial's last TensorBoard event to its own first (the previous trial's end, Tune starting the
    next, its start-up, its first step)."""
    name = f"series_{'warm' if warm else 'train_run'}"
    pin = [o for o in PIN if not o.startswith("seed=")]
    cmd = [sys.executable, "-m", "raysdpb.sweep", CONFIG, *pin, *overrides, *sweep_overrides, f"sweep.name={name}",
           f"sweep.storage_path={root / 'ray'}", f"sweep.warm_trials={str(warm).lower()}",
           "sweep.max_concurrent_trials=1", "sweep.asha=null", f"search.seed=[{', '.join(map(str, range(n)))}]",
           "search.method=[finetune]", "search.lr=[5.0e-5]", "search.alpha=[0.5]", "search.tau=[2.0]", "-q"]
    _, wall, _ = _run(cmd, timeout, root / f"{name}.log")
    experiment = root / "ray" / name
    spans = sorted((t["first_event"], t["last_event"]) for t in
                   (tensorboard_times(folder) for folder in (experiment / "tensorboard").iterdir()) if t)
    gaps = [spans[i][0] - spans[i - 1][1] for i in range(1, len(spans))]
    return {"how": "sweep" if warm else "sweep, Train run", "command_wall_s": wall, "gaps_s": gaps,
            "trial_wall_s": [r.get("wall_time_s") for r in _rows(experiment)]}


def _trial_figures(how: str, start: float, wall: float, tb: dict | None, trial_wall: float | None) -> dict:
    f = {"how": how, "command_wall_s": wall, "trial_wall_s": trial_wall if trial_wall is not None else wall}
    if tb:
        f["to_first_step_s"] = tb["first_event"] - start
        f["training_span_s"] = tb["last_event"] - tb["first_event"]
        f["steps"] = tb["last_step"]
        f["step_s"] = f["training_span_s"] / max(tb["last_step"] - tb["first_step"], 1)
        f["tail_s"] = start + wall - tb["last_event"]
    return f


def _rows(experiment: Path) -> list[dict]:
    return read_rows(str(experiment / "trials.parquet"))


def sweep_grid(root: Path, name: str, overrides: list[str], asha: bool, timeout: float,
               metric: str = "best_eval_accuracy", mode: str = "max") -> dict:
    cmd = [sys.executable, "-m", "raysdpb.sweep", CONFIG, *overrides, f"sweep.name={name}",
           f"sweep.storage_path={root / 'ray'}", "-q"]
    if not asha:
        cmd.append("sweep.asha=null")
    _, wall, _ = _run(cmd, timeout, root / f"{name}.log")
    rows = _rows(root / "ray" / name)
    sign = 1 if mode == "max" else -1
    scored = [r for r in rows if r.get(metric) is not None]
    top = max((sign * r[metric] for r in scored), default=None)
    top = None if top is None else sign * top
    best = sorted(r["label"] for r in scored if r[metric] == top)
    per_method = {}
    for r in scored:
        m = r["method"]
        if m not in per_method or sign * r[metric] > sign * per_method[m][metric]:
            per_method[m] = {metric: r[metric], "label": r["label"]}
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    return {"asha": asha, "metric": metric, "mode": mode, "command_wall_s": wall, "trials": len(rows), "status": status,
            "sum_trial_wall_s": sum(r.get("wall_time_s") or 0.0 for r in rows),
            "sum_epochs": sum(r.get("epochs_run") or 0.0 for r in rows),
            "planned_epochs": sum(r.get("planned_epochs") or 0.0 for r in rows),
            "best_value": top, "best_labels": best, "best_per_method": per_method,
            "trials_table": [{"label": r["label"], "status": r["status"], "epochs_run": r.get("epochs_run"),
                              "wall_time_s": r.get("wall_time_s"), metric: r.get(metric)} for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asha", choices=["reduced", "full", "off"], default="reduced")
    p.add_argument("--max-train-samples", type=int, default=64,
                   help="training samples of the one-trial comparison (0: all of CB)")
    p.add_argument("--sweep-override", action="append", default=[],
                   help="extra override for part 1's sweep, e.g. sweep.cpus_per_worker=2 (Ray sets a worker's "
                        "OMP_NUM_THREADS to its CPUs: 1 by default)")
    p.add_argument("--skip-trial", action="store_true", help="skip part 1 (one trial three ways)")
    p.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="part 1 also as a two-worker (DDP) trial, which is always a Ray Train run")
    p.add_argument("--series", type=int, default=3,
                   help="trials run one after another, warm and as Ray Train runs, to time the gap between them "
                        "(0: skip)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per command")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")
    p.add_argument("--json", default=None, help=f"e.g. {RESULTS / 'ray_overhead.json'}")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="raysdpb-ray-overhead-"))
    result = {"benchmark": "ray_overhead", "machine": machine_info(), "config": CONFIG, "asha_mode": args.asha,
              "folder": str(root)}
    t0 = time.perf_counter()
    try:
        if not args.skip_trial:
            overrides = [f"max_train_samples={args.max_train_samples}"] if args.max_train_samples else []
            local = one_trial_local(root, overrides, args.timeout_s)
            warm = one_trial_sweep(root, overrides, args.timeout_s, args.sweep_override, warm=True)
            cold = one_trial_sweep(root, overrides, args.timeout_s, args.sweep_override, warm=False)
            result["one_trial"] = {"overrides": PIN + overrides, "sweep_overrides": args.sweep_override,
                                   "train": local, "sweep": warm, "sweep_train_run": cold}
            variants = [("", warm), ("train_run_", cold)]
            if args.two_workers:  # DDP over two 1-CPU workers: always a Ray Train run
                two = ["sweep.num_workers=2", "sweep.cpus_per_worker=1"]
                ddp = one_trial_sweep(root, overrides, args.timeout_s, two, warm=False, name="two_workers")
                result["one_trial"]["sweep_two_workers"] = ddp
                variants.append(("two_workers_", ddp))
            for key, swept in variants:
                result["one_trial"][f"{key}command_wall_ratio"] = swept["command_wall_s"] / local["command_wall_s"]
                result["one_trial"][f"{key}trial_wall_ratio"] = swept["trial_wall_s"] / local["trial_wall_s"]
                if "step_s" in local and "step_s" in swept:
                    result["one_trial"][f"{key}step_time_ratio"] = swept["step_s"] / local["step_s"]
            print("== one trial: " + " ".join(PIN + overrides))
            print(table([local, *(v for _, v in variants)], [("how", "how", ""), ("command_wall_s", "command_s", ".1f"),
                                              ("trial_wall_s", "trial_s", ".1f"),
                                              ("to_first_step_s", "to_step1_s", ".1f"),
                                              ("trial_start_to_first_step_s", "trial_start_to_step1_s", ".1f"),
                                              ("training_span_s", "train_span_s", ".1f"), ("steps", "steps", "d"),
                                              ("step_s", "step_s", ".3f"), ("tail_s", "tail_s", ".1f")]))
            for _, swept in variants:
                if "ray_start_s" in swept:
                    print(f"{swept['how']} start-up: {swept.get('to_ray_init_s', float('nan')):.1f}s imports and "
                          f"config, {swept['ray_start_s']:.1f}s starting Ray, "
                          f"{swept.get('trial_start_to_first_step_s', float('nan')):.1f}s from the trial plan to the "
                          "end of step 1")
            print(f"sweep/train: command {result['one_trial']['command_wall_ratio']:.2f}x "
                  f"({result['one_trial']['train_run_command_wall_ratio']:.2f}x as a Ray Train run), trial "
                  f"{result['one_trial']['trial_wall_ratio']:.2f}x\n", flush=True)
        if args.series:
            overrides = [f"max_train_samples={args.max_train_samples}"] if args.max_train_samples else []
            local = result.get("one_trial", {}).get("train") or one_trial_local(root, overrides, args.timeout_s)
            result["series"] = {"trials": args.series, "overrides": PIN + overrides, "train": local}
            print(f"== {args.series} trials one after another (seeds 0..{args.series - 1}), from one trial's last "
                  "event to the next one's first step; raysdpb.train's own start (to step 1) and end (tail) for scale")
            rows = []
            for warm in (True, False):
                series = trial_series(root, overrides, args.series, warm, args.timeout_s, args.sweep_override)
                result["series"]["warm" if warm else "train_run"] = series
                rows += [{"how": series["how"], "trial": i + 2, "gap_s": g, "target_s": local["to_first_step_s"] +
                          local["tail_s"] + 4.0} for i, g in enumerate(series["gaps_s"])]
            print(table(rows, [("how", "how", ""), ("trial", "trial", "d"), ("gap_s", "end+start_s", ".1f"),
                               ("target_s", "train's start+end+4s", ".1f")]), flush=True)
        if args.asha != "off":
            if args.asha == "full":
                overrides, metric, mode = [], "best_eval_accuracy", "max"
            else:
                # a random tiny model predicts one class: every trial ties on accuracy and ASHA stops nothing,
                # so the reduced grid ranks (ASHA and the choice of the best) by the training loss instead
                overrides = ["model=tiny-bert", "max_train_samples=64", "sweep.asha.metric=train_loss",
                             "sweep.asha.mode=min"]
                metric, mode = "best_train_loss", "min"
            with_asha = sweep_grid(root, "grid_asha", overrides, True, args.timeout_s, metric, mode)
            full = sweep_grid(root, "grid_full", [o for o in overrides if not o.startswith("sweep.asha")], False,
                              args.timeout_s, metric, mode)
            saving = {
                "trial_wall_saving": 1 - with_asha["sum_trial_wall_s"] / full["sum_trial_wall_s"],
                "epoch_saving": 1 - with_asha["sum_epochs"] / full["sum_epochs"],
                "command_wall_saving": 1 - with_asha["command_wall_s"] / full["command_wall_s"],
                "same_best": bool(set(with_asha["best_labels"]) & set(full["best_labels"])),
                "same_best_exactly": with_asha["best_labels"] == full["best_labels"],
            }
            result["asha"] = {"overrides": overrides, "with_asha": with_asha, "full_grid": full, **saving}
            print(f"== ASHA on the quickstart grid ({args.asha}{': ' + ' '.join(overrides) if overrides else ''})")
            print(table([{"run": "ASHA", **with_asha}, {"run": "full grid", **full}],
                        [("run", "run", ""), ("trials", "trials", "d"), ("sum_trial_wall_s", "sum_trial_s", ".0f"),
                         ("sum_epochs", "epochs", ".1f"), ("planned_epochs", "planned", ".0f"),
                         ("command_wall_s", "command_s", ".0f"), ("best_value", metric, ".4f")]))
            for run in (with_asha, full):
                print(f"{'ASHA' if run['asha'] else 'full'}: status {run['status']}; best {run['best_labels']}")
            print(f"saving: trial time {saving['trial_wall_saving']:.1%}, epochs {saving['epoch_saving']:.1%}, "
                  f"command {saving['command_wall_saving']:.1%}; same best configuration: {saving['same_best']}"
                  f"{'' if saving['same_best_exactly'] else ' (tie sets differ)'}")
    finally:
        result["elapsed_s"] = time.perf_counter() - t0
        if args.keep:
            print(f"runs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"total {result['elapsed_s']:.0f}s")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
