"""From task records to model inputs: tokenization once up front, dynamic padding per batch.

Every item carries its dataset `index`, so the training loop can check that the cached soft targets
belong to the samples they are used for.

* classification: `text` (+ `text_pair`) -> input_ids, attention_mask (token_type_ids where the model
  has them); truncation to `max_length` (the count of truncated records is logged).
* multiple_choice: one `(context, choice)` pair per choice -> `(B, num_choices, L)`.
* generation: `prompt + answer + eos`; the prompt is truncated from the left when the whole does not fit
  (the count is logged); `answer_mask` is true at the answer tokens (the loss and the vocabulary map
  cover them only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

__all__ = ["TokenizedDataset", "tokenize_records", "collate", "Collator", "padded_length", "pad_multiple_for"]


class TokenizedDataset(Dataset):
    """A list of tokenized items (dicts of lists of ints) with their dataset index."""

    def __init__(self, items: list[dict], kind: str) -> None:
        self.items = items
        self.kind = kind

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _count_truncated(name: str, n: int, total: int, max_length: int) -> None:
    if n:
        log.warning("%s: %d of %d records were longer than max_length=%d tokens and were truncated",
                    name, n, total, max_length)


def tokenize_records(records: list[dict], kind: str, tokenizer, max_length: int, *, name: str = "data",
                     prompts_only: bool = False) -> TokenizedDataset:
    """Token ids of `records` for a task `kind`, truncated to `max_length` (truncations counted and logged).

    A generation record is prompt + answer + EOS, with `answer_mask` over the answer and `prompt_length`; the
    prompt gives way (from the left) so that the answer fits. `prompts_only` (an evaluation split, where the
    model generates after the prompt) keeps the prompt alone, its last `max_length` tokens: what the model is
    asked then must not depend on the length of the reference answer."""
    if kind == "classification":
        texts = [r["text"] for r in records]
        pairs = [r.get("text_pair") for r in records]
        has_pair = any(p is not None for p in pairs)
        full = tokenizer(texts, [p or "" for p in pairs] if has_pair else None, truncation=False)
        enc = tokenizer(texts, [p or "" for p in pairs] if has_pair else None, truncation=True, max_length=max_length)
        _count_truncated(name, sum(len(a) > max_length for a in full["input_ids"]), len(records), max_length)
        items = [{key: enc[key][i] for key in enc.keys()} | {"labels": r["label"], "index": i}
                 for i, r in enumerate(records)]
    elif kind == "multiple_choice":
        items, truncated = [], 0
        for i, r in enumerate(records):
            contexts = [r["context"]] * len(r["choices"])
            full = tokenizer(contexts, r["choices"], truncation=False)
            truncated += any(len(a) > max_length for a in full["input_ids"])
            enc = tokenizer(contexts, r["choices"], truncation=True, max_length=max_length)
            items.append({key: enc[key] for key in enc.keys()} | {"labels": r["label"], "index": i})
        _count_truncated(name, truncated, len(records), max_length)
    elif kind == "generation":
        items, truncated = [], 0
        for i, r in enumerate(records):
            prompt = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            if prompts_only:
                answer = []
            else:
                answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                answer = answer[: max_length - 1]
            room = max_length - len(answer)
            if len(prompt) > room:
                truncated += 1
                prompt = prompt[len(prompt) - room:]  # keep the end of the prompt, next to the answer
            ids = prompt + answer
            items.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                          "answer_mask": [0] * len(prompt) + [1] * len(answer), "index": i,
                          "prompt_length": len(prompt)})
        if truncated:
            log.warning("%s: %d of %d prompts were truncated from the left to fit max_length=%d", name, truncated,
                        len(records), max_length)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return TokenizedDataset(items, kind)


def _pad(seqs: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def padded_length(longest: int, pad_to_multiple_of: int | None = None) -> int:
    """`longest` rounded up to a multiple of `pad_to_multiple_of` (unchanged when that is None or 0)."""
    m = pad_to_multiple_of
    return longest if not m else -(-longest // m) * m


@dataclass
class Collator:
    """Pads a list of items to the longest in the batch (a multiple of `pad_to_multiple_of` on GPUs)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def padded_length(self, longest: int) -> int:
        """The length a batch whose longest sequence has `longest` tokens is padded to."""
        return padded_length(longest, self.pad_to_multiple_of)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        first = items[0]
        batch: dict[str, torch.Tensor] = {"index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if "labels" in first:
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "answer_mask") if k in first]
        if isinstance(first["input_ids"][0], list):  # multiple choice: (B, C, L)
            n_choices = len(first["input_ids"])
            length = self.padded_length(max(len(s) for it in items for s in it["input_ids"]))
            for key in keys:
                flat = [s for it in items for s in it[key]]
                value = self.pad_token_id if key == "input_ids" else 0
                batch[key] = _pad(flat, value, length).view(len(items), n_choices, length)
            return batch
        length = self.padded_length(max(len(it["input_ids"]) for it in items))
        for key in keys:
            value = self.pad_token_id if key == "input_ids" else 0
            batch[key] = _pad([it[key] for it in items], value, length)
        return batch


def collate(pad_token_id: int, pad_to_multiple_of: int | None = None) -> Collator:
    return Collator(pad_token_id, pad_to_multiple_of)


def pad_multiple_for(device_type: str) -> int | None:
    """What training batches are padded to a multiple of on a device: 8 on CUDA (tensor-core shapes for
    bf16/fp16 matmuls), none elsewhere (every padded token is wasted work on a CPU)."""
    return 8 if device_type == "cuda" else None
