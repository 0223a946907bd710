"""The training recipe: one trial of one method on one task, on one rank.

Read it top to bottom, as torchtune's recipes: `setup()` builds the data, the model, the batch sampler, the
optimizer, the schedule and the soft-target cache from the config and restores the context's checkpoint if it
has one; `train_step(batch)` is one optimizer step of the method; `evaluate()` scores the validation split(s);
`state_dict()` / `load_state_dict()` are what a checkpoint holds; `train()` is the loop over those. The same
recipe runs in local mode (`python -m raysdpb.train`, `LocalContext`) and on every Ray Train worker of a sweep
(`raysdpb.sweep.worker`): all that differs is the `context`. Benchmarks and tests call the same `train_step`.
Nothing here imports Ray.

`$RAYSDPB_RECIPE` (`module:Class`) runs a subclass instead, in both places (the reliability tests inject
their faults that way: `tests/faults.py`).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from raysdpb.config import TrialConfig
from raysdpb.data import TokenizedDataset, collate, pad_multiple_for
from raysdpb.errors import UserError
from raysdpb.methods import ClassOutputs, LossTerms, MethodParams, TokenOutputs, compiled_loss, get_method
from raysdpb.models import build_model, load_tokenizer, resolve_model
from raysdpb.recipe.checkpoint import (check_resume_config, detached_copy, load_state, load_trainable_state,
                                       mark_complete, rng_state, set_rng_state, trainable_state_dict, write_state)
from raysdpb.recipe.components import (autocast_factory, data_key, load_trial_data, make_optimizer, make_sampler,
                                       seed_everything)
from raysdpb.recipe.context import WorkerContext
from raysdpb.recipe.progress import EpochStats, TrialResult, layer_grad_norms, report_points, step_scalars
from raysdpb.soft_targets import SoftTargetSource, make_soft_targets
from raysdpb.throughput import matmul_parameters, mfu, peak_flops, tokens_per_s, train_flops_per_token

log = logging.getLogger(__name__)

__all__ = ["Recipe", "run_trial", "forward_outputs", "forward_passes", "recipe_class", "RECIPE_ENV"]

RECIPE_ENV = "RAYSDPB_RECIPE"


@dataclass
class PendingCheckpoint:
    """A checkpoint a writer thread is writing into `path`, and the report that goes out with it once it is whole
    (None for a checkpoint between reports)."""

    future: Future
    path: Path
    report: dict | None = None


def forward_outputs(model, batch: dict, kind: str, autocast=None) -> ClassOutputs | TokenOutputs:
    """The model's outputs on a training batch, as the methods' losses take them: a decoder's logits shifted so
    that position t predicts token t+1, with the loss on the answer tokens only."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if kind == "generation":
        inputs["use_cache"] = False  # a training forward needs no KV cache (nor may it keep one when checkpointing)
    with autocast() if autocast else nullcontext():
        logits = model(**inputs).logits
    if kind == "generation":
        return TokenOutputs(logits[:, :-1], batch["input_ids"][:, 1:], batch["answer_mask"][:, 1:].bool())
    return ClassOutputs(logits, batch["labels"])


def non_padding_tokens(batch: dict) -> int:
    """The tokens of a (CPU) training batch that are not padding: its attention mask's ones."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def forward_passes(model, batch: dict, kind: str, passes: int, autocast=None) -> list[ClassOutputs | TokenOutputs]:
    """`passes` forward passes of the model over `batch` (R-Drop: 2), each with its own dropout masks. Several
    passes run as one forward of the batch repeated `passes` times: dropout draws a mask per row, so the rows'
    copies are independent passes, and DDP sees one forward per backward as it requires."""
    if passes == 1:
        return [forward_outputs(model, batch, kind, autocast)]
    size = len(batch["index"])
    outputs = forward_outputs(model, {k: torch.cat([v] * passes) for k, v in batch.items()}, kind, autocast)
    return [outputs.slice(slice(k * size, (k + 1) * size)) for k in range(passes)]


class Recipe:
    """One trial: `Recipe(config, context).setup()`, then `train()`. Benchmarks and tests that bring their own
    model or data call the set-up steps one by one (`setup_runtime`, `setup_data`, `setup_model`,
    `setup_loader`, `setup_optimization`) and then `train_step`."""

    def __init__(self, config: TrialConfig | dict, context: WorkerContext | None = None) -> None:
        self.cfg = config if isinstance(config, TrialConfig) else TrialConfig.model_validate(config)
        self.context = context if context is not None else WorkerContext()
        self.method = get_method(self.cfg.method)
        self.loss_fn = None  # the method's own loss; compiled in setup_runtime on request (compile_loss)
        self.params = MethodParams(self.cfg.alpha, self.cfg.tau, self.cfg.tau_min_scale, self.cfg.tau_max_scale,
                                   self.cfg.tau_relative)
        # the loop's counters and records: what a checkpoint restores
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.epoch_stats = EpochStats()
        self.history: list[dict] = []  # every report's entry (its timing goes with the report only)
        self.initial: dict[str, float] = {}  # `eval_before_training`: the model as loaded
        self.grad_norms: dict[str, float] | None = None  # per-layer gradient norms of the last step, when measured
        # the trial's own clock: this attempt's time from here, plus what the checkpoint it resumes from had run
        # (Tune's time_this_iter_s restarts with each attempt and misses a resumed trial's earlier time)
        self._attempt_start = time.perf_counter()
        self._elapsed_before = 0.0
        # throughput (raysdpb.throughput): non-padding training tokens of every rank and the seconds spent training,
        # settled at each report and checkpointed; this rank's tokens since the last report; the running segment
        self.train_tokens, self.train_seconds = 0, 0.0
        self._tokens_unsettled = 0
        self._segment_start: float | None = None
        self.teacher_forward_passes = 0  # KD: examples the teacher ran forward for this trial (0 on a cache hit)
        self.teacher_table_passes = 0  # KD: teacher passes its soft targets took, one per example, whoever ran them
        # where the trial's time went besides training (over every attempt, checkpointed): set-up (model, data,
        # resume), evaluation, checkpoint writing; reported as time_<phase>_s with time_train_s
        self.phase_seconds = {"setup": 0.0, "eval": 0.0, "checkpoint": 0.0}
        # a checkpoint being written by a thread of its own while training goes on (`background_checkpoints`)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: PendingCheckpoint | None = None

    # ---- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> "Recipe":
        """Everything from the config, in an order that draws the same random numbers every time; then the
        checkpoint to resume from, if the context has one."""
        cfg = self.cfg
        model = self.load_model()
        # the tokenized splits: kept by a context whose process runs trial after trial (a sweep's trial actor)
        self.setup_data(*self.context.memo(("data", data_key(cfg)), lambda: load_trial_data(cfg, self.task,
                                                                                            self.tokenizer)))
        self.setup_model(model)
        self.setup_loader(collate(self.tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple_for(self.device.type)))
        self.setup_optimization()
        self.resume()
        return self

    def setup_runtime(self) -> None:
        """The task, the device and the precision."""
        from raysdpb.tasks import resolve_task

        self.task = resolve_task(self.cfg)
        self.device = self.context.device(self.cfg.device)
        self.autocast, self.needs_scaler = autocast_factory(self.cfg.precision, self.device)
        # the method's loss compiled (compile_loss; meant for GPUs, where its small kernels cost a launch each): an
        # encoder's only. A decoder's VMM loss stays eager: inductor's gradients of it (its hand-written
        # autograd.Function called with each sample's tau) came out wrong (tests/test_compile_loss.py)
        if self.cfg.compile_loss and self.task.kind == "classification":
            self.loss_fn = compiled_loss(self.method)
        elif self.cfg.compile_loss:
            log.warning("compile_loss: a decoder's loss is not compiled (inductor's gradients of the vocabulary-map "
                        "loss differ from the eager ones); it runs eagerly")
        # the precision the step's matrix products run at, for the device's peak FLOP/s (raysdpb.throughput)
        tf32 = self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        self.compute_precision = ("bf16" if not self.needs_scaler else "fp16") if self.autocast else (
            "tf32" if tf32 else "fp32")

    def load_model(self) -> torch.nn.Module:
        """The runtime, the tokenizer and the model as the trial starts it: seeded first and built before anything
        else draws a random number, so a model that starts random (the tiny-* aliases, a new classification head)
        starts the same in every attempt and in `raysdpb.export`."""
        seed_everything(self.cfg.seed)
        self.setup_runtime()
        source = resolve_model(self.cfg.model, self.cfg.gguf_file)
        self.tokenizer = load_tokenizer(source)
        return self.build_model(source)

    def setup_data(self, train_data: TokenizedDataset, eval_sets: list) -> None:
        self.train_data, self.eval_sets = train_data, eval_sets

    def build_model(self, source):
        task, cfg = self.task, self.cfg
        decoder_bf16 = (task.kind == "generation" and self.autocast is not None and self.device.type == "cuda"
                        and not self.needs_scaler)
        return build_model(source, kind=task.kind, num_labels=task.num_labels, num_layers=cfg.num_layers,
                           lora=cfg.lora, tokenizer=self.tokenizer, dtype=torch.bfloat16 if decoder_bf16 else None,
                           id2label=dict(enumerate(task.labels)) if task.kind == "classification" else None,
                           gradient_checkpointing=cfg.gradient_checkpointing)

    def setup_model(self, model: torch.nn.Module) -> None:
        """The model on this rank's device, wrapped in DDP when the context has several ranks."""
        self.model = model.to(self.device)
        self.train_model = self.model
        self.flops_per_token = train_flops_per_token(*matmul_parameters(self.model))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak_flops = peak_flops(name, self.compute_precision)
        if self.context.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def setup_loader(self, collator) -> None:
        """The method's batch sampler over this rank's share of the training set, and its loader. The sampler is
        the loader's `batch_sampler` and is never handed to Ray's `prepare_data_loader`, which would replace it
        with a `DistributedSampler`; no loader workers, so the sampler's position is what was consumed. The
        loader has its own generator: each new iterator draws a base seed from it, and drawing from the global
        one instead would shift dropout after a resume (the iterator is created at another point)."""
        cfg = self.cfg
        # the data order has a seed of its own (`data_seed`, default `seed`): only the sampler and this generator
        # draw from it, the model's initialisation and dropout from `seed`
        self.sampler = make_sampler(self.method, len(self.train_data), cfg.batch_size, seed=cfg.data_order_seed,
                                    num_replicas=self.context.world_size, rank=self.context.rank)
        self.collator = collator
        self.loader = DataLoader(self.train_data, batch_sampler=self.sampler, collate_fn=collator, num_workers=0,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.data_order_seed))

    def setup_optimization(self) -> None:
        """AdamW, the linear schedule over the trial's steps, a gradient scaler for fp16, the source of the soft
        targets (`self.cache`: the previous batch's, the epoch memory, the teacher's table, or none)."""
        from transformers import get_linear_schedule_with_warmup

        cfg = self.cfg
        self.total_epochs = cfg.epochs * self.method.epoch_multiplier
        total_steps = self.sampler.total_batches(self.total_epochs)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, self.device)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * total_steps),
                                                         total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.needs_scaler else None
        self.cache = self.soft_target_source()

    def soft_target_source(self) -> SoftTargetSource:
        """The method's source of soft targets on this rank (`raysdpb.soft_targets`)."""
        teacher = self.teacher_logits() if self.method.soft_targets == "teacher" else None
        return make_soft_targets(self.method, num_examples=len(self.train_data), total_epochs=self.total_epochs,
                                 gather=self.context.all_gather, teacher_logits=teacher)

    def teacher_logits(self) -> torch.Tensor:
        """KD's teacher logits on the training examples, from the disk cache (`raysdpb.teacher`): rank 0 reads or
        computes them first, the other ranks then read them, so the teacher runs once. Counted: the forward passes
        this trial caused (`teacher_forward_passes`, 0 on a cache hit) and those the table took
        (`teacher_table_passes`, one per training example: the cost column's, whichever trial paid them)."""
        from raysdpb.teacher import teacher_table

        if self.context.is_main:
            logits, self.teacher_forward_passes = teacher_table(self.cfg, self.task, self.tokenizer, self.device)
        self.context.all_ranks(True)  # a barrier: rank 0's table is on disk
        if not self.context.is_main:
            logits, _ = teacher_table(self.cfg, self.task, self.tokenizer, self.device)
        self.teacher_table_passes = int(logits.shape[0])
        return logits

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> LossTerms | None:
        """One optimizer step of the method on `batch` (on this rank's device): the forward pass(es), the method's
        loss against the soft targets its source holds for the batch (the previous step's, the previous epoch's,
        the teacher's, or none), backward, clipping, the optimizer and the schedule, then what the step leaves
        for later steps given to the source. Returns the loss terms, or None when the loss was not finite on some
        rank: every rank then skips the step together (no update, no soft targets from a broken forward; a rank
        that skipped alone would hang the others' all-reduce)."""
        passes = forward_passes(self.train_model, batch, self.task.kind, self.method.forward_passes, self.autocast)
        targets = self.cache.take(batch["index"], self.device, self.sampler.epoch)
        terms = self.method.step_loss(passes, targets, self.params, self.loss_fn)
        if not self.context.all_ranks(self.loss_is_finite(terms)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss at step %d (%d in a row); step skipped", self.step, self.nonfinite_in_row)
            return None
        self.nonfinite_in_row = 0
        (self.scaler.scale(terms.total) if self.scaler else terms.total).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        measure = self.context.is_main and self.step % self.cfg.grad_norm_every_steps == 0
        self.grad_norms = layer_grad_norms(self.model) if measure else None
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.put(batch["index"], passes[0], self.params)
        self.step += 1
        return terms

    def loss_is_finite(self, terms: LossTerms) -> bool:
        return bool(torch.isfinite(terms.total))

    # ---- evaluation ------------------------------------------------------------------------------------------
    @contextmanager
    def timed(self, phase: str):
        """Add the block's seconds to `phase_seconds[phase]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - start

    def evaluate(self) -> dict[str, float]:
        """`eval_<prefix><metric>` of every evaluation split. A decoder's generated answers are saved (JSONL), and
        with `save_predictions` each example's predicted class (Parquet), under `<artifacts>/predictions/` (local
        mode: the output folder; a sweep: `<experiment>/artifacts/<trial_id>`), by rank 0."""
        from raysdpb.recipe.evaluation import evaluate_generation, evaluate_split, predictions_file

        metrics: dict[str, float] = {}
        rank, world, artifacts = self.context.rank, self.context.world_size, self.context.artifacts_dir
        for prefix, records, data in self.eval_sets:
            if self.task.kind == "generation":
                name = predictions_file(prefix, self.step, ".jsonl")
                where = artifacts / "predictions" / name if artifacts else None
                metrics |= evaluate_generation(self.model, self.tokenizer, self.task, data, records,
                                               batch_size=self.cfg.eval_batch_size,
                                               max_new_tokens=self.cfg.max_new_tokens, scoring=self.cfg.choice_scoring,
                                               device=self.device, prefix=prefix, rank=rank, world_size=world,
                                               autocast=self.autocast, predictions_path=where)
            else:
                where = None
                if self.cfg.save_predictions and artifacts:
                    where = artifacts / "predictions" / predictions_file(prefix, self.step, ".parquet")
                metrics |= evaluate_split(self.model, self.task, data, records, batch_size=self.cfg.eval_batch_size,
                                          collator=self.collator, device=self.device, prefix=prefix, rank=rank,
                                          world_size=world, autocast=self.autocast, predictions_path=where)
        return metrics

    # ---- state: what a checkpoint holds ----------------------------------------------------------------------
    def rank_state(self) -> dict:
        """This rank's own part of a checkpoint: its soft targets, random state, running sums and history (each
        rank's batches differ)."""
        return {"cache": self.cache.state_dict(), "rng": rng_state(), "running": self.epoch_stats.state_dict(),
                "history": self.history}

    def state_dict(self, epoch: int, position: int, ranks: list[dict]) -> dict:
        """The checkpoint's state at `position` batches into `epoch`; `ranks`: every rank's `rank_state()`."""
        return {
            "model": trainable_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": {**self.sampler.state_dict(), "epoch": epoch, "position": position},
            "ranks": ranks,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step, "nonfinite_total": self.nonfinite_total,
            "initial": self.initial, "elapsed_s": self.elapsed(), "config": self.cfg.model_dump(),
            "throughput": {"tokens": self.train_tokens, "seconds": self.train_seconds},
            "phase_seconds": dict(self.phase_seconds),
            "teacher_forward_passes": self.teacher_forward_passes,
        }

    def load_state_dict(self, state: dict, checkpoint: Path | str = "the checkpoint") -> None:
        check_resume_config(state["config"], self.cfg.model_dump(), checkpoint)
        if len(state["ranks"]) != self.context.world_size:
            raise UserError(f"the checkpoint {checkpoint} holds the state of {len(state['ranks'])} rank(s), not of "
                            f"this trial's {self.context.world_size}; resume with the world size that wrote it")
        own = state["ranks"][self.context.rank]
        load_trainable_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise UserError(f"the checkpoint {checkpoint} does not fit this trial: {err}") from None
        self.cache.load_state_dict(own["cache"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite_total = state["step"], state["nonfinite_total"]
        self.epoch_stats, self.history = EpochStats.from_state(own["running"]), own["history"]
        self.initial, self._elapsed_before = state["initial"], float(state["elapsed_s"])
        # checkpoints of formats 2 and 3 written before these counters existed have neither: counted from here
        throughput = state.get("throughput") or {"tokens": 0, "seconds": 0.0}
        self.train_tokens, self.train_seconds = int(throughput["tokens"]), float(throughput["seconds"])
        self.teacher_forward_passes = state.get("teacher_forward_passes", 0)  # what the trial caused, not this attempt
        self.phase_seconds = {**self.phase_seconds, **state.get("phase_seconds", {})}
        set_rng_state(own["rng"])

    def resume(self) -> None:
        """Restore the checkpoint the context hands over, if any."""
        checkpoint = self.context.latest_checkpoint()
        if checkpoint is None:
            return
        self.load_state_dict(load_state(checkpoint), checkpoint)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", checkpoint, self.sampler.epoch,
                 self.sampler.state_dict()["position"], self.step)

    def save_checkpoint(self, epoch: int, position: int, reported: bool = True) -> Path | None:
        """A checkpoint where the context keeps them (None where it keeps none). A collective: every rank's part
        is gathered to rank 0, which writes the folder, or, in a single-process trial with `background_checkpoints`,
        hands a copy of the state to a writer thread and goes on training (`finish_checkpoint` then hands it over).
        The previous checkpoint is finished first: checkpoints and their reports go out in order."""
        self.finish_checkpoint()
        path = self.context.new_checkpoint_dir(self.step, reported=reported)  # None on every rank, or a folder
        if path is None:
            return None
        with self.timed("checkpoint"):
            ranks = self.context.gather_to_main(self.rank_state())
            if self.context.is_main:
                state = self.state_dict(epoch, position, ranks)
                if self.writes_in_background():
                    # the state as it is now (training changes the live tensors in place); the copy is the memory
                    # this costs: one more of the trainable weights and the optimizer state, in host memory
                    state = detached_copy(state)
                    if self._writer is None:
                        self._writer = ThreadPoolExecutor(1, thread_name_prefix="raysdpb-checkpoint")
                    self._pending = PendingCheckpoint(self._writer.submit(self.write_checkpoint, path, state), path)
                else:
                    self.write_checkpoint(path, state)
        return path

    def writes_in_background(self) -> bool:
        """Whether checkpoints are written by a thread while training goes on: asked for (the default) and one
        process (in DDP the ranks report together, at the same step)."""
        return self.cfg.background_checkpoints and self.context.world_size == 1

    def finish_checkpoint(self, wait: bool = True) -> None:
        """The checkpoint being written in the background, once whole (`wait`: wait for it; otherwise only if it
        is), handed to the context with its report: a report never goes out before its checkpoint is whole. A
        write's error (`CheckpointError`: a full disk) is raised here, on the training thread. The time waited
        counts as checkpoint time; the whole call is left out of the running training segment's time."""
        pending = self._pending
        if pending is None or (not wait and not pending.future.done()):
            return
        self._pending = None
        start = time.perf_counter()
        try:
            pending.future.result()
        finally:
            self.phase_seconds["checkpoint"] += time.perf_counter() - start
        if pending.report is not None:  # the trial's clock and its phases' times as they are now: the write's too
            pending.report.update(elapsed_s=self.elapsed(), **self.phase_times())
            self.context.report(pending.report, pending.path)
        if self._segment_start is not None:
            self._segment_start += time.perf_counter() - start  # not training time

    def write_checkpoint(self, path: Path, state: dict) -> None:
        write_state(path, state)
        mark_complete(path)

    def elapsed(self) -> float:
        """Seconds this trial has run: set-up, training and evaluation, over every attempt up to now (work lost
        after a checkpoint to a failure is not counted)."""
        return self._elapsed_before + time.perf_counter() - self._attempt_start

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self) -> TrialResult:
        """Every epoch's batches through `train_step`; an evaluation, a report and a checkpoint at the end of each
        epoch (and every `eval_every_steps`, or `eval_every` of an epoch in samples seen: `report_due`; a checkpoint
        alone every `checkpoint_every_steps`). After
        `max_nonfinite_steps` non-finite losses in a row the trial stops as diverged."""
        cfg = self.cfg
        bar = self._progress_bar()
        self.model.train()
        last = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k.startswith("eval_")}
        status, message, position = "completed", "", 0
        # the model as loaded, before any step: a baseline carried in every report, restored with a checkpoint
        # (also one written before the first report)
        self.phase_seconds["setup"] += time.perf_counter() - self._attempt_start  # this attempt's
        if cfg.eval_before_training and not self.initial and self.step == 0:
            with self.timed("eval"):
                self.initial = {f"initial_{k}": v for k, v in self.evaluate().items()}
            log.info("before training: %s", ", ".join(f"{k}={v:.4f}" for k, v in self.initial.items()))
        self.start_training_clock()
        for epoch in range(self.sampler.epoch, self.total_epochs):
            self.sampler.set_epoch(epoch)
            position = self.sampler.state_dict()["position"]
            if position == 0:
                self.epoch_stats = EpochStats()
            for batch in self.loader:
                position += 1
                self._tokens_unsettled += non_padding_tokens(batch)
                terms = self.train_step({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
                self.finish_checkpoint(wait=False)  # a checkpoint written in the background, with its report
                if terms is None:
                    if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                        status = "diverged"
                        message = f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}"
                        break
                    continue
                self.epoch_stats.add(terms)
                self._log_step(terms, bar)
                mid_epoch = position < len(self.sampler)
                if self.report_due(epoch, position) and mid_epoch:
                    self.stop_training_clock()
                    with self.timed("eval"):
                        last = self.evaluate()
                    self.report(epoch + position / max(len(self.sampler), 1), last, epoch, position)
                    self.start_training_clock()
                elif cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 and mid_epoch:
                    self.save_checkpoint(epoch, position, reported=False)
            if status == "diverged":
                break
            self.stop_training_clock()
            with self.timed("eval"):
                last = self.evaluate()
            self.report(epoch + 1, last, epoch + 1, 0)
            self.start_training_clock()
        self.stop_training_clock()
        self.finish_checkpoint()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if bar is not None:
            bar.close()
        if status == "diverged":
            log.error("trial diverged: %s", message)
            self.context.report({"epoch": round(self.sampler.epoch + position / max(len(self.sampler), 1), 4),
                                 "step": self.step, "samples_seen": self.samples_seen(self.sampler.epoch, position),
                                 **last, "status": "diverged", "message": message,
                                 "nonfinite_steps": self.nonfinite_total, "elapsed_s": self.elapsed(),
                                 **self.throughput()}, None)
        self.context.close()
        return TrialResult(status=status, metrics=last | self.initial,
                           epochs_run=self.history[-1]["epoch"] if self.history else 0.0, steps=self.step,
                           message=message, history=self.history)

    def samples_seen(self, epoch: int, position: int) -> int:
        """Training examples forwarded over all ranks before `position` batches into `epoch`: the axis on which
        every method's compute compares (an overlap batch forwards each of its samples, each sample twice an epoch;
        double_finetune runs twice the epochs). A function of the sampler's position, so it carries over a resume;
        a step skipped for a non-finite loss counts (its forward ran)."""
        return self.context.world_size * self.sampler.samples_before(epoch, position)

    def report_due(self, epoch: int, position: int) -> bool:
        """Whether the step that took the batch at `position` of `epoch` reports (mid-epoch; every epoch's end
        reports anyway): every `eval_every_steps` steps, or on reaching a report point of `eval_every` (a fraction
        of the training set's N examples, in samples seen, `report_points`) past the last report's, so every method
        reports at the same samples seen (to within a batch), whatever its epoch is. The last report comes from the
        history, so a resumed run continues the same points."""
        cfg = self.cfg
        if cfg.eval_every_steps:
            return self.step % cfg.eval_every_steps == 0
        if cfg.eval_every:
            reported = self.history[-1]["samples_seen"] if self.history else 0
            n = len(self.train_data)
            return (report_points(self.samples_seen(epoch, position), cfg.eval_every, n)
                    > report_points(reported, cfg.eval_every, n))
        return False

    def report(self, epoch_progress: float, metrics: dict, epoch: int, position: int) -> None:
        """Record an evaluation in the history, checkpoint (so the checkpoint holds its own report), report (at
        once, or with a checkpoint written in the background once it is whole: `finish_checkpoint`)."""
        entry = {"epoch": round(epoch_progress, 4), "step": self.step,
                 "samples_seen": self.samples_seen(epoch, position), **metrics, **self.initial,
                 **self.epoch_stats.summary(), "lr": self.scheduler.get_last_lr()[0],
                 "nonfinite_steps": self.nonfinite_total}
        if self.method.soft_targets == "teacher":  # the cache's reuse, and the cost column's teacher passes
            entry["teacher_forward_passes"] = self.teacher_forward_passes
            entry["teacher_table_passes"] = self.teacher_table_passes
        self.history.append(entry)
        checkpoint_dir = self.save_checkpoint(epoch, position)
        self.context.log_scalars(self.step, {f"eval/{k[5:]}": v for k, v in metrics.items()})
        report = {**entry, "elapsed_s": self.elapsed(), **self.throughput()}
        if self._pending is not None and self._pending.path == checkpoint_dir:
            self._pending.report = report  # handed over with its checkpoint, once that is whole
        else:
            self.context.report(report, checkpoint_dir)

    # ---- throughput ------------------------------------------------------------------------------------------
    def start_training_clock(self) -> None:
        self._segment_start = time.perf_counter()

    def stop_training_clock(self) -> None:
        """Settle the training time and tokens since the clock started (before an evaluation or at the end): the
        device's queued work waited for, every rank's tokens summed (a collective, at the same steps on every
        rank)."""
        if self._segment_start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._tokens_unsettled:  # a segment without a batch (after the last report) is no training time
            self.train_seconds += time.perf_counter() - self._segment_start
        self._segment_start = None
        self.train_tokens += self.context.sum_over_ranks(self._tokens_unsettled)
        self._tokens_unsettled = 0

    def throughput(self) -> dict[str, float | None]:
        """`tokens_per_s` (non-padding training tokens of every rank per second of training) and `mfu` over the
        peak of the trial's devices (`raysdpb.throughput`; None without a known peak); and where the trial's time
        went: `time_train_s` and `time_<phase>_s` of `phase_seconds`."""
        rate = tokens_per_s(self.train_tokens, self.train_seconds)
        devices = self.context.world_size
        return {"tokens_per_s": rate, "mfu": mfu(rate, self.flops_per_token, self.peak_flops, devices),
                "time_train_s": self.train_seconds, **self.phase_times()}

    def phase_times(self) -> dict[str, float]:
        """`time_<phase>_s` of every phase but training (`raysdpb.results.schema.PHASE_TIME_KEYS`)."""
        return {f"time_{phase}_s": seconds for phase, seconds in self.phase_seconds.items()}

    def _log_step(self, terms: LossTerms, bar) -> None:
        if self.context.is_main and self.step % self.cfg.log_every_steps == 0:
            self.context.log_scalars(self.step, step_scalars(terms, self.scheduler.get_last_lr()[0]))
        if self.grad_norms:
            self.context.log_scalars(self.step, {f"grad_norm/{k}": v for k, v in self.grad_norms.items()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms.total.detach()):.4f}", refresh=False)

    def _progress_bar(self):
        if not (self.cfg.progress_bar and self.context.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.sampler.total_batches(self.total_epochs), initial=self.step,
                    desc=f"{self.cfg.method} {self.task.name}", unit="step", leave=False)


def recipe_class() -> type[Recipe]:
    """The recipe to run: `Recipe`, or the subclass `$RAYSDPB_RECIPE` names as `module:Class`."""
    name = os.environ.get(RECIPE_ENV)
    if not name:
        return Recipe
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"${RECIPE_ENV}={name!r}: cannot import it ({err}); give module:Class of a Recipe "
                        "subclass, or unset it") from None
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise UserError(f"${RECIPE_ENV}={name!r} is not a subclass of raysdpb.recipe.Recipe")
    return cls


def run_trial(config: TrialConfig | dict, context: WorkerContext, recipe: type[Recipe] | None = None) -> TrialResult:
    """Set up and train one trial with `recipe` (default: `recipe_class()`)."""
    return (recipe or recipe_class())(config, context).setup().train()
