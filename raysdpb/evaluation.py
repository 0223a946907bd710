"""Evaluation of a trial on its validation split(s): predictions, then the task's metrics.

Under data parallelism each rank predicts a disjoint slice (`rank::world_size`, no padding, so no sample
counts twice) and the predictions are gathered before the metrics are computed, so every rank returns
the same numbers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader

from raysdpb.data import TokenizedDataset

__all__ = ["evaluate_split", "gather_predictions"]


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
                    rank: int = 0, world_size: int = 1, autocast=None) -> tuple[list[int], list[int]]:
    model.eval()
    shard = list(range(rank, len(dataset), world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        collate_fn=collator)
    indices, predictions = [], []
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "index")}
        with autocast() if autocast else nullcontext():
            logits = model(**inputs).logits
        predictions += logits.argmax(-1).tolist()
        indices += batch["index"].tolist()
    model.train()
    return gather_predictions(indices, predictions, world_size)


def evaluate_split(model, task, dataset: TokenizedDataset, records: list[dict], *, batch_size: int, collator,
                   device, prefix: str = "", rank: int = 0, world_size: int = 1, autocast=None) -> dict[str, float]:
    """`{"eval_<prefix><metric>": value}` for the task's metrics on one split."""
    from raysdpb.metrics import compute_metrics

    indices, predictions = predict_classes(model, dataset, batch_size, collator, device, rank, world_size, autocast)
    labels = [records[i]["label"] for i in indices]
    scores = compute_metrics(task.metrics, predictions, labels)
    return {f"eval_{prefix}{name}": float(value) for name, value in scores.items()}
