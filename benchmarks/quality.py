"""Quality of the six methods on GLUE/SuperGLUE with MiniLM-L6, by the paper's protocol, as Ray sweeps.

    python benchmarks/quality.py [--root ray_results/quality] [--tasks ...] [--seeds 0 1 2] [--grid paper|small]
                                 [--device cpu|cuda] [--resume] [--json PATH]
    python benchmarks/quality.py --smoke            # tiny sample counts: checks that everything starts and ends
    python benchmarks/quality.py --dry-run          # write and check the configs, print each task's workload;
                                                    # start nothing
    python benchmarks/quality.py --protocol v2 ...  # issue 36's protocol: benchmarks/quality_v2.py

Tasks: SuperGLUE CB, GLUE RTE, MRPC, CoLA and an SST-2 subset (`--sst2-samples`, default 10000 of 67349
training sentences; validation whole). Methods: finetune, double_finetune, sequential_dlb, random_dlb,
dynamic_finetune, dynsdpb. Protocol (the paper's Appendix D): AdamW, linear schedule with warm-up, 3 epochs
(6 for double_finetune, by its epoch multiplier), GLUE batch 32 (eval 64, 128 tokens), SuperGLUE batch 8
(eval 8, 256 tokens); the configuration is chosen on the validation set, then run with several seeds.

Two stages per task, each a `python -m raysdpb.sweep` of configs this script writes under `<root>/configs/`:

1. `quality-grid-<task>`: the grid, seed 0: learning rate x alpha x tau (`--grid paper`: lr {2e-5, 5e-5,
   1e-4} x alpha {0.5, 1.0, 1.5} x tau {1.0, 1.5, 2.0}, 96 trials per task; `--grid small`: 2 x 2 x 2, 32
   trials), each method over the hyperparameters it uses. No ASHA by default (every configuration trains its
   full epochs, as in the paper; `--asha` turns it on for this stage only, stopping trials from epoch
   `--asha-grace` on (default 1): stage 2's seeds always train every epoch).
2. `quality-seeds-<task>-<method>`: the method's selected configuration (best validation main metric of
   stage 1, `--at best` over the epoch reports or `last`; ties to the smaller learning rate, alpha, tau) with
   every seed of `--seeds`. The selection is saved in `<root>/selection.json`. Seed 0 at the selected
   configuration is a trial stage 1 already ran (the same config and seed, so the same trial id): where it ran
   all its epochs, its rows, curves and TensorBoard events are copied into the stage's folder and the sweep
   takes it as finished, so stage 2 trains only the other seeds (`--rerun-grid-trials` trains it again). On
   this project's CPU runs a retrained seed 0 gave stage 1's validation metric at every epoch for all 12
   method-task pairs of CoLA and MRPC (training losses agree to about 1e-7).

Then `python -m raysdpb.report <every stage-2 experiment> --out <root>/report` (the results table: mean +-
std over seeds per method and task, and the paired comparisons), and the same over the stage-1 experiments
into `<root>/report-grid` (alpha x tau heatmaps). When `raysdpb.report` is missing or fails, this script says
so and still prints its own table of mean +- std from the Parquet results.

`--grid-per-method`: stage 1 as one sweep per method (`quality-grid-<task>-<method>`) instead of one for the
task. The trials and ASHA's judgement are the same (the sweep's ASHA already compares a method's trials only
with each other); each sweep is a smaller unit that finishes on its own. `--archive DIR`: each finished
sweep's `trials.parquet`, `curves.parquet` and TensorBoard events (packed as `tensorboard.tar.xz`, which the
report reads; a few hundred KB, no checkpoints) are copied to `DIR/<sweep>/` with the sweep's config, and a sweep
found finished there is read from there and never run again (unless its config asks for other trials: then the
script stops and says so): for a `--root` that does not survive (a preemptible node, a new checkout). CoLA ran
that way here, its archive committed under `benchmarks/results/quality-cola/`.

`--resume`: finished sweeps are skipped, an interrupted one is continued with `python -m raysdpb.sweep
--resume`, and the selection already saved is kept, the methods missing from it added (so `--stage seeds
--resume --methods ...` can run the seeds of the methods whose grid has finished while others' still run).
Without it, an existing experiment folder is an error.
Each sweep starts a local Ray (or uses `$RAY_ADDRESS`). Hours on a CPU: on 2 cores CB's small grid with ASHA
took 88 min (32 trials, 2.85 trial-hours) and its stage 2 about an hour; the paper grid is 3x the trials. On
RTE, with three trials sharing the 2 cores, a step of 32 x 128 took 7.4-8.2 s: 29 min per finetune trial,
55 min per double_finetune or DLB trial, about 11 hours for the small grid and the seeds. `--dry-run` prints
every task's workload before anything runs: trials, optimizer steps and padded training tokens of both
stages (the recipe's own samplers and dynamic padding; stage 1 without ASHA) and the hours at
`--tokens-per-s` (default: the 1,700 tokens/s RTE measured here). Small grid, 2-core CPU: CB 1.5 h, RTE 12.2,
MRPC 11.2, CoLA 7.2, the SST-2 subset 15.6 (with seed 0 trained again in stage 2: 1.6, 13.7, 12.7, 8.2,
17.6; CB took 2.5 h: short batches cost more per token; `--asha` or a GPU help). On 2 CPUs,
`--cpus-per-trial 0.66` runs 3 trials at a time (one thread each), and stage 2's two seeds to train keep both
cores busy. On a GPU: `--device cuda` (one GPU per trial, or a fraction with `--gpus-per-trial 0.25` to pack
MiniLM trials).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, offline_env, table, write_json  # noqa: E402

offline_env()

import yaml  # noqa: E402

from raysdpb.report.load import EVENTS_ARCHIVE, pack_tensorboard, unpack_trial_events  # noqa: E402
from raysdpb.results.schema import FINISHED  # noqa: E402

METHODS = ["finetune", "double_finetune", "sequential_dlb", "random_dlb", "dynamic_finetune", "dynsdpb"]
TASKS = ["superglue/cb", "glue/rte", "glue/mrpc", "glue/cola", "glue/sst2"]
GRIDS = {
    "paper": {"lr": [2.0e-5, 5.0e-5, 1.0e-4], "alpha": [0.5, 1.0, 1.5], "tau": [1.0, 1.5, 2.0]},
    "small": {"lr": [5.0e-5, 1.0e-4], "alpha": [0.5, 1.0], "tau": [1.0, 2.0]},
    "smoke": {"lr": [5.0e-5], "alpha": [1.0], "tau": [2.0]},
}
GRID_SEED = 0  # stage 1 trains every configuration with this seed


def _slug(text: str) -> str:
    return text.replace("/", "-")


def task_settings(task: str, args) -> dict:
    """The paper's per-benchmark settings (Appendix D), as in sweeps/glue.yaml and sweeps/superglue.yaml."""
    if task.startswith("superglue/"):
        base = {"batch_size": 8, "eval_batch_size": 8, "max_length": 256, "warmup_ratio": 0.1}
    else:
        base = {"batch_size": 32, "eval_batch_size": 64, "max_length": 128, "warmup_ratio": 0.06}
    if task == "glue/sst2" and args.sst2_samples:
        base["max_train_samples"] = args.sst2_samples
    if args.smoke:
        base.update(batch_size=8, eval_batch_size=16, max_length=64, max_train_samples=16, max_eval_samples=16)
    return base


def base_trial(task: str, args) -> dict:
    trial = {"task": task, "model": args.model, "method": "finetune", "epochs": 1 if args.smoke else args.epochs,
             "lr": 5.0e-5, "weight_decay": 0.01, "max_grad_norm": 1.0, "alpha": 1.0, "tau": 1.0, "seed": 0,
             "precision": "auto", "device": args.device, **task_settings(task, args)}
    if args.data_dir:
        trial["data_dir"] = args.data_dir
    return trial


def sweep_block(name: str, args, asha: bool = False) -> dict:
    """The `sweep:` block; `asha` only for stage 1 (stage 2's seeds all train their full epochs)."""
    block = {"name": name, "storage_path": str(Path(args.root).resolve()), "num_workers": 1,
             "keep_checkpoints": 1, "max_failures": 1,
             "asha": {"mode": "max", "grace_period": args.asha_grace, "reduction_factor": 3} if asha else None}
    if args.device == "cuda":
        block.update(use_gpu=True, gpus_per_worker=args.gpus_per_trial, cpus_per_worker=args.cpus_per_trial)
    else:
        block.update(use_gpu=False, cpus_per_worker=args.cpus_per_trial)
    return block


def write_config(path: Path, trial: dict, search: dict, sweep: dict, comment: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({**trial, "search": search, "sweep": sweep}, sort_keys=False)
    path.write_text(f"# {comment}\n# written by benchmarks/quality.py; run with python -m raysdpb.sweep {path}\n{body}")
    return path


def grid_name(task: str, method: str | None = None) -> str:
    """Stage 1's experiment: one for every method (`quality-grid-<task>`) or, with `--grid-per-method`, one
    per method (`quality-grid-<task>-<method>`)."""
    return f"quality-grid-{_slug(task)}" + (f"-{method}" if method else "")


def grid_config(task: str, args, method: str | None = None) -> tuple[str, Path]:
    """Stage 1's sweep config: the grid of every method of `args.methods`, or of `method` alone."""
    name = grid_name(task, method)
    grid = GRIDS["smoke" if args.smoke else args.grid]
    search = {"method": [method] if method else list(args.methods), **grid, "seed": [GRID_SEED]}
    what = f"{method}'s grid" if method else "the grid"
    path = write_config(Path(args.root) / "configs" / f"{name}.yaml", base_trial(task, args), search,
                        sweep_block(name, args, asha=args.asha), f"stage 1 of the quality benchmark: {what} on {task}")
    return name, path


def _grid_methods(args) -> list[str | None]:
    """What each stage-1 sweep of a task runs: every method (None), or with `--grid-per-method` one method
    each (each sweep a unit that finishes, and is archived, on its own)."""
    return list(args.methods) if args.grid_per_method else [None]


def grid_configs(task: str, args) -> list[tuple[str, Path]]:
    return [grid_config(task, args, method) for method in _grid_methods(args)]


def grid_names(task: str, args) -> list[str]:
    return [grid_name(task, method) for method in _grid_methods(args)]


def seeds_name(task: str, method: str) -> str:
    return f"quality-seeds-{_slug(task)}-{method}"


def seeds_config(task: str, method: str, chosen: dict, args) -> tuple[str, Path]:
    name = seeds_name(task, method)
    trial = {**base_trial(task, args), "method": method, **{k: chosen[k] for k in ("lr", "alpha", "tau")}}
    path = write_config(Path(args.root) / "configs" / f"{name}.yaml", trial, {"seed": list(args.seeds)},
                        sweep_block(name, args),
                        f"stage 2 of the quality benchmark: {method} on {task} at its selected configuration")
    return name, path


# --- running sweeps, resumably -----------------------------------------------------------------------------

def _rows(experiment: Path) -> list[dict]:
    from raysdpb.results.storage import read_rows

    return read_rows(str(experiment / "trials.parquet"))


def _finished(rows: list[dict]) -> bool:
    """Every trial of a sweep (its trials.parquet rows) has finished."""
    return bool(rows) and all(r["status"] in FINISHED for r in rows)


# What a finished sweep's results are, without Tune's state and the checkpoints: the tables and the curves.
ARCHIVED = ("trials.parquet", "curves.parquet", "tensorboard")


def archive_sweep(experiment: Path, archive: Path, config: Path) -> Path:
    """Copy a finished sweep's results (`ARCHIVED`, the trials' saved predictions) and its config (`config.yaml`)
    to `<archive>/<sweep>/`: a few hundred KB that a repository or a bucket keeps where `--root` does not survive
    (a preemptible node, a new checkout)."""
    target = archive / experiment.name
    target.mkdir(parents=True, exist_ok=True)
    for entry in ARCHIVED:
        source = experiment / entry
        if source.is_dir():
            shutil.copytree(source, target / entry, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, target / entry)
    # a trial's saved predictions (`save_predictions`: protocol v2's bootstrap over examples), a few KB each
    for predictions in experiment.glob("artifacts/*/predictions"):
        shutil.copytree(predictions, target / predictions.relative_to(experiment), dirs_exist_ok=True)
    if config.exists():
        shutil.copy2(config, target / "config.yaml")
    pack_tensorboard(target)  # the events as one tensorboard.tar.xz: a sixth of the folder's size, read by the report
    return target


def what_it_trains(config: Path) -> dict:
    """A sweep config without what does not change its results (where it is stored, the resources, where the data
    mirror is mounted: `--data-dir` or `$RAYSDPB_DATA_DIR`, the same files at another path)."""
    body = yaml.safe_load(config.read_text())
    sweep = body.pop("sweep", None) or {}
    body.pop("data_dir", None)
    if body.get("teacher_model"):  # protocol v2's teacher, exported under --root: its task's folder is what counts
        body["teacher_model"] = Path(body["teacher_model"]).name
    return {**body, "asha": sweep.get("asha")}


def check_archived_config(experiment: Path, config: Path) -> None:
    """An archived sweep stands for this run only if it trained what this run's config asks for."""
    kept = experiment / "config.yaml"
    if not (kept.exists() and config.exists()):
        return
    old, new = what_it_trains(kept), what_it_trains(config)
    if old != new:
        changed = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise SystemExit(f"{experiment} holds a finished run of {experiment.name} with other settings ({changed}); "
                         "pass another --archive (or remove that folder) to run these")


def experiment_dir(name: str, args) -> Path:
    """Where a sweep's results are read from: its archived copy when `--archive` holds a finished one (the
    sweep is then never run again), else `<root>/<sweep>`."""
    if args.archive:
        kept = Path(args.archive) / name
        if _finished(_rows(kept)):
            return kept
    return Path(args.root) / name


def stage1_rows(task: str, args) -> list[dict]:
    """Stage 1's trials of a task as its finished or interrupted sweeps left them (archived or under --root)."""
    return [r for name in grid_names(task, args) for r in _rows(experiment_dir(name, args))]


def reuse_finished_trials(experiment: Path, config: Path, sources: list[Path]) -> list[str]:
    """Start the experiment folder of `config`'s sweep with the trials that an earlier sweep (`sources`, e.g.
    stage 1) already ran to the end: the same trial id is the same config and seed. Their rows, curves and
    TensorBoard events are copied, with the `finished/<trial_id>.json` marker `raysdpb.sweep` leaves for a
    finished trial, so the sweep announces them instead of training them again; the other trials are listed
    as pending, as the sweep lists them when it starts (so a run stopped before then is not taken for a
    finished sweep). Returns the reused ids; with none, nothing is written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from raysdpb.config import load_experiment
    from raysdpb.results.recorder import write_finished_marker
    from raysdpb.results.storage import write_table
    from raysdpb.sweep.grid import expand

    points = expand(load_experiment(config))
    wanted = {p.trial_id for p in points}
    reused: list[str] = []
    trials, curves = [], []
    for source in sources:
        found = [r for r in _rows(source)
                 if r["trial_id"] in wanted and r["status"] == "completed" and r["trial_id"] not in reused]
        if not found:
            continue
        ids = [r["trial_id"] for r in found]
        trials += found
        these = pq.read_table(source / "curves.parquet").filter(pc.is_in(pc.field("trial_id"), pa.array(ids)))
        curves.append(these)
        curve_rows = these.to_pylist()
        for trial_id in ids:
            rows = sorted((r for r in curve_rows if r["trial_id"] == trial_id), key=lambda r: r["step"] or 0)
            last = {k: v for k, v in (rows[-1] if rows else {}).items() if v is not None}
            write_finished_marker(str(experiment), trial_id, "completed", last)
            events = source / "tensorboard" / trial_id
            if events.is_dir():
                shutil.copytree(events, experiment / "tensorboard" / trial_id, dirs_exist_ok=True)
            elif (source / EVENTS_ARCHIVE).is_file():  # an archived sweep's packed events
                unpack_trial_events(source / EVENTS_ARCHIVE, trial_id, experiment / "tensorboard" / trial_id)
        reused += ids
    if reused:
        pending = [{"trial_id": p.trial_id, "label": p.label, "status": "pending"} for p in points
                   if p.trial_id not in reused]
        write_table(pa.concat_tables(curves, promote_options="default"), str(experiment / "curves.parquet"))
        write_table(pa.Table.from_pylist(trials + pending), str(experiment / "trials.parquet"))
    return reused


def run_sweep(name: str, config: Path, args, reuse_from: list[Path] | None = None) -> list[dict]:
    """Run a sweep unless it finished earlier (under --root or in --archive); archive it when it finishes.
    `reuse_from`: earlier experiments whose finished trials this sweep takes instead of training them again
    (when it starts)."""
    experiment = experiment_dir(name, args)
    from_archive = args.archive is not None and experiment.parent == Path(args.archive)
    rows = _rows(experiment)
    if _finished(rows):
        if from_archive:
            check_archived_config(experiment, config)
        print(f"[{name}] finished earlier ({experiment}); skipped", flush=True)
    else:
        reused = []
        if reuse_from and not experiment.exists():
            reused = reuse_finished_trials(experiment, config, reuse_from)
            if reused:
                print(f"[{name}] {', '.join(reused)}: trained to the end in stage 1 (same config and seed); "
                      "reused, not trained again", flush=True)
        rows = _run(name, config, experiment, args, started_here=bool(reused))
    if args.archive and not from_archive and _finished(rows):
        print(f"[{name}] archived in {archive_sweep(experiment, Path(args.archive), config)}", flush=True)
    return rows


def _run(name: str, config: Path, experiment: Path, args, started_here: bool = False) -> list[dict]:
    """Start the sweep, or continue it (`--resume`) where `experiment` holds an unfinished run; its rows.
    `started_here`: this run just wrote the folder (the trials it reuses), so it is not an earlier run's."""
    cmd = [sys.executable, "-m", "raysdpb.sweep", str(config)]
    if experiment.exists():
        if not (args.resume or started_here):
            raise SystemExit(f"{experiment} exists and is not finished; continue it with --resume "
                             "(or choose another --root)")
        # Tune's state (what `Tuner.can_restore` looks for); a folder without it holds only reused trials
        # (a run stopped before the sweep started), and the sweep starts there, taking them as finished
        if (experiment / "tuner.pkl").exists():
            cmd.append("--resume")
    if args.quiet:
        cmd.append("-q")
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    log = Path(args.root) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    rows = _rows(experiment)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"[{name}] exit {proc.returncode} after {time.perf_counter() - t0:.0f}s: {counts}; log {log}", flush=True)
    if proc.returncode != 0 and not args.keep_going:
        raise SystemExit(f"[{name}] the sweep did not finish cleanly (see {log}); fix the cause and run again "
                         "with --resume")
    return rows


# --- the workload: what the stages will train, before anything runs (--dry-run) ----------------------------

# The training throughput this project's CPU machine measured on RTE's stage 1 (2026-11-29, 2 cores, fp32,
# three trials at once: each finished trial's padded tokens over its wall time, start-up and evaluation
# included, 500-595 tokens/s per trial, median 568); `--tokens-per-s` replaces it with a machine's own figure.
# Small batches of short sequences cost more per token (per-step overhead): CB's estimate was 1.6 h (stage 2
# training seed 0 again), its small grid with ASHA and its seeds took about 2.5 h.
MEASURED_TOKENS_PER_S = 1700.0


def padded_tokens(lengths, batches, choices: int = 1, pad_to_multiple_of: int | None = None) -> tuple[int, int]:
    """(steps, tokens) of a stream of index batches as the recipe's collator pads them (each batch to its
    longest, rounded up to `pad_to_multiple_of`; a multiple-choice item is `choices` sequences, `lengths`
    its longest)."""
    from raysdpb.data import padded_length

    steps = tokens = 0
    for batch in batches:
        steps += 1
        tokens += len(batch) * choices * padded_length(max(lengths[i] for i in batch), pad_to_multiple_of)
    return steps, tokens


def trial_workload(lengths, method: str, batch_size: int, epochs: int, seed: int,
                   choices: int = 1, pad_to_multiple_of: int | None = None) -> tuple[int, int]:
    """(optimizer steps, padded training tokens) of one trial: the recipe's own sampler over every epoch."""
    from raysdpb.recipe.components import make_sampler
    from raysdpb.methods import METHODS as REGISTRY

    spec = REGISTRY[method]
    sampler = make_sampler(spec, len(lengths), batch_size, seed=seed)
    steps = tokens = 0
    for epoch in range(epochs * spec.epoch_multiplier):
        sampler.set_epoch(epoch)
        s, t = padded_tokens(lengths, sampler, choices, pad_to_multiple_of)
        steps, tokens = steps + s, tokens + t
    return steps, tokens


def train_lengths(cfg) -> tuple[list[int], int]:
    """The token count of every training example a sweep's trials see (the recipe's loading and tokenizer),
    and the sequences per example (a multiple-choice item's choices; their longest is its length)."""
    from raysdpb.recipe.components import load_train_data
    from raysdpb.models import load_tokenizer, resolve_model
    from raysdpb.tasks import resolve_task

    data = load_train_data(cfg, resolve_task(cfg), load_tokenizer(resolve_model(cfg.model, cfg.gguf_file)))
    items = [data[i]["input_ids"] for i in range(len(data))]
    if items and isinstance(items[0][0], list):
        return [max(len(c) for c in ids) for ids in items], len(items[0])
    return [len(ids) for ids in items], 1


def workload(task: str, grid_path: Path, args) -> dict:
    """Trials, steps and padded tokens of both stages of one task (stage 1 without ASHA: an upper bound)."""
    from raysdpb.config import load_experiment
    from raysdpb.data import pad_multiple_for
    from raysdpb.sweep.grid import expand

    experiment = load_experiment(grid_path)
    lengths, choices = train_lengths(experiment.trial)
    pad_to = pad_multiple_for(args.device)
    memo: dict[tuple, tuple[int, int]] = {}

    def one(method: str, batch_size: int, epochs: int, seed: int) -> tuple[int, int]:
        key = (method, batch_size, epochs, seed)
        if key not in memo:
            memo[key] = trial_workload(lengths, method, batch_size, epochs, seed, choices, pad_to)
        return memo[key]

    grid = [one(p.config.method, p.config.batch_size, p.config.epochs, p.config.seed) for p in expand(experiment)]
    base = base_trial(task, args)
    # stage 1's own seed at the selected configuration is reused, not trained again (without ASHA it always
    # ran to the end), unless --rerun-grid-trials
    seeds = [one(m, base["batch_size"], base["epochs"], s) for m in args.methods for s in args.seeds
             if args.rerun_grid_trials or s != GRID_SEED]
    grid_tokens, seed_tokens = sum(t for _, t in grid), sum(t for _, t in seeds)
    return {"task": task, "train_examples": len(lengths),
            "mean_tokens": sum(lengths) / len(lengths),
            "grid_trials": len(grid), "grid_steps": sum(s for s, _ in grid), "grid_tokens": grid_tokens,
            "seed_trials": len(seeds), "seed_steps": sum(s for s, _ in seeds), "seed_tokens": seed_tokens,
            "hours": (grid_tokens + seed_tokens) / args.tokens_per_s / 3600}


# --- selection and the summary -----------------------------------------------------------------------------

def main_metric(task: str) -> str:
    from raysdpb.results import schema
    from raysdpb.tasks import get_task

    return schema.main_metric(get_task(task))


def select(rows: list[dict], task: str, at: str) -> dict[str, dict]:
    """The best configuration of each method by the validation main metric (ties: smaller lr, alpha, tau)."""
    column = f"{at}_{main_metric(task)}"
    chosen: dict[str, dict] = {}
    for r in rows:
        score = r.get(column)
        if r["status"] not in FINISHED or score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        key = (-score, r["lr"], r["alpha"], r["tau"])
        if r["method"] not in chosen or key < chosen[r["method"]]["_key"]:
            chosen[r["method"]] = {"lr": r["lr"], "alpha": r["alpha"], "tau": r["tau"], "score": score,
                                   "metric": column, "trial_id": r["trial_id"], "label": r["label"], "_key": key}
    return {m: {k: v for k, v in c.items() if k != "_key"} for m, c in chosen.items()}


def summarise(args) -> list[dict]:
    out, at = [], args.at
    for task in args.tasks:
        for method in args.methods:
            rows = _rows(experiment_dir(seeds_name(task, method), args))
            column = f"{at}_{main_metric(task)}"
            values = [r[column] for r in rows if r["status"] in FINISHED and r.get(column) is not None]
            out.append({"task": task, "method": method, "metric": column, "seeds": len(values),
                        "mean": statistics.mean(values) if values else None,
                        "std": statistics.stdev(values) if len(values) > 1 else None,
                        "values": values})
    return out


def run_report(experiments: list[Path], out: Path, what: str) -> bool:
    if importlib.util.find_spec("raysdpb.report") is None:
        print(f"raysdpb.report is not available in this checkout (python -m raysdpb.report); the {what} report "
              "was not written; the table below comes from the Parquet results", flush=True)
        return False
    existing = [str(e) for e in experiments if (e / "trials.parquet").exists()]
    if not existing:
        print(f"no finished experiments for the {what} report", flush=True)
        return False
    cmd = [sys.executable, "-m", "raysdpb.report", *existing, "--out", str(out)]
    print(f"[report] {' '.join(cmd[1:3])} ... ({len(existing)} experiments) --out {out}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"python -m raysdpb.report failed (exit {proc.returncode}); the {what} report was not written:\n  "
              + "\n  ".join(tail), flush=True)
        return False
    print(f"[report] {what} report in {out}", flush=True)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on other options (tasks, seeds, root) filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO / "ray_results" / "quality"),
                   help="where the experiments, configs, logs and reports go (sweep.storage_path)")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: {' '.join(TASKS)} (smoke: superglue/cb)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="stage 2 seeds (default 0 1 2; smoke 0 1)")
    p.add_argument("--grid", choices=["paper", "small"], default="paper")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--at", choices=["best", "last"], default="best",
                   help="a trial's score: its best epoch's validation metric, or its last epoch's")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--sst2-samples", type=int, default=10000, help="SST-2 training subset (0: all)")
    p.add_argument("--data-dir", default=None, help="default: $RAYSDPB_DATA_DIR or ../shared/data")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=1.0)
    p.add_argument("--asha", action="store_true", help="stage 1 with ASHA (grace --asha-grace epochs, reduction 3)")
    p.add_argument("--asha-grace", type=int, default=1,
                   help="epochs every stage-1 trial trains before ASHA may stop it (CoLA's MCC is about 0 for "
                        "most configurations after one epoch)")
    p.add_argument("--grid-per-method", action="store_true",
                   help="stage 1 as one sweep per method (same trials and ASHA groups; smaller units that finish)")
    p.add_argument("--archive", default=None,
                   help="copy each finished sweep's tables and curves to ARCHIVE/<sweep>/, and take a sweep "
                        "found there as finished (for a --root that does not survive, e.g. a new checkout)")
    p.add_argument("--resume", action="store_true", help="continue: skip finished sweeps, resume unfinished ones")
    p.add_argument("--keep-going", action="store_true", help="go on after a sweep with errored trials")
    p.add_argument("--stage", choices=["all", "grid", "seeds", "report"], default="all",
                   help="what to run: everything; stage 1 or 2 alone (the paper's protocol); report: the tables "
                        "and statistics of what finished (with --archive: a checkout's committed results), "
                        "nothing trained")
    p.add_argument("--rerun-grid-trials", action="store_true",
                   help="stage 2 trains seed 0 at the selected configuration again instead of taking stage 1's "
                        "trial (the same config and seed)")
    p.add_argument("--smoke", action="store_true", help="16 samples, 1 epoch, a one-point grid: a start-up check")
    p.add_argument("--dry-run", action="store_true",
                   help="write the configs, check them, and print each task's workload (no Ray)")
    p.add_argument("--tokens-per-s", type=float, default=None,
                   help="training throughput for --dry-run's hours (default: what RTE measured on 2 CPU cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="pass -q to the sweeps")
    p.add_argument("--protocol", choices=["paper", "v2"], default="paper",
                   help="the paper's protocol (this docstring) or issue 36's v2 (benchmarks/quality_v2.py)")
    v2 = p.add_argument_group("protocol v2")
    v2.add_argument("--configs", type=int, default=None, help="stage-1 configurations per method (2, 4, 8; "
                    "default per task, quality_v2.V2_CONFIGS: CB 8, others 4; smoke 2)")
    v2.add_argument("--seeds-n", type=int, default=None, help="stage-2 fresh seeds (default 5, smoke 2)")
    v2.add_argument("--dev-size", type=int, default=None, help="held-out dev examples (default CB 50, others 200)")
    v2.add_argument("--student-layers", type=int, default=None,
                    help="the student on every task: the first k layers of --model (0: the whole model; default: "
                         "per task, quality_v2.V2_STUDENT_LAYERS)")
    v2.add_argument("--eval-every", type=int, default=None,
                    help="optimizer steps between evaluations, the same for every method (default: a finetune epoch)")
    v2.add_argument("--n-boot", type=int, default=4000, help="bootstrap replicates")
    p.add_argument("--json", default=None, help=f"the summary as JSON (e.g. {RESULTS / 'quality.json'})")
    args = p.parse_args(argv)
    if args.protocol == "v2":
        from quality_v2 import V2_METHODS, V2_TASKS, V2_MEASURED_TOKENS_PER_S

        args.tokens_per_s = args.tokens_per_s or V2_MEASURED_TOKENS_PER_S

        args.tasks = args.tasks or (["superglue/cb"] if args.smoke else V2_TASKS)
        if args.methods == METHODS:
            args.methods = list(V2_METHODS)
        # args.configs and args.student_layers: None leaves them to each task (quality_v2.configs_per_method,
        # student_layers)
        args.seeds_n = args.seeds_n or (2 if args.smoke else 5)
        if args.root == p.get_default("root"):
            args.root = str(REPO / "ray_results" / ("quality-v2-smoke" if args.smoke else "quality-v2"))
    args.tasks = args.tasks or (["superglue/cb"] if args.smoke else TASKS)
    args.tokens_per_s = args.tokens_per_s or MEASURED_TOKENS_PER_S
    args.seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    if args.smoke and args.root == p.get_default("root"):
        args.root = str(REPO / "ray_results" / "quality-smoke")
    args.root = str(Path(args.root).resolve())
    args.archive = str(Path(args.archive).resolve()) if args.archive else None
    return args


def main() -> None:
    args = parse_args()
    if args.protocol == "v2":
        from quality_v2 import main_v2

        main_v2(args)
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if args.dry_run or args.smoke:
        loads: list[dict] = []
        # every task's grid config through the sweep's own validation (no Ray), and, in a smoke run, every
        # task's data through the loaders
        for task in (TASKS if args.smoke else args.tasks):
            name, path = grid_config(task, args)  # the whole grid: one check, one workload, either layout
            proc = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(path), "--dry-run"], cwd=REPO,
                                  capture_output=True, text=True)
            last = (proc.stdout.strip().splitlines() or ["?"])[-1]
            print(f"{name}: {path}\n  {last if proc.returncode == 0 else proc.stderr.strip()[-300:]}", flush=True)
            if proc.returncode != 0:
                raise SystemExit(f"{path}: the sweep rejects this config")
            if args.dry_run and not args.smoke:
                loads.append(workload(task, path, args))
            if args.smoke:
                from raysdpb.tasks import data_dir_from, get_task, load_examples

                spec = get_task(task)
                counts = {split: len(load_examples(spec, split, data_dir_from(args.data_dir)))
                          for split in (spec.train_split, *(s for s, _ in spec.eval_splits))}
                print(f"  data: {counts}", flush=True)
        if args.dry_run:
            reused = "" if args.rerun_grid_trials else f" (seed {GRID_SEED} is stage 1's trial, not trained again)"
            print(f"\n== the workload: padded training tokens (dynamic padding, the recipe's samplers); stage 1 "
                  f"without ASHA, stage 2 with {len(args.seeds)} seeds{reused}; hours at {args.tokens_per_s:,.0f} "
                  "tokens/s (--tokens-per-s)")
            shown = [{**w, "grid_mtok": w["grid_tokens"] / 1e6, "seed_mtok": w["seed_tokens"] / 1e6} for w in loads]
            print(table(shown, [("task", "task", ""), ("train_examples", "examples", "d"),
                                ("mean_tokens", "mean len", ".1f"), ("grid_trials", "grid trials", "d"),
                                ("grid_steps", "grid steps", "d"), ("grid_mtok", "grid Mtok", ".1f"),
                                ("seed_trials", "seed trials", "d"), ("seed_steps", "seed steps", "d"),
                                ("seed_mtok", "seed Mtok", ".1f"), ("hours", "hours", ".1f")]))
            write_json(args.json, {"benchmark": "quality-workload", "grid": args.grid,
                                   "tokens_per_s": args.tokens_per_s, "tasks": loads})
            return

    selection_path = root / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.exists() else {}
    for task in args.tasks:
        if args.stage in ("all", "grid", "seeds"):
            if args.stage == "seeds":  # stage 1's results as they are; its config stays as stage 1 wrote it
                rows = stage1_rows(task, args)
            else:
                rows = [r for name, path in grid_configs(task, args) for r in run_sweep(name, path, args)]
            # a resumed run keeps each method's recorded choice (its stage 2 may have started from it) and
            # adds the methods whose stage 1 finished since
            recorded = selection.get(task, {}) if args.resume else {}
            chosen = {**select(rows, task, args.at), **recorded}
            if chosen and chosen != selection.get(task):
                selection[task] = chosen
                selection_path.write_text(json.dumps(selection, indent=2))
            if task in selection:
                print(table([{"method": m, **c} for m, c in selection[task].items()],
                            [("method", "method", ""), ("lr", "lr", "g"), ("alpha", "alpha", "g"),
                             ("tau", "tau", "g"), ("score", selection[task][next(iter(selection[task]))]["metric"],
                                                   ".4f")]), flush=True)
        if args.stage in ("all", "seeds"):
            stage1 = [experiment_dir(n, args) for n in grid_names(task, args)]
            for method in args.methods:
                chosen = selection.get(task, {}).get(method)
                if chosen is None:
                    print(f"[{task}] {method}: no finished stage-1 trial to select from; stage 2 skipped", flush=True)
                    continue
                name, path = seeds_config(task, method, chosen, args)
                run_sweep(name, path, args, reuse_from=None if args.rerun_grid_trials else stage1)
        if args.stage == "report" and task not in selection:
            # a new checkout: no selection.json under --root, but stage 1's tables (e.g. in --archive) say
            # what was chosen; the summary JSON reports it rather than an empty selection
            if chosen := select(stage1_rows(task, args), task, args.at):
                selection[task] = chosen

    seeds_experiments = [experiment_dir(seeds_name(t, m), args) for t in args.tasks for m in args.methods]
    grid_experiments = [experiment_dir(name, args) for t in args.tasks for name in grid_names(t, args)]
    reports = {"seeds": run_report(seeds_experiments, root / "report", "results"),
               "grid": run_report(grid_experiments, root / "report-grid", "grid")}
    summary = summarise(args)
    print("\n== validation main metric at the selected configuration, mean +- std over seeds")
    print(table(summary, [("task", "task", ""), ("method", "method", ""), ("metric", "metric", ""),
                          ("seeds", "seeds", "d"), ("mean", "mean", ".4f"), ("std", "std", ".4f")]))
    result = {"benchmark": "quality", "root": str(root), "smoke": args.smoke,
              "grid": "smoke" if args.smoke else args.grid,
              "seeds": args.seeds, "tasks": args.tasks, "methods": args.methods, "at": args.at,
              "selection": selection, "summary": summary, "reports_written": reports,
              "elapsed_s": time.perf_counter() - t0}
    (root / "quality_summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"total {result['elapsed_s']:.0f}s; summary in {root / 'quality_summary.json'}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
