"""The training loop: one trial of one method on one task, on one rank.

`run_trial(config, context)` reads top to bottom: set-up (data, model, sampler, optimizer), resume, the
loop (forward, method loss with the cached soft targets, backward, step, cache the second half), then
evaluation, reporting and checkpoints at the end of every epoch. The same function runs in local mode
(`python -m raysdpb.train`, `LocalContext`) and on every Ray Train worker (`raysdpb.sweep`); all that
differs is the `context`. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from raysdpb.checkpoint import (load_checkpoint, load_trainable_state, rng_state, save_checkpoint, set_rng_state,
                                trainable_state_dict)
from raysdpb.config import TrialConfig
from raysdpb.context import WorkerContext, inject_fault
from raysdpb.data import collate, pad_multiple_for, tokenize_records
from raysdpb.errors import UserError
from raysdpb.methods import ClassOutputs, LogitCache, Method, MethodParams, TokenOutputs, get_method
from raysdpb.models import build_model, resolve_model, load_tokenizer
from raysdpb.sampler import OverlapBatchSampler, ShuffledBatchSampler

log = logging.getLogger(__name__)

__all__ = ["run_trial", "TrialResult", "layer_grad_norms", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_factory(precision: str, device: torch.device):
    """(autocast context factory or None, whether a GradScaler is needed)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype), precision == "fp16"


_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per transformer layer (`layer_00`, ...), plus `embeddings` and `head`."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        m = _LAYER.search(name)
        group = f"layer_{int(m.group(1)):02d}" if m else ("embeddings" if "embed" in name else "head")
        sums[group] = sums.get(group, 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sorted(sums.items())}


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norms, with torch's fused kernel
    where the device has one (CPU, CUDA; the HF Trainer's default too). On the CPU the default AdamW is a
    per-parameter loop: for MiniLM-L6 (22.7M parameters) its step takes 154 ms against 25 ms fused."""
    groups = _decay_groups(model, weight_decay)
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def _forward(model, batch: dict, kind: str, autocast) -> ClassOutputs | TokenOutputs:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if kind == "generation":
        inputs["use_cache"] = False  # a training forward needs no KV cache (nor may it keep one when checkpointing)
    with autocast() if autocast else nullcontext():
        logits = model(**inputs).logits
    if kind == "generation":  # position t predicts token t+1; the loss covers answer tokens only
        return TokenOutputs(logits[:, :-1], batch["input_ids"][:, 1:], batch["answer_mask"][:, 1:].bool())
    return ClassOutputs(logits, batch["labels"])


@dataclass
class _Running:
    """Sums over the current epoch, for the epoch's report."""

    steps: int = 0
    loss: float = 0.0
    ce: float = 0.0
    distill: float = 0.0
    distill_steps: int = 0
    alpha: list = field(default_factory=list)
    tau: list = field(default_factory=list)

    def add(self, terms) -> None:
        self.steps += 1
        self.loss += float(terms.total.detach())
        self.ce += float(terms.ce)
        if terms.distill is not None:
            self.distill += float(terms.distill)
            self.distill_steps += 1
        if terms.alpha is not None:
            self.alpha.append(float(terms.alpha.mean()))
        if terms.tau is not None:
            self.tau.append(float(terms.tau.mean()))

    def summary(self) -> dict[str, float]:
        out = {"train_loss": self.loss / max(self.steps, 1), "train_ce": self.ce / max(self.steps, 1)}
        if self.distill_steps:
            out["train_distill"] = self.distill / self.distill_steps
        if self.alpha:
            out["alpha_mean"] = float(np.mean(self.alpha))
        if self.tau:
            out["tau_mean"] = float(np.mean(self.tau))
        return out


@dataclass
class TrialResult:
    status: str                  # "completed" or "diverged"
    metrics: dict                # the last evaluation, eval_<metric>
    epochs_run: float
    steps: int
    message: str = ""
    history: list = field(default_factory=list)

    def summary_line(self, config: TrialConfig) -> str:
        return json.dumps({**self.metrics, "method": config.method, "task": config.task, "seed": config.seed,
                           "status": self.status, "epochs_run": self.epochs_run})


def load_train_data(cfg: TrialConfig, task, tokenizer):
    """The trial's tokenized training set (its split, `max_train_samples`, `max_length`)."""
    from raysdpb.tasks import data_dir_from, load_examples

    train_split = cfg.train_split or task.train_split
    train_records = load_examples(task, train_split, data_dir_from(cfg.data_dir), custom=cfg.custom_task)
    if cfg.max_train_samples:
        train_records = train_records[: cfg.max_train_samples]
    return tokenize_records(train_records, task.kind, tokenizer, cfg.max_length, name=f"{task.name}:{train_split}")


def make_sampler(method: Method, num_samples: int, batch_size: int, *, seed: int, num_replicas: int = 1,
                 rank: int = 0):
    """The method's batch sampler: the overlapping stream (DLB, DynSDPB) or plain mini-batches. A training set
    too small for one batch per rank is a `UserError`."""
    sampler_cls = OverlapBatchSampler if method.loader == "overlap" else ShuffledBatchSampler
    try:
        return sampler_cls(num_samples, batch_size, shuffle=method.shuffle, seed=seed, num_replicas=num_replicas,
                           rank=rank)
    except ValueError as err:
        raise UserError(f"{method.name}: the training set has {num_samples} examples: {err}") from None


# what makes a trial what it is: a checkpoint resumes only into a trial with the same values (the rest, such as
# where the data lives, evaluation, logging, precision and device, may change between attempts)
RESUME_MUST_MATCH = ("task", "model", "gguf_file", "custom_task", "train_split", "max_train_samples", "num_layers",
                     "lora", "method", "alpha", "tau", "tau_min_scale", "tau_max_scale", "tau_relative", "lr",
                     "weight_decay", "warmup_ratio", "max_grad_norm", "epochs", "batch_size", "max_length", "seed")


def check_resume_config(saved: dict, cfg: TrialConfig, checkpoint) -> None:
    """Raise a `UserError` naming every key where the trial `cfg` differs from the one that wrote the checkpoint
    (its `config`): resuming a dynsdpb checkpoint as finetune, or with another batch size, would silently skip or
    repeat data."""
    current = cfg.model_dump()
    differ = [f"{key}={current[key]!r} (the checkpoint's: {saved[key]!r})" for key in RESUME_MUST_MATCH
              if key in saved and saved[key] != current[key]]
    if differ:
        raise UserError(f"the checkpoint {checkpoint} was written by another trial: {', '.join(differ)}; resume with "
                        "the checkpoint's values, or start a new run in another output folder")


# what checkpoints written before the `ranks` list held of rank 0 at the top level: a record of that layout,
# not to follow the per-rank dict `save` writes now
_OLD_LAYOUT_RANK_KEYS = ("cache", "rng", "running", "history")


def _rank_states(state: dict, checkpoint, world_size: int) -> list[dict]:
    """Each rank's own part of a checkpoint: its soft targets, random state and running training losses (its
    batches differ), listed under `ranks`. Checkpoints written before that list held only rank 0's part, at the
    top level; they resume a single process."""
    ranks = state.get("ranks") or ([{key: state[key] for key in _OLD_LAYOUT_RANK_KEYS}] if "cache" in state else [])
    if len(ranks) != world_size:
        raise UserError(f"the checkpoint {checkpoint} holds the state of {len(ranks)} rank(s), not of this "
                        f"trial's {world_size}; resume with the world size that wrote it")
    return ranks


def _initial_of(history: list[dict]) -> dict[str, float]:
    """The `initial_*` metrics carried in a trial's reports (checkpoints written before "initial" was kept)."""
    return {k: v for k, v in (history[0] if history else {}).items() if k.startswith("initial_")}


def _load_task_data(cfg: TrialConfig, task, tokenizer):
    from raysdpb.tasks import data_dir_from, load_examples

    data_dir = data_dir_from(cfg.data_dir)
    train = load_train_data(cfg, task, tokenizer)
    evals = []
    eval_splits = ((cfg.eval_split, ""),) if cfg.eval_split else task.eval_splits
    for split, prefix in eval_splits:
        records = load_examples(task, split, data_dir, custom=cfg.custom_task)
        if cfg.max_eval_samples:
            records = records[: cfg.max_eval_samples]
        # a decoder generates after each evaluation prompt: the prompt alone, however long its answer is
        evals.append((prefix, records, tokenize_records(records, task.kind, tokenizer, cfg.max_length,
                                                        name=f"{task.name}:{split}", prompts_only=True)))
    return train, evals


def run_trial(config: TrialConfig | dict, context: WorkerContext) -> TrialResult:
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
    from raysdpb.tasks import resolve_task

    # the trial's own clock: this attempt's time from here, plus what the checkpoint it resumes from had run
    # (Tune's time_this_iter_s restarts with each attempt and misses a resumed trial's earlier time)
    attempt_start = time.perf_counter()
    elapsed_before = 0.0

    # ---- set-up --------------------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    task = resolve_task(cfg)
    method = get_method(cfg.method)
    params = MethodParams(cfg.alpha, cfg.tau, cfg.tau_min_scale, cfg.tau_max_scale, cfg.tau_relative)
    device = context.device(cfg.device)
    autocast, needs_scaler = _autocast_factory(cfg.precision, device)

    source = resolve_model(cfg.model, cfg.gguf_file)
    tokenizer = load_tokenizer(source)
    train_data, eval_sets = _load_task_data(cfg, task, tokenizer)
    decoder = task.kind == "generation"
    dtype = torch.bfloat16 if decoder and autocast is not None and device.type == "cuda" and not needs_scaler else None
    model = build_model(source, kind=task.kind, num_labels=task.num_labels, num_layers=cfg.num_layers,
                        lora=cfg.lora, tokenizer=tokenizer, dtype=dtype,
                        id2label=dict(enumerate(task.labels)) if task.kind == "classification" else None,
                        gradient_checkpointing=cfg.gradient_checkpointing).to(device)
    train_model = model
    if context.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = make_sampler(method, len(train_data), cfg.batch_size, seed=cfg.seed,
                           num_replicas=context.world_size, rank=context.rank)
    collator = collate(tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple_for(device.type))
    # the overlap sampler is passed as batch_sampler and never handed to Ray's prepare_data_loader, which
    # would replace it with a DistributedSampler; workers stay 0 so the sampler position is what was consumed.
    # The loader gets its own generator: each new iterator draws a base seed from it, and drawing from the
    # global generator instead would shift dropout after a resume (the iterator is created at a new point)
    loader = DataLoader(train_data, batch_sampler=sampler, collate_fn=collator, num_workers=0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))

    total_epochs = cfg.epochs * method.epoch_multiplier
    total_steps = sampler.total_batches(total_epochs)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    cache = LogitCache()

    # ---- resume --------------------------------------------------------------------------------------------
    step, start_epoch, nonfinite_in_row, nonfinite_total = 0, 0, 0, 0
    running = _Running()
    history: list[dict] = []
    initial: dict[str, float] = {}
    checkpoint = context.latest_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        check_resume_config(state.get("config", {}), cfg, checkpoint)
        own = _rank_states(state, checkpoint, context.world_size)[context.rank]
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise UserError(f"the checkpoint {checkpoint} does not fit this trial: {err}") from None
        cache.load_state_dict(own["cache"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, nonfinite_total = state["step"], state["nonfinite_total"]
        running, history = own["running"], own["history"]
        initial = state.get("initial") or _initial_of(history)
        elapsed_before = float(state.get("elapsed_s", 0.0))  # checkpoints written before this key: 0
        start_epoch = sampler.epoch
        set_rng_state(own["rng"])
        log.info("resumed from %s at epoch %d, batch %d (step %d)", checkpoint, sampler.epoch,
                 sampler.state_dict()["position"], step)

    def elapsed() -> float:
        """Seconds this trial has run: set-up, training and evaluation, over every attempt up to now (work
        lost after a checkpoint to a failure is not counted)."""
        return elapsed_before + time.perf_counter() - attempt_start

    def save(epoch: int, position: int, reported: bool = True):
        path = context.new_checkpoint_dir(step, reported=reported)  # None on every rank, or a folder on every rank
        if path is None:
            return None
        own = {"cache": cache.state_dict(), "rng": rng_state(), "running": running, "history": history}
        ranks = context.gather_to_main(own)  # every rank's, on rank 0 (a collective: every rank gets here)
        if context.is_main:
            save_checkpoint(path, {
                "model": trainable_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": {**sampler.state_dict(), "epoch": epoch, "position": position},
                "ranks": ranks,
                "scaler": scaler.state_dict() if scaler else None,
                "step": step, "nonfinite_total": nonfinite_total,
                "initial": initial, "elapsed_s": elapsed(), "config": cfg.model_dump(),
            })
        return path

    def evaluate() -> dict[str, float]:
        from raysdpb.evaluation import evaluate_generation, evaluate_split

        metrics: dict[str, float] = {}
        for prefix, records, data in eval_sets:
            if decoder:
                where = context.artifacts_dir / "predictions" / f"{prefix or 'eval'}_step{step:08d}.jsonl" \
                    if context.artifacts_dir else None
                metrics |= evaluate_generation(model, tokenizer, task, data, records, batch_size=cfg.eval_batch_size,
                                               max_new_tokens=cfg.max_new_tokens, scoring=cfg.choice_scoring,
                                               device=device, prefix=prefix, rank=context.rank,
                                               world_size=context.world_size, autocast=autocast,
                                               predictions_path=where)
            else:
                metrics |= evaluate_split(model, task, data, records, batch_size=cfg.eval_batch_size,
                                          collator=collator, device=device, prefix=prefix, rank=context.rank,
                                          world_size=context.world_size, autocast=autocast)
        return metrics

    def report(epoch_progress: float, metrics: dict, epoch: int, position: int) -> None:
        """Record the evaluation in the history, checkpoint (so the checkpoint holds its own report), report."""
        entry = {"epoch": round(epoch_progress, 4), "step": step, **metrics, **initial, **running.summary(),
                 "lr": scheduler.get_last_lr()[0], "nonfinite_steps": nonfinite_total}
        history.append(entry)  # what the trial computed; its timing goes with the report only
        checkpoint_dir = save(epoch, position)
        context.log_scalars(step, {f"eval/{k[5:]}": v for k, v in metrics.items()})
        context.report({**entry, "elapsed_s": elapsed()}, checkpoint_dir)

    # ---- the loop ------------------------------------------------------------------------------------------
    progress = None
    if cfg.progress_bar and context.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=f"{cfg.method} {task.name}", unit="step", leave=False)
    model.train()
    last_metrics: dict[str, float] = history[-1] if history else {}
    last_metrics = {k: v for k, v in last_metrics.items() if k.startswith("eval_")}
    status, message = "completed", ""
    # the model as loaded, before any step (`eval_before_training`): a baseline carried in every report, and
    # restored with a checkpoint (also one written before the first report)
    if cfg.eval_before_training and not initial and step == 0:
        initial = {f"initial_{k}": v for k, v in evaluate().items()}
        log.info("before training: %s", ", ".join(f"{k}={v:.4f}" for k, v in initial.items()))
    for epoch in range(start_epoch, total_epochs):
        sampler.set_epoch(epoch)
        position = sampler.state_dict()["position"]
        if position == 0:
            running = _Running()
        for batch in loader:
            position += 1
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            outputs = _forward(train_model, batch, task.kind, autocast)
            half = len(batch["index"]) // 2
            teacher = cache.take(batch["index"][:half], device) if method.distills else None
            terms = method.loss(outputs, teacher, params)

            finite = bool(torch.isfinite(terms.total)) and not inject_fault("loss", step, cfg, context.rank)
            if not context.all_ranks(finite):  # DDP ranks skip together, or the others' all-reduce hangs
                # skip the step: no update, and no soft targets from a broken forward
                nonfinite_in_row += 1
                nonfinite_total += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d (%d in a row); step skipped", step, nonfinite_in_row)
                if nonfinite_in_row >= cfg.max_nonfinite_steps:
                    status = "diverged"
                    message = f"{nonfinite_in_row} non-finite losses in a row at step {step}"
                    break
                continue
            nonfinite_in_row = 0

            (scaler.scale(terms.total) if scaler else terms.total).backward()
            if scaler:
                scaler.unscale_(optimizer)
            log_norms = context.is_main and step % cfg.grad_norm_every_steps == 0
            norms = layer_grad_norms(model) if log_norms else None
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if method.distills:
                cache.put(method.teacher_state(outputs.slice(slice(half, None)), batch["index"][half:], params))
            step += 1
            inject_fault("after_step", step, cfg, context.rank)  # test-only: $RAYSDPB_FAULTS
            running.add(terms)

            if context.is_main and step % cfg.log_every_steps == 0:
                scalars = {"train/loss": float(terms.total.detach()), "train/ce": float(terms.ce),
                           "train/lr": scheduler.get_last_lr()[0]}
                if terms.distill is not None:
                    scalars["train/distill"] = float(terms.distill)
                for name, values in (("alpha", terms.alpha), ("tau", terms.tau)):
                    if values is not None:
                        scalars[f"dynamic/{name}_mean"] = float(values.mean())
                        scalars[f"dynamic/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
                        scalars[f"dynamic/{name}_min"] = float(values.min())
                        scalars[f"dynamic/{name}_max"] = float(values.max())
                context.log_scalars(step, scalars)
            if norms:
                context.log_scalars(step, {f"grad_norm/{k}": v for k, v in norms.items()})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(terms.total.detach()):.4f}", refresh=False)

            epoch_progress = epoch + position / max(len(sampler), 1)
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and position < len(sampler):
                last_metrics = evaluate()
                report(epoch_progress, last_metrics, epoch, position)
            elif cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and position < len(sampler):
                save(epoch, position, reported=False)
        if status == "diverged":
            break
        last_metrics = evaluate()
        report(epoch + 1, last_metrics, epoch + 1, 0)

    if progress is not None:
        progress.close()
    if status == "diverged":
        log.error("trial diverged: %s", message)
        context.report({"epoch": round(sampler.epoch + position / max(len(sampler), 1), 4), "step": step,
                        **last_metrics, "status": "diverged", "message": message,
                        "nonfinite_steps": nonfinite_total, "elapsed_s": elapsed()}, None)
    context.close()
    epochs_run = history[-1]["epoch"] if history else 0.0
    return TrialResult(status=status, metrics=last_metrics | initial, epochs_run=epochs_run, steps=step,
                       message=message, history=history)
