"""KD's teacher: its logits on every training example, computed once and cached on disk (section 8.4 of
docs/method.md).

`teacher_table(cfg, task, ...)` returns the `(N, C)` float32 logits of the teacher folder `cfg.teacher_model` on
the trial's training examples, and how many examples the teacher ran forward for it (0 on a cache hit), so that a
cost column counts the teacher's work once, in the trial that caused it.

The table is a safetensors file under `$RAYSDPB_CACHE` (default `~/.cache/raysdpb`), `teacher_logits/<key>`, with
`<key>.json` beside it saying what it is. The key is a hash of everything the logits depend on: the teacher
folder's content (every file's name and bytes), the task, the training split and subset, the tokenizer and
`max_length`, and the token ids themselves (so data that changed on disk is a miss, not a stale hit). Every trial
with the same teacher and data shares it. Two trials that start at once take a lock on `<key>.lock` (`flock`)
while one computes: the other then finds the table and runs no teacher forward. The file itself is written to a
temporary name and renamed, so a trial killed mid-write leaves no half table that a later one could read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch

from raysdpb.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "cache_dir", "folder_identity", "teacher_table", "table_key"]

CACHE_ENV = "RAYSDPB_CACHE"


def cache_dir() -> Path:
    """`$RAYSDPB_CACHE`, default `~/.cache/raysdpb`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raysdpb").expanduser()


def folder_identity(folder: Path) -> str:
    """sha256 of a folder's content: every regular file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{vocab}".encode()).hexdigest()


def _inputs_identity(items: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps({k: v for k, v in item.items() if k != "index"}, sort_keys=True).encode())
    return digest.hexdigest()


def _teacher_folder(name: str) -> Path:
    folder = Path(name).expanduser()
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise UserError(f"teacher_model: {name!r} is no model folder (a folder with config.json and weights, as "
                        "python -m raysdpb.export writes for a fine-tuned trial)")
    return folder


def _load_teacher_tokenizer(folder: Path, student_tokenizer):
    """The teacher folder's own tokenizer (a teacher reads its own vocabulary); the student's if it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        log.info("teacher %s has no tokenizer of its own: it reads the student's", folder)
        return student_tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def table_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _compute(folder: Path, task, data, tokenizer, batch_size: int, device: torch.device) -> torch.Tensor:
    """The teacher's logits on `data`, in order, in float32, in eval mode (no dropout)."""
    from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

    from raysdpb.data import collate

    auto_cls = AutoModelForMultipleChoice if task.kind == "multiple_choice" else AutoModelForSequenceClassification
    try:
        model = auto_cls.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"teacher_model {str(folder)!r} could not be loaded as a {task.kind} model "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    collator = collate(tokenizer.pad_token_id)
    rows = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
            inputs = {k: v.to(device) for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            rows.append(model(**inputs).logits.float().cpu())
    logits = torch.cat(rows)
    if task.kind == "classification" and logits.shape[-1] != task.num_labels:
        raise UserError(f"teacher_model {str(folder)!r} predicts {logits.shape[-1]} classes, and {task.name} has "
                        f"{task.num_labels}: the teacher must be fine-tuned on the same task")
    return logits


def teacher_table(cfg, task, student_tokenizer, device: torch.device) -> tuple[torch.Tensor, int]:
    """`(logits (N, C), teacher forward passes this call ran, in examples)` for the trial `cfg`: read from the
    cache, or computed (and cached) under the key's lock."""
    from safetensors.torch import load_file, save_file

    from raysdpb.recipe.components import load_train_data

    folder = _teacher_folder(cfg.teacher_model)
    tokenizer = _load_teacher_tokenizer(folder, student_tokenizer)
    data = load_train_data(cfg, task, tokenizer)  # the same examples, split and subset as the student's
    parts = {"teacher": folder_identity(folder), "task": task.name, "train_split": task.training_split(cfg.train_split),
             "max_train_samples": cfg.max_train_samples, "max_length": cfg.max_length,
             "tokenizer": _tokenizer_identity(tokenizer), "inputs": _inputs_identity(data.items)}
    key = table_key(parts)
    where = cache_dir() / "teacher_logits"
    where.mkdir(parents=True, exist_ok=True)
    table = where / f"{key}.safetensors"
    with open(where / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one computes; a trial that starts meanwhile waits, then reads
        try:
            if table.is_file():
                logits = load_file(str(table))["logits"]
                if logits.shape[0] == len(data):
                    log.info("teacher logits of %s: cache hit %s", folder, table)
                    return logits, 0
            log.info("teacher logits of %s on %d examples: computing into %s", folder, len(data), table)
            logits = _compute(folder, task, data, tokenizer, cfg.eval_batch_size, device)
            tmp = where / f"{key}.safetensors.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            save_file({"logits": logits.contiguous()}, str(tmp), metadata={"key": key})
            os.replace(tmp, table)
            info = {**parts, "teacher_model": str(folder), "examples": len(data), "classes": logits.shape[-1]}
            (where / f"{key}.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
            return logits, len(data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
