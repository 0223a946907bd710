"""How much compute each searcher needs to reach the best grid configuration's score, against the grid (issue 33).

    python benchmarks/searchers.py [--tasks superglue/cb glue/mrpc] [--num-samples 12] [--grid paper|small]
                                   [--root ray_results/searchers] [--archive DIR] [--resume] [--json PATH]
    python benchmarks/searchers.py --smoke          # tiny: checks that every sweep starts, ends and is scored

Per task (SuperGLUE CB whole; an MRPC training subset, `--mrpc-samples`, default 800 of 3668, as protocol v2
trains it; an RTE subset, `--rte-samples`, default 1000 of 2490: RTE stays available, but no model here learns it,
`RESULTS.md`, so every configuration ties there; validation whole), one method (`--method`, default dynsdpb) with
MiniLM-L6, the paper's protocol (3 epochs, AdamW; CB batch 8 and 256 tokens, MRPC batch 8 and 96 tokens with a
report every 50 steps, RTE batch 32 and 128 tokens), four sweeps, each a `python -m raysdpb.sweep` of a config
written under `<root>/configs/`:

* `grid`: lr {2e-5, 5e-5, 1e-4} x alpha {0.5, 1.0, 1.5} x tau {1.0, 1.5, 2.0} (`--grid small`: 2 x 2 x 2), every
  trial to its end (no ASHA): the reference. Its best configuration's score (best validation main metric over
  the epochs) is the target; "within one example" is the target less 1 / (validation examples). The grid runs
  `--grid-concurrent` trials at a time (default 2: its order decides nothing; the searchers' trials share the same
  CPUs among `--max-concurrent`), and its reports (MRPC's every half epoch) make it a full grid for
  `searcher_replay.py` and `asha_replay.py` too.
* `random`, `optuna`, `bohb`: `--num-samples` trials (default 12) over the same box as distributions: lr
  loguniform [2e-5, 1e-4], alpha uniform [0.5, 1.5], tau uniform [1.0, 2.0]; random and optuna with the sweep's
  ASHA (grace 1 epoch, reduction 2), bohb with its own HyperBand. Seed `--seed` (default 0).

The compute a sweep needs is counted from its curves (`curves.parquet`): the training epochs all its trials had
run when a report first reached the target (each trial's last reported epoch at that moment, by the reports'
timestamps), the trials started by then, and the same as training examples seen (epochs x the training set).
`--max-concurrent` (default 1) keeps the searchers' order of results, and so their suggestions, reproducible; with
more at a time the searchers see results in the order they arrive. A sweep that never reaches the target reports
its whole compute and `reached: false`.

Resumable and archivable like `benchmarks/quality.py`: a sweep finished earlier (its archived copy in `--archive`,
or under `--root`) is read, not run again; `--resume` continues an interrupted one with `python -m raysdpb.sweep
--resume`; each finished sweep's `trials.parquet`, `curves.parquet`, `grid.json`, `samples.json` and config are
copied to `<archive>/<sweep>/`. The table and JSON (`benchmarks/results/searchers.json`, or `--json`) are written
at the end. Hours on a CPU: the CB paper grid is 27 trials of 3 epochs (each ~10 min on 2 cores); MRPC's 27 about
2.3 hours two at a time (protocol v2's DynSDPB trials there took 7 to 10 min each, two at a time); RTE's subset
more; a GPU (`--device cuda --gpus-per-trial 0.25`) is the place for it. The smoke run uses tiny-bert on 16
examples, a grid of 2 and 2 samples per searcher.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, offline_env, scored_examples, table, write_json  # noqa: E402

offline_env()

SEARCHERS = ("random", "optuna", "bohb")
ARCHIVED = ("trials.parquet", "curves.parquet", "grid.json", "samples.json")
FINISHED = ("completed", "stopped_by_asha", "diverged")
PAPER_GRID = {"lr": [2e-5, 5e-5, 1e-4], "alpha": [0.5, 1.0, 1.5], "tau": [1.0, 1.5, 2.0]}
SMALL_GRID = {"lr": [2e-5, 1e-4], "alpha": [0.5, 1.5], "tau": [1.0, 2.0]}
BOX = {"lr": {"loguniform": [2e-5, 1e-4]}, "alpha": {"uniform": [0.5, 1.5]}, "tau": {"uniform": [1.0, 2.0]}}


# --- the compute to reach a score (pure functions of the curve rows) ---------------------------------------------

def compute_to_reach(curves: list[dict], metric: str, target: float) -> dict:
    """From a sweep's curve rows (`trial_id`, `epoch`, `timestamp`, the metric): the epochs its trials had run when a
    report first reached `target` (each trial's last reported epoch at that moment), the number of trials started by
    then, and whether it was reached; unreached: the whole sweep's epochs."""
    rows = sorted((r for r in curves if r.get("timestamp") is not None), key=lambda r: (r["timestamp"],
                                                                                       r.get("epoch") or 0))
    hits = [r for r in rows if r.get(metric) is not None and r[metric] >= target - 1e-12]
    until = hits[0]["timestamp"] if hits else float("inf")
    last_epoch: dict[str, float] = {}
    for r in rows:
        if r["timestamp"] <= until:
            last_epoch[r["trial_id"]] = max(last_epoch.get(r["trial_id"], 0.0), float(r.get("epoch") or 0.0))
    return {"reached": bool(hits), "epochs": sum(last_epoch.values()), "trials_started": len(last_epoch),
            "by_trial": hits[0]["trial_id"] if hits else None}


def best_score(rows: list[dict], metric: str) -> float | None:
    values = [r.get(f"best_{metric}") for r in rows if r.get(f"best_{metric}") is not None]
    return max(values) if values else None


# --- configs -----------------------------------------------------------------------------------------------------

TASKS = {"superglue/cb": dict(batch_size=8, eval_batch_size=8, max_length=256),
         # protocol v2's MRPC: batch 8, 96 tokens, a report every 50 steps (400 samples, half a plain epoch of 800)
         "glue/mrpc": dict(batch_size=8, eval_batch_size=64, max_length=96, eval_every_steps=50),
         "glue/rte": dict(batch_size=32, eval_batch_size=64, max_length=128)}
SUBSET_ARG = {"glue/mrpc": "mrpc_samples", "glue/rte": "rte_samples"}  # the tasks trained on a subset


def trial_block(task: str, args) -> dict:
    trial = dict(task=task, model=args.model, method=args.method, epochs=args.epochs, warmup_ratio=0.06,
                 seed=0, device=args.device, **TASKS[task])
    if args.data_dir:
        trial["data_dir"] = str(Path(args.data_dir).resolve())
    if task in SUBSET_ARG and getattr(args, SUBSET_ARG[task]):
        trial["max_train_samples"] = getattr(args, SUBSET_ARG[task])
    if args.smoke:
        trial |= dict(model="tiny-bert", epochs=1, max_train_samples=16, max_eval_samples=16, max_length=32,
                      batch_size=8, eval_batch_size=16, log_every_steps=1)
    return trial


def sweep_name(task: str, search: str) -> str:
    return f"searchers-{task.replace('/', '-')}-{search}"


def write_config(task: str, search: str, args) -> tuple[str, Path]:
    name = sweep_name(task, search)
    concurrent = args.grid_concurrent if search == "grid" else args.max_concurrent
    # the searchers' fewer trials at a time share the grid's CPUs (compute is counted in samples, not seconds)
    cpus = args.cpus_per_trial * (1 if search == "grid" else args.grid_concurrent / args.max_concurrent)
    if args.device == "cpu":  # a local run: no more than this machine has (the sweep refuses a trial that cannot fit)
        cpus = min(cpus, float(os.cpu_count() or 1))
    sweep = {"name": name, "storage_path": str(Path(args.root).resolve()), "num_workers": 1,
             "cpus_per_worker": cpus, "max_concurrent_trials": concurrent,
             "keep_checkpoints": 1, "keep_weights": "none"}
    if args.device == "cuda":
        sweep |= {"use_gpu": True, "gpus_per_worker": args.gpus_per_trial}
    if search == "grid":
        grid = SMALL_GRID if args.grid == "small" or args.smoke else PAPER_GRID
        search_block = {"lr": grid["lr"][:2]} if args.smoke else grid
        sweep["asha"] = None  # the reference: every configuration to its end
    else:
        search_block = {"lr": BOX["lr"]} if args.smoke else BOX
        sweep |= {"search": search, "num_samples": 2 if args.smoke else args.num_samples, "seed": args.seed,
                  "asha": {"grace_period": 1, "reduction_factor": 2}}
    config = Path(args.root) / "configs" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({**trial_block(task, args), "search": search_block, "sweep": sweep},
                                     sort_keys=False))
    return name, config


# --- running, resuming, archiving --------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.exists() else []


def _finished(experiment: Path) -> bool:
    rows = _rows(experiment / "trials.parquet")
    return bool(rows) and all(r["status"] in FINISHED for r in rows) and (experiment / "done").exists()


def run_sweep(name: str, config: Path, args) -> Path:
    """The sweep's experiment folder with its results: its archived copy, a finished run under --root, or a run
    started (or continued with --resume) here."""
    archived = Path(args.archive) / name if args.archive else None
    if archived is not None and _finished(archived):
        print(f"[{name}] finished earlier ({archived}); skipped", flush=True)
        return archived
    experiment = Path(args.root) / name
    if not _finished(experiment):
        cmd = [sys.executable, "-m", "raysdpb.sweep", str(config), "-q"]
        if experiment.exists():
            if not args.resume:
                raise SystemExit(f"{experiment} exists and is not finished; continue it with --resume (or choose "
                                 "another --root)")
            cmd.append("--resume")
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        log = Path(args.root) / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "a") as out:
            proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"[{name}] the sweep ended with code {proc.returncode}; see {log} (continue it with "
                             "--resume)")
        (experiment / "done").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    if archived is not None:
        archived.mkdir(parents=True, exist_ok=True)
        for entry in (*ARCHIVED, "done"):
            if (experiment / entry).exists():
                shutil.copy2(experiment / entry, archived / entry)
        shutil.copy2(config, archived / "config.yaml")
    return experiment


def main_metric(task: str) -> str:
    from quality import main_metric as task_main_metric  # the task's own (raysdpb.results.schema.main_metric)

    return task_main_metric(task)


def eval_examples(experiment: Path) -> int:
    """The validation examples a trial of the sweep scored (for 'within one example'; `_common.scored_examples`)."""
    import json

    from raysdpb.config import TrialConfig

    grid = json.loads((experiment / "grid.json").read_text())
    sampled = json.loads((experiment / "samples.json").read_text())["samples"] if not grid["trials"] else []
    return scored_examples(TrialConfig.model_validate(next(iter(grid["trials"].values())) if grid["trials"]
                                                      else sampled[0]["config"]))


def train_examples(config: Path) -> int:
    from raysdpb.config import load_trial_config
    from raysdpb.tasks import data_dir_from, load_examples, resolve_task

    trial = load_trial_config(config)
    task = resolve_task(trial)
    n = len(load_examples(task, task.training_split(trial.train_split), data_dir_from(trial.data_dir)))
    return min(n, trial.max_train_samples or n)


def score_task(task: str, experiments: dict[str, Path], configs: dict[str, Path]) -> dict:
    metric = main_metric(task)
    grid_rows = _rows(experiments["grid"] / "trials.parquet")
    best = best_score(grid_rows, metric)
    n_eval = eval_examples(experiments["grid"])
    target = best - 1.0 / n_eval
    n_train = train_examples(configs["grid"])
    out = {"task": task, "metric": metric, "grid_best": best, "eval_examples": n_eval, "target": target,
           "train_examples": n_train, "sweeps": {}}
    for search, experiment in experiments.items():
        rows = _rows(experiment / "trials.parquet")
        reach = compute_to_reach(_rows(experiment / "curves.parquet"), metric,
                                 best if search == "grid" else target)
        total = sum(float(r.get("epochs_run") or 0.0) for r in rows)
        out["sweeps"][search] = {"trials": len(rows), "best": best_score(rows, metric), **reach,
                                 "samples_seen": reach["epochs"] * n_train, "total_epochs": total,
                                 "total_samples_seen": total * n_train,
                                 "stopped_early": sum(r["status"] == "stopped_by_asha" for r in rows)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["superglue/cb", "glue/mrpc"], choices=list(TASKS))
    p.add_argument("--searchers", nargs="*", default=list(SEARCHERS), choices=list(SEARCHERS),
                   help="the searchers to run after the grid (none: the grid alone, e.g. for searcher_replay.py)")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", choices=["paper", "small"], default="paper")
    p.add_argument("--method", default="dynsdpb")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--mrpc-samples", type=int, default=800)
    p.add_argument("--rte-samples", type=int, default=1000)
    p.add_argument("--data-dir", default=None, help="default: $RAYSDPB_DATA_DIR")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="the grid's; a searcher's trial gets this x "
                   "--grid-concurrent / --max-concurrent")
    p.add_argument("--gpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=1, help="the searchers' trials at a time")
    p.add_argument("--grid-concurrent", type=int, default=2, help="the grid's trials at a time")
    p.add_argument("--root", default=str(REPO / "ray_results" / "searchers"))
    p.add_argument("--archive", default=None, help="copy each finished sweep's results here; read them from here")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None, help="default: benchmarks/results/searchers.json (smoke: none)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.tasks = args.tasks[:1]
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("root", "archive", "json")},
               "tasks": []}
    for task in args.tasks:
        experiments, configs = {}, {}
        for search in ("grid", *args.searchers):
            name, config = write_config(task, search, args)
            configs[search], experiments[search] = config, run_sweep(name, config, args)
        results["tasks"].append(score_task(task, experiments, configs))
    rows = [{"task": t["task"], "search": s, **v, "reached": "yes" if v["reached"] else "no"}
            for t in results["tasks"] for s, v in t["sweeps"].items()]
    print(table(rows, [("task", "task", "s"), ("search", "search", "s"), ("trials", "trials", "d"),
                       ("best", "best", ".4f"), ("reached", "reached target", "s"),
                       ("epochs", "epochs to reach", ".1f"), ("samples_seen", "samples to reach", ".0f"),
                       ("total_epochs", "epochs in all", ".1f")]))
    json_path = args.json or (None if args.smoke else str(RESULTS / "searchers.json"))
    write_json(json_path, results)
    return results


if __name__ == "__main__":
    main()
