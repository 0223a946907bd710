"""tests/test_hf.py's hyperparameter search: `python tests/hf_search.py OUT DATA` runs
`SelfDistillationTrainer.hyperparameter_search(backend="ray")` over DynSDPB's alpha (two tiny trials on a local
Ray, one CPU each) and writes `OUT/search.json`: each trial's id, its alpha and the training logs of its run (read
from its last checkpoint's trainer_state.json), and the best run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ray import tune
from transformers import DataCollatorWithPadding

from hf_trials import hf_arguments, hf_dataset, trial_model
from trial_configs import small_encoder_raw
from raysdpb.config import load_trial_config
from raysdpb.hf import SelfDistillationTrainer

ALPHAS = [0.25, 1.0]


def main(out: str, data_dir: str) -> None:
    out_dir = Path(out).resolve()  # Ray runs each trial in a folder of its own: every path absolute
    cfg = load_trial_config(None, raw=small_encoder_raw(data_dir, method="dynsdpb", epochs=1))
    _, tokenizer, task = trial_model(cfg)
    trainer = SelfDistillationTrainer(
        model_init=lambda: trial_model(cfg)[0], args=hf_arguments(cfg, out_dir / "runs", save_strategy="epoch",
                                                                  eval_strategy="epoch", logging_steps=2),
        train_dataset=hf_dataset(cfg, task, tokenizer), eval_dataset=hf_dataset(cfg, task, tokenizer, "validation"),
        data_collator=DataCollatorWithPadding(tokenizer))
    best = trainer.hyperparameter_search(
        hp_space=lambda _: {"alpha": tune.grid_search(ALPHAS)}, backend="ray", n_trials=1, direction="minimize",
        resources_per_trial={"cpu": 1}, storage_path=str(out_dir / "ray"), name="search", verbose=0)
    trials = []
    for trial in best.run_summary.trials:
        checkpoints = sorted((out_dir / "runs" / f"run-{trial.trial_id}").glob("checkpoint-*"),
                             key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text()) if checkpoints else {}
        trials.append({"trial_id": trial.trial_id, "status": trial.status, "alpha": trial.config["alpha"],
                       "objective": trial.last_result.get("objective"), "log_history": state.get("log_history", [])})
    (out_dir / "search.json").write_text(json.dumps({"best": {"run_id": best.run_id, "objective": best.objective,
                                                              "hyperparameters": best.hyperparameters},
                                                     "trials": trials}))


if __name__ == "__main__":
    main(*sys.argv[1:])
