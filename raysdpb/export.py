"""From a sweep to a model: a trial's checkpoint as a Hugging Face folder that `from_pretrained` and `pipeline()`
load.

    python -m raysdpb.export EXPERIMENT (--trial ID | --best [--per-method]) --out DIR [--merge]

* `--trial ID`: that trial, into DIR.
* `--best`: the best trial of each task and model of the sweep, by its task's main metric (ties to the first in
  grid order, as the sweep's summary and the report break them): DIR itself when there is one, else
  `DIR/<task>_<model>`; `--per-method` the best of each method too (`DIR/<task>_<model>_<method>`).

Each folder holds the model (`save_pretrained`: config with the label names, weights), the tokenizer, and a
`README.md` model card (task, method, hyperparameters, scores, the sweep and trial it came from). The weights are
those of the trial's best kept checkpoint (the one whose report has the best main metric). A LoRA trial gives its
adapter (`PeftModel.from_pretrained(base, DIR)`); `--merge` gives the base model with the adapter merged in.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raysdpb.errors import UserError, run_cli

log = logging.getLogger(__name__)

__all__ = ["export_trial", "choose_trials", "main"]


def _trials(experiment: str) -> tuple[list[dict], dict]:
    """trials.parquet's rows (grid order) and the configs the workers ran (grid.json)."""
    from raysdpb.results.storage import join, read_json, read_rows

    rows = read_rows(join(experiment, "trials.parquet"))
    grid = read_json(join(experiment, "grid.json"))
    if not rows or not isinstance(grid, dict):
        raise UserError(f"{experiment}: no trials.parquet and grid.json here, so this is not an experiment folder of "
                        "`python -m raysdpb.sweep` (<sweep.storage_path>/<sweep.name>)")
    return rows, grid.get("trials", {})


def choose_trials(rows: list[dict], *, trial: str | None = None, per_method: bool = False) -> dict[str, dict]:
    """The trials to export, by output name: `trial` alone (name ""), or the best of each (task, model) and, with
    `per_method`, of each (task, model, method), by `best_<main metric>` (`raysdpb.results.schema.best_per_method`)."""
    from raysdpb.results.schema import FINISHED, best_per_method, metric_direction

    if trial is not None:
        found = [r for r in rows if r["trial_id"] == trial]
        if not found:
            raise UserError(f"--trial {trial}: no such trial in this sweep; its trials: "
                            f"{', '.join(r['trial_id'] for r in rows[:10])}{', ...' if len(rows) > 10 else ''}")
        return {"": found[0]}
    chosen: dict[str, dict] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") in FINISHED and row.get("main_metric"):
            groups.setdefault((row["task"], Path(str(row["model"])).name), []).append(row)
    for (task, model), members in groups.items():
        metric = members[0]["main_metric"]
        mode = metric_direction(metric) or "max"
        by_method = best_per_method(members, metric, mode)  # the best of each method, best first
        if not by_method:
            continue
        name = f"{task.replace('/', '-')}_{model}"
        chosen[name] = by_method[0]
        if per_method:
            chosen |= {f"{name}_{r['method']}": r for r in by_method}
    if not chosen:
        raise UserError("no finished trial of this sweep has a score to choose by; export one with --trial ID")
    return chosen


def _best_checkpoint(run_path: str, metric: str) -> tuple[str, dict]:
    """The trial's kept checkpoint whose own report has the best `metric`, with that report."""
    from raysdpb.recipe.checkpoint import complete_checkpoints
    from raysdpb.results.schema import is_number, metric_direction
    from raysdpb.results.storage import join, read_json
    from raysdpb.sweep.worker import REPORT_FILE

    sign = -1.0 if metric_direction(metric) == "min" else 1.0
    candidates = []
    for step, path in complete_checkpoints(run_path):
        lineage = read_json(join(run_path, Path(path).name, REPORT_FILE)) or [{}]
        value = lineage[-1].get(metric)
        scored = is_number(value)
        candidates.append((scored, sign * value if scored else 0.0, step, Path(path).name, lineage[-1]))
    if not candidates:
        raise UserError(f"{run_path}: the trial has no whole checkpoint to export: a sweep keeps the weights of its "
                        "best finished trials only (sweep.keep_weights, by default the best of each task, model and "
                        "method: --best finds them); to export any trial, run the sweep with sweep.keep_weights: all")
    # the best score; among equal ones the latest checkpoint (the longer-trained weights)
    _, _, _, name, report = max(candidates, key=lambda c: (c[0], c[1], c[2]))
    return join(run_path, name), report


def export_trial(experiment: str, row: dict, config: dict, out: Path, *, merge: bool = False) -> Path:
    """Write the trial's best kept checkpoint as a Hugging Face folder `out`; returns it."""
    from raysdpb.config import TrialConfig
    from raysdpb.recipe import Recipe
    from raysdpb.recipe.checkpoint import load_trainable_state, load_weights
    from raysdpb.results.storage import join

    metric = row.get("main_metric") or "eval_accuracy"
    checkpoint, report = _best_checkpoint(join(experiment, "train_runs", row["trial_id"]), metric)
    weights = load_weights(checkpoint)  # its weights file only, not the training state beside it
    cfg = TrialConfig.model_validate({**config, "device": "cpu", "precision": "fp32", "gradient_checkpointing": False})
    recipe = Recipe(cfg)
    model = recipe.load_model()  # as the trial built it: the same weights where it starts random
    load_trainable_state(model, weights)
    if cfg.lora is not None and merge:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    recipe.tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_model_card(experiment, row, cfg, metric, report, checkpoint, merge))
    return out


def _model_card(experiment: str, row: dict, cfg, metric: str, report: dict, checkpoint: str, merge: bool) -> str:
    searched = row.get("label") or cfg.method
    scores = {k: v for k, v in report.items() if k.startswith("eval_")}
    what = ("a LoRA adapter (load it with `peft.PeftModel.from_pretrained(base, this_folder)`)"
            if cfg.lora is not None and not merge else "a full model")
    lines = [
        f"# {cfg.task} · {cfg.method} · {Path(str(cfg.model)).name}", "",
        f"Fine-tuned with raysdpb ({cfg.method}) on `{cfg.task}`; {what}.", "",
        "| | |", "|---|---|",
        f"| base model | `{cfg.model}`{f' (first {cfg.num_layers} layers)' if cfg.num_layers else ''} |",
        f"| method | `{cfg.method}` |",
        f"| searched values | `{searched}` |",
        f"| hyperparameters | lr {cfg.lr:g}, alpha {cfg.alpha:g}, tau {cfg.tau:g}, epochs {cfg.epochs}, batch size "
        f"{cfg.batch_size}, max length {cfg.max_length}, warm-up {cfg.warmup_ratio:g}, weight decay "
        f"{cfg.weight_decay:g}, seed {cfg.seed} |",
        f"| main metric | `{metric}`: {report.get(metric)} at epoch {report.get('epoch')}, step {report.get('step')} "
        f"(the trial's best: {row.get(f'best_{metric}')}) |",
        f"| validation scores of these weights | {json.dumps(scores)} |",
        f"| sweep | `{experiment}`, trial `{row['trial_id']}`, status {row.get('status')} |",
        f"| checkpoint | `{checkpoint}` |",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysdpb.export", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="an experiment folder a sweep wrote (<storage_path>/<name>), local or s3://")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="the trial id to export")
    which.add_argument("--best", action="store_true", help="the best trial of each task and model")
    p.add_argument("--per-method", action="store_true", help="with --best: the best of each method too")
    p.add_argument("--out", required=True, help="the folder to write (one folder per exported trial)")
    p.add_argument("--merge", action="store_true", help="LoRA trials: merge the adapter into the base model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import transformers

    # the base model's load report (its new classifier head, before the trial's weights go in) and the shard
    # progress bars say nothing about the export
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from raysdpb.report.load import resolve

    experiment = resolve(args.experiment)
    rows, configs = _trials(experiment)
    chosen = choose_trials(rows, trial=args.trial, per_method=args.per_method)
    out = Path(args.out)
    for name, row in chosen.items():
        folder = out if len(chosen) == 1 else out / name
        export_trial(experiment, row, configs[row["trial_id"]], folder, merge=args.merge)
        print(f"{row['trial_id']} ({row.get('label')}): {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
