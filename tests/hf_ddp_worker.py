"""One rank of tests/test_hf.py's data-parallel run: `torchrun --nproc_per_node 2 tests/hf_ddp_worker.py OUT DATA
METHOD GRAD_ACCUM`. Trains the small encoder trial with SelfDistillationTrainer on the CPU (gloo) and writes
`OUT/rank<r>.json`: the dataset indices of every batch this rank trained on, in order, its step count and a sum
of its final weights (DDP keeps the ranks' weights equal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import DataCollatorWithPadding

from hf_trials import RecordingTrainer, hf_arguments, hf_dataset, trial_model
from trial_configs import small_encoder_raw
from raysdpb.config import load_trial_config


def main(out: str, data_dir: str, method: str, grad_accum: str) -> None:
    cfg = load_trial_config(None, raw=small_encoder_raw(data_dir, method=method, batch_size=4, epochs=2))
    model, tokenizer, task = trial_model(cfg)
    trainer = RecordingTrainer(model=model, args=hf_arguments(cfg, Path(out) / "trainer", ddp_backend="gloo",
                                                              gradient_accumulation_steps=int(grad_accum)),
                               train_dataset=hf_dataset(cfg, task, tokenizer),
                               data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    args = trainer.args
    weights = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    record = {"rank": args.process_index, "world_size": args.world_size, "batches": trainer.seen,
              "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps, "weights": weights,
              "num_samples": len(trainer.train_dataset), "seed": args.seed}
    (Path(out) / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
