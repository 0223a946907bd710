"""Evaluation of a trial on its validation split(s): predictions, then the task's metrics, and for a classifier
the mean cross-entropy of the true labels (`eval_<prefix>loss`, as the HF Trainer's `eval_loss`: a continuous
score that, unlike accuracy on a small split, rarely ties at an ASHA rung).

Under data parallelism each rank predicts a disjoint slice (`rank::world_size`, no padding, so no sample
counts twice) and the predictions are gathered before the metrics are computed, so every rank returns
the same numbers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader

from raysdpb.data import TokenizedDataset

__all__ = ["evaluate_split", "gather_predictions", "predictions_file", "write_class_predictions"]


def gather_predictions(indices: list[int], predictions: list, world_size: int) -> tuple[list[int], list]:
    if world_size == 1:
        return indices, predictions
    import torch.distributed as dist

    shards: list = [None] * world_size
    dist.all_gather_object(shards, (indices, predictions))
    merged = sorted((i, p) for idx, preds in shards for i, p in zip(idx, preds))
    return [i for i, _ in merged], [p for _, p in merged]


@torch.no_grad()
def predict_classes(model, dataset: TokenizedDataset, batch_size: int, collator, device: torch.device,
                    rank: int = 0, world_size: int = 1, autocast=None
                    ) -> tuple[list[int], list[int], list[float]]:
    """Every example's index, predicted class and cross-entropy of its label (in fp32), gathered from every rank
    in index order."""
    model.eval()
    shard = list(range(rank, len(dataset), world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        collate_fn=collator)
    indices, outputs = [], []
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "index")}
        with autocast() if autocast else nullcontext():
            logits = model(**inputs).logits
        losses = torch.nn.functional.cross_entropy(logits.float(), batch["labels"].to(device), reduction="none")
        outputs += zip(logits.argmax(-1).tolist(), losses.tolist())
        indices += batch["index"].tolist()
    model.train()
    indices, outputs = gather_predictions(indices, outputs, world_size)
    return indices, [p for p, _ in outputs], [loss for _, loss in outputs]


def predictions_file(prefix: str, step: int, suffix: str) -> str:
    """The name of an evaluation's per-example predictions: `<prefix without its '_', or 'eval'>_step<8 digits>`
    (`eval_step00000012.parquet`, `dev_step00000012.parquet`, `mm_step00000012.parquet`)."""
    return f"{prefix.rstrip('_') or 'eval'}_step{step:08d}{suffix}"


def evaluate_split(model, task, dataset: TokenizedDataset, records: list[dict], *, batch_size: int, collator,
                   device, prefix: str = "", rank: int = 0, world_size: int = 1, autocast=None,
                   predictions_path=None) -> dict[str, float]:
    """`{"eval_<prefix><metric>": value}` for the task's metrics on one split, and `eval_<prefix>loss` (the mean
    cross-entropy of the labels, `schema.EVAL_LOSS`). With `predictions_path` rank 0 writes every example's `idx`
    (its index in its split: the training split's for a held-out dev set), `prediction` and `label` there as
    Parquet, the very predictions the metrics are computed from (gathered from every rank)."""
    from raysdpb.metrics import compute_metrics
    from raysdpb.results.schema import EVAL_LOSS

    indices, predictions, losses = predict_classes(model, dataset, batch_size, collator, device, rank, world_size,
                                                   autocast)
    labels = [records[i]["label"] for i in indices]
    scores = {**compute_metrics(task.metrics, predictions, labels), EVAL_LOSS: math.fsum(losses) / len(losses)}
    if predictions_path is not None and rank == 0:
        write_class_predictions(predictions_path, [records[i]["idx"] for i in indices], predictions, labels)
    return {f"eval_{prefix}{name}": float(value) for name, value in scores.items()}


def write_class_predictions(path, idx: list[int], predictions: list[int], labels: list[int]) -> None:
    """One row per example (`idx`, `prediction`, `label`, class ids), written atomically."""
    import pyarrow as pa

    from raysdpb.results.storage import write_table

    table = pa.table({"idx": pa.array(idx, pa.int64()), "prediction": pa.array(predictions, pa.int64()),
                      "label": pa.array(labels, pa.int64())})
    write_table(table, str(path))


# --- decoder-only tasks: greedy generation (or log-likelihood of the options), then answer extraction -------

def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_outputs(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int,
                     device, autocast=None) -> list[str]:
    """Greedy, batched generation from left-padded prompts; returns the decoded continuations."""
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_padded(prompts[start:start + batch_size], tokenizer.pad_token_id, device)
        with autocast() if autocast else nullcontext():
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
    model.train()
    return outputs


@torch.no_grad()
def choose_by_loglikelihood(model, tokenizer, prompts: list[list[int]], candidates: list[list[str]], *, device,
                            autocast=None) -> list[int]:
    """For each prompt, the candidate continuation with the highest mean token log-likelihood."""
    model.eval()
    choices = []
    for prompt, options in zip(prompts, candidates):
        scores = []
        for option in options:
            cont = tokenizer(" " + option.strip(), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont], device=device)
            with autocast() if autocast else nullcontext():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont, device=device)[:, None])
            scores.append(float(logp.mean()))
        choices.append(max(range(len(scores)), key=scores.__getitem__))
    model.train()
    return choices


def evaluate_generation(model, tokenizer, task, dataset: TokenizedDataset, records: list[dict], *, batch_size: int,
                        max_new_tokens: int, scoring: str, device, prefix: str = "", rank: int = 0,
                        world_size: int = 1, autocast=None, predictions_path=None) -> dict[str, float]:
    """Exact-match accuracy of the extracted answers; every prediction is written to `predictions_path` (JSONL)."""
    from raysdpb.tasks import nlg

    shard = list(range(rank, len(dataset), world_size))
    prompts = [dataset[i]["input_ids"][: dataset[i]["prompt_length"]] for i in shard]
    if scoring == "loglikelihood" and all("candidates" in records[i] for i in shard):
        # a task may score its candidates after a context of their own (HellaSwag: the context without the
        # listed options, as in the usual log-likelihood evaluation)
        contexts = [tokenizer(records[i]["scoring_context"])["input_ids"] if "scoring_context" in records[i]
                    else prompt for i, prompt in zip(shard, prompts)]
        picked = choose_by_loglikelihood(model, tokenizer, contexts, [records[i]["candidates"] for i in shard],
                                         device=device, autocast=autocast)
        outputs = [f"The answer is {nlg.LETTERS[k]}." for k in picked]
    else:
        outputs = generate_outputs(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   device=device, autocast=autocast)
    indices, outputs = gather_predictions(shard, outputs, world_size)
    extract = nlg.extract_number if task.answer_type == "number" else nlg.extract_choice
    rows = []
    for i, output in zip(indices, outputs):
        prediction = extract(output)
        rows.append({"idx": records[i]["idx"], "output": output, "prediction": prediction,
                     "reference": records[i]["reference"], "correct": prediction == records[i]["reference"]})
    if predictions_path is not None and rank == 0:
        import json
        from pathlib import Path

        path = Path(predictions_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy = sum(r["correct"] for r in rows) / max(len(rows), 1)
    return {f"eval_{prefix}exact_match": accuracy}
