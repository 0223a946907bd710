"""raysdpb.sweep against the peer a user would try first: Hugging Face Trainer's
`hyperparameter_search(backend="ray")`, on the same trials, side by side in one run.

    python benchmarks/vs_hf_search.py [--epochs 2] [--lrs 5e-5 1e-4] [--max-train-samples 0] [--json PATH]

The trials (issue 33's comparison): finetune of MiniLM-L6 on SuperGLUE CB (250 training examples, 56 to validate),
2 epochs, batch 8 (eval 8), 128 tokens, AdamW with the linear schedule and 10% warm-up, weight decay 0.01, one
trial per learning rate, two at a time on one CPU each. Each tool runs as its own command on a fresh local Ray:

* `hf`: a plain `transformers.Trainer` script (the model from `AutoModelForSequenceClassification`, the data a
  `datasets.Dataset` tokenized by `map`, `DataCollatorWithPadding`) and `trainer.hyperparameter_search(
  backend="ray", hp_space=grid over learning_rate, n_trials=1, resources_per_trial={"cpu": 1})`, evaluating every
  epoch; checkpoints as HF writes them by default for this many steps (`save_strategy="steps"`, every 500: none
  here) — `--hf-save epoch` saves every epoch as raysdpb does;
* `raysdpb`: `python -m raysdpb.sweep` of the same grid (ASHA off), which evaluates and checkpoints every epoch and
  keeps the best trial's weights (`keep_weights: 1`).

Reported: the command's wall time, each trial's time as Tune counts it (`time_total_s` of its last result), the
storage each leaves, and each trial's final validation accuracy (the two tools' models start from the same weights
but not the same head or data order, so accuracies agree only roughly). The machine's load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine_info, offline_env, table, write_json  # noqa: E402

from raysdpb.results.schema import PHASE_TIME_KEYS  # noqa: E402

offline_env()


def _trial(args) -> dict:
    return dict(task="superglue/cb", model="minilm-l6", method="finetune", epochs=args.epochs, batch_size=8,
                eval_batch_size=8, max_length=128, lr=args.lrs[0], warmup_ratio=0.1, weight_decay=0.01, seed=0,
                device="cpu", data_dir=os.environ.get("RAYSDPB_DATA_DIR"),
                **({"max_train_samples": args.max_train_samples} if args.max_train_samples else {}))


def run_hf(out: Path, args) -> dict:
    """The peer, in this process: the HF Trainer's Ray Tune search."""
    import datasets
    from ray import tune
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from raysdpb.config import TrialConfig
    from raysdpb.models import resolve_model
    from raysdpb.tasks import data_dir_from, load_examples, resolve_task

    cfg = TrialConfig.model_validate(_trial(args))
    task = resolve_task(cfg)
    path = resolve_model(cfg.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)

    def dataset(split: str, limit: int | None):
        records = load_examples(task, split, data_dir_from(cfg.data_dir))[:limit]
        rows = [{"text": r["text"], "text_pair": r["text_pair"], "label": r["label"]} for r in records]
        return datasets.Dataset.from_list(rows).map(
            lambda b: tokenizer(b["text"], b["text_pair"], truncation=True, max_length=cfg.max_length), batched=True)

    train, validation = dataset("train", cfg.max_train_samples), dataset("validation", None)

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    training = TrainingArguments(
        output_dir=str(out / "runs"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        num_train_epochs=cfg.epochs, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear", eval_strategy="epoch", save_strategy=args.hf_save, logging_steps=10,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=cfg.seed)
    trainer = Trainer(model_init=model_init, args=training, train_dataset=train, eval_dataset=validation,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    best = trainer.hyperparameter_search(
        hp_space=lambda _: {"learning_rate": tune.grid_search(list(args.lrs))}, backend="ray", n_trials=1,
        direction="maximize", compute_objective=lambda m: m["eval_accuracy"], resources_per_trial={"cpu": 1},
        storage_path=str(out / "ray"), name="hf_search", verbose=0)
    return {"trials": [{"lr": t.config["learning_rate"], "time_total_s": t.last_result.get("time_total_s"),
                        "eval_accuracy": t.last_result.get("eval_accuracy"), **_hf_phases(Path(t.path))}
                       for t in best.run_summary.trials]}


def _hf_phases(trial_dir: Path) -> dict:
    """Where an HF trial's time went, as far as its reports tell: the evaluations' seconds (`eval_runtime` of each
    report) and the time to its first report (set-up, the first epoch's training, the first evaluation)."""
    import pandas as pd

    progress = trial_dir / "progress.csv"
    if not progress.exists():
        return {}
    frame = pd.read_csv(progress)
    return {"hf_eval_s": float(frame["eval_runtime"].sum()) if "eval_runtime" in frame else None,
            "first_report_s": float(frame["time_total_s"].iloc[0])}


def run_raysdpb(out: Path, args) -> dict:
    import yaml

    from raysdpb.results import read_rows

    raw = {**_trial(args), "search": {"lr": list(args.lrs)},
           "sweep": {"name": "raysdpb_search", "storage_path": str(out / "ray"), "num_workers": 1,
                     "cpus_per_worker": 1, "max_concurrent_trials": 2, "asha": None, "keep_checkpoints": 1}}
    config = out / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], cwd=out, env=_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = read_rows(str(out / "ray" / "raysdpb_search" / "trials.parquet"))
    # where each trial's time went (the trial rows' time_*_s: set-up, training, evaluation, checkpoint writing)
    # Tune's own clock of each trial (what the peer's figure is), beside raysdpb's (the trial rows' wall_time_s)
    tune_total = {}
    for result in (out / "ray" / "raysdpb_search").glob("*/result.json"):
        last = json.loads(result.read_text().strip().splitlines()[-1])
        tune_total[last["config"]["trial_id"]] = last.get("time_total_s")
    return {"trials": [{"lr": r["lr"], "time_total_s": r.get("wall_time_s"), "tune_time_total_s":
                        tune_total.get(r["trial_id"]), "eval_accuracy": r.get("last_eval_accuracy"),
                        **{k: r.get(k) for k in PHASE_TIME_KEYS}} for r in rows]}


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _command(tool: str, root: Path, argv: list[str]) -> dict:
    """One tool's run as its own command (a fresh Python and a fresh local Ray), timed."""
    out = root / tool
    out.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--run", tool, "--out", str(out), *argv], env=_env(),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (root / f"{tool}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{tool} failed: {proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    storage = _size(out / "ray") + (_size(out / "runs") if (out / "runs").exists() else 0)
    return {"tool": tool, "command_wall_s": wall, "storage_bytes": storage, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 1e-4])
    p.add_argument("--max-train-samples", type=int, default=0, help="0: all 250")
    p.add_argument("--hf-save", choices=["steps", "epoch", "no"], default="steps",
                   help="the peer's save_strategy (steps: HF's default, every 500 steps)")
    p.add_argument("--json", default=None, help=f"e.g. {RESULTS / 'vs_hf_search.json'}")
    p.add_argument("--run", choices=["hf", "raysdpb"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:  # one tool, in a process of its own
        out = Path(args.out)
        result = (run_hf if args.run == "hf" else run_raysdpb)(out, args)
        (out / "result.json").write_text(json.dumps(result))
        return
    argv = ["--epochs", str(args.epochs), "--lrs", *map(str, args.lrs), "--max-train-samples",
            str(args.max_train_samples), "--hf-save", args.hf_save]
    root = Path(tempfile.mkdtemp(prefix="raysdpb-vs-hf-search-"))
    machine = machine_info()
    try:
        runs = [_command(tool, root, argv) for tool in ("hf", "raysdpb")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for run in runs:
        for trial in run["trials"]:
            rows.append({"tool": run["tool"], "lr": trial["lr"], "trial_s": trial["time_total_s"],
                         "acc": trial["eval_accuracy"], "command_s": run["command_wall_s"],
                         "storage_mb": run["storage_bytes"] / 1e6})
    print(table(rows, [("tool", "tool", ""), ("lr", "lr", "g"), ("trial_s", "trial_s", ".1f"), ("acc", "acc", ".4f"),
                       ("command_s", "command_s", ".1f"), ("storage_mb", "storage_MB", ".1f")]))
    mean = {run["tool"]: sum(t["time_total_s"] for t in run["trials"]) / len(run["trials"]) for run in runs}
    walls = {run["tool"]: run["command_wall_s"] for run in runs}
    print(f"raysdpb/hf: per trial {mean['raysdpb'] / mean['hf']:.2f}x, command {walls['raysdpb'] / walls['hf']:.2f}x")
    for trial in next(run for run in runs if run["tool"] == "raysdpb")["trials"]:
        phases = ", ".join(f"{k[5:-2]} {trial[k]:.1f} s" for k in PHASE_TIME_KEYS if trial.get(k) is not None)
        tune = trial.get("tune_time_total_s")
        print(f"raysdpb lr {trial['lr']:g}: {trial['time_total_s']:.1f} s = {phases} + the rest"
              + (f" (Tune's time_total_s {tune:.1f} s)" if tune is not None else ""))
    for trial in next(run for run in runs if run["tool"] == "hf")["trials"]:
        if trial.get("hf_eval_s") is not None:
            print(f"hf lr {trial['lr']:g}: {trial['time_total_s']:.1f} s, of which evaluation "
                  f"{trial['hf_eval_s']:.1f} s; first report at {trial['first_report_s']:.1f} s")
    write_json(args.json, {"benchmark": "vs_hf_search", "machine": machine, "machine_after": machine_info(),
                           "settings": vars(args) | {"run": None, "out": None}, "runs": runs,
                           "per_trial_ratio": mean["raysdpb"] / mean["hf"],
                           "command_ratio": walls["raysdpb"] / walls["hf"]})


if __name__ == "__main__":
    main()
