"""`SelfDistillationTrainer`: a `transformers.Trainer` that trains with any registered method (docs/method.md).

It changes three things of the stock Trainer and nothing else (optimizer, schedule, precision, logging,
evaluation, checkpoints, callbacks and hyperparameter search stay the Trainer's):

* the training batches: the method's batch sampler from `raysdpb.sampler`, this rank's own share
  (`batches.TrainerBatchSampler`), which accelerate is kept from re-sharding (`batches.keep_own_batches`);
* the training loss: the method's loss (`raysdpb.methods`, composed from `raysdpb.losses`) over its forward passes
  (R-Drop: two) against the soft targets its source holds on this rank (`raysdpb.soft_targets`: the previous
  step's cache, or none), the calls `raysdpb.recipe.Recipe.train_step` makes;
* the number of steps of an overlap method: training stops after the last batch whose second half lies within
  the planned epochs (the next batch would take its second half from the epoch after), which is
  `OverlapBatchSampler.total_batches(epochs)` steps without gradient accumulation, as in a raysdpb trial; a
  method's epoch multiplier (double_finetune) multiplies `num_train_epochs`.

Evaluation and prediction use the stock loss (the model's cross-entropy) and do not touch the cache. Each rank's
soft targets are saved with its random state in every checkpoint (`raysdpb_state[_<rank>].pth`) and restored
where the Trainer restores that random state when it resumes, so a resumed run continues the same stream with
the same targets.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer
from transformers.trainer_utils import has_length, seed_worker
from transformers.utils import is_datasets_available

from raysdpb.errors import UserError
from raysdpb.hf.arguments import method_settings, with_method_settings
from raysdpb.hf.batches import IndexCollator, IndexedDataset, TrainerBatchSampler, keep_own_batches
from raysdpb.methods import ClassOutputs, LossTerms, TokenOutputs
from raysdpb.recipe.components import make_sampler
from raysdpb.recipe.progress import step_scalars
from raysdpb.soft_targets import SoftTargetSource, make_soft_targets

log = logging.getLogger(__name__)

__all__ = ["SelfDistillationTrainer", "method_outputs", "STATE_FILE"]

STATE_FILE = "raysdpb_state"  # + ".pth" in one process, "_<rank>.pth" with several, next to rng_state[_<rank>].pth
IGNORE_INDEX = -100  # the label transformers' losses skip (prompt and padding positions of a causal LM)


def method_outputs(logits: torch.Tensor, labels: torch.Tensor) -> ClassOutputs | TokenOutputs:
    """A model's logits and a Trainer batch's labels as the methods' losses take them: class logits `(B, C)` with
    labels `(B,)` (classification, multiple choice), or a causal LM's `(B, T, V)` with labels `(B, T)` that are
    -100 outside the answer, shifted so that position t predicts token t+1 (as transformers' own LM loss does)."""
    if labels.dim() == 1:
        return ClassOutputs(logits, labels)
    if logits.dim() == 3 and labels.dim() == 2:
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        if not bool(mask.any(dim=1).all()):
            raise UserError("a training sequence has no answer token to learn (its labels are all -100 after the "
                            "first position): keep some of each answer within the maximum length")
        return TokenOutputs(logits[:, :-1], shifted.clamp(min=0), mask)
    raise UserError(f"labels of shape {tuple(labels.shape)} with logits of shape {tuple(logits.shape)}: "
                    "SelfDistillationTrainer trains classifiers (labels (B,)) and causal LMs (labels (B, T), -100 "
                    "outside the answer)")


def _is_hf_dataset(dataset) -> bool:
    if not is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


class SelfDistillationTrainer(Trainer):
    """A drop-in `transformers.Trainer` for every method of `raysdpb.methods` (default: DynSDPB).

        trainer = SelfDistillationTrainer(model=model, args=training_args, train_dataset=train,
                                          eval_dataset=validation, data_collator=collator,
                                          method="dynsdpb", alpha=0.5, tau=2.0)

    The method keywords (`method`, `alpha`, `tau`, `tau_min_scale`, `tau_max_scale`, `tau_relative`) are
    fields of `SelfDistillationArguments`: give them here or there (a plain `TrainingArguments` is extended with
    them), search them with `hyperparameter_search`. The per-device batch size must be even for the overlap
    methods. Each logging step adds the method's terms, averaged since the last one: `ce`, `distill`, and
    DynSDPB's per-sample alpha_i and tau_i (`dynamic/alpha_mean`, ...), of rank 0's batches.
    """

    # the loss compute_loss returns is the mean over one batch: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, method: str | None = None, alpha: float | None = None, tau: float | None = None,
                 tau_min_scale: float | None = None, tau_max_scale: float | None = None,
                 tau_relative: bool | None = None, **kwargs) -> None:
        given = dict(method=method, alpha=alpha, tau=tau, tau_min_scale=tau_min_scale, tau_max_scale=tau_max_scale,
                     tau_relative=tau_relative)
        settings = {k: v for k, v in given.items() if v is not None}
        train_dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        if isinstance(train_dataset, IterableDataset) or (train_dataset is not None and not has_length(train_dataset)):
            raise UserError("SelfDistillationTrainer needs a map-style train_dataset with a length (the method's batch "
                            "sampler draws indices); an IterableDataset has none: materialise it, e.g. "
                            "datasets.Dataset")
        if len(args) > 1:  # Trainer(model, args, ...) positionally
            args = (args[0], with_method_settings(args[1], settings), *args[2:])
        else:
            kwargs["args"] = with_method_settings(kwargs.get("args"), settings)
        super().__init__(*args, **kwargs)
        self._method, self._params = method_settings(self.args)  # set again when training starts
        self._batches: TrainerBatchSampler | None = None
        self._cache: SoftTargetSource = SoftTargetSource()
        self._scalars: dict[str, list[float]] = {}

    # ---- the training batches ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """The method's batches of this rank, each with its dataset `index`; columns and collation as the stock
        Trainer's (unused columns of a `datasets.Dataset` removed, the data collator)."""
        method, params = method_settings(self.args)  # again: a hyperparameter search may have set them
        dataset = self.train_dataset
        if dataset is None:
            raise UserError("SelfDistillationTrainer.train() needs a train_dataset (give it to the trainer)")
        self._check_supported_settings()
        collator = self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        stream = make_sampler(method, len(dataset), self._train_batch_size, seed=seed, num_replicas=args.world_size,
                              rank=args.process_index)
        self._method, self._params = method, params
        self._batches = TrainerBatchSampler(stream)
        self._cache = make_soft_targets(method)
        self._scalars = {}
        loader = DataLoader(
            IndexedDataset(dataset), batch_sampler=self._batches, collate_fn=IndexCollator(collator),
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index))
        return keep_own_batches(self.accelerator.prepare(loader), self._batches)

    def _check_supported_settings(self) -> None:
        args = self.args
        if args.train_sampling_strategy != "random":
            raise UserError(f"train_sampling_strategy={args.train_sampling_strategy!r}: the method's batch sampler "
                            "decides the order of the training data; leave train_sampling_strategy at 'random'")
        config = args.accelerator_config
        if getattr(config, "dispatch_batches", None) or getattr(config, "split_batches", False):
            raise UserError("accelerator_config dispatch_batches/split_batches deal one batch stream out to the "
                            "ranks; each rank must draw its own overlapping stream: leave both off")
        if self.get_tp_size() * self.get_cp_size() * self.get_sp_size() > 1:
            raise UserError("SelfDistillationTrainer deals the data out by data-parallel rank only; tensor, context "
                            "and sequence parallelism are not supported")

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """Resuming mid-epoch: the batch sampler starts `num_batches` into the epoch (it is deterministic given the
        epoch), instead of drawing and dropping them."""
        self._batches.skip_next(num_batches)
        return dataloader

    def set_initial_training_values(self, args, dataloader):
        """The Trainer's epochs and steps, with the method's epoch multiplier, and for an overlap method an end
        after the last batch whose second half is within the planned epochs (a step budget, `max_steps`, is
        the user's and left alone)."""
        values = super().set_initial_training_values(args, dataloader)
        if args.max_steps > 0:
            return values
        _, per_epoch, num_examples, samples, total_batch_size, steps_in_epoch, _ = values
        method, _ = method_settings(args)
        planned = args.num_train_epochs * method.epoch_multiplier
        max_steps = math.ceil(planned * per_epoch)
        if method.loader == "overlap" and float(planned).is_integer():
            # the last batch is the second-to-last of the last epoch (position steps_in_epoch - 2)
            max_steps = (int(planned) - 1) * per_epoch + (steps_in_epoch - 2) // args.gradient_accumulation_steps + 1
        return (math.ceil(planned), per_epoch, num_examples, samples * method.epoch_multiplier, total_batch_size,
                steps_in_epoch, max_steps)

    # ---- the loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the method's loss of this batch against the soft targets of this rank's previous batch, whose
        second half is this batch's first half; the soft targets of this batch's second half are cached for the
        next. Evaluation and prediction: the stock loss."""
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k != "index"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "index" not in inputs:
            raise UserError("a training batch without its dataset indices: SelfDistillationTrainer's training batches "
                            "must come from its own get_train_dataloader (do not override it)")
        if "labels" not in inputs:
            raise UserError(f"the training batches have no labels (keys: {', '.join(sorted(inputs))}); the methods "
                            "need them: name the dataset's label column 'label' or 'labels'")
        method, params = self._method, self._params
        index, labels = inputs["index"], inputs["labels"]
        passes = method.forward_passes  # several passes as one forward of the repeated batch, as the recipe runs them
        model_inputs = {k: (v if passes == 1 else torch.cat([v] * passes)) for k, v in inputs.items()
                        if k not in ("index", "labels")}
        model_output = model(**model_inputs)
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        size = len(index)
        outputs = [method_outputs(logits[k * size:(k + 1) * size], labels) for k in range(passes)]
        if isinstance(outputs[0], TokenOutputs) and "generation" not in method.kinds:
            raise UserError(f"{method.name} trains classifiers only (its soft targets are class distributions); "
                            "choose another method for a causal LM")
        teacher = self._cache.take(index, logits.device, 0)
        terms = method.step_loss(outputs, teacher, params)
        self._cache.put(index, outputs[0], params)
        self._record(terms)
        return (terms.total, model_output) if return_outputs else terms.total

    # ---- logging -----------------------------------------------------------------------------------------------
    def _record(self, terms: LossTerms) -> None:
        for key, value in step_scalars(terms, 0.0).items():
            if key not in ("train/loss", "train/lr"):  # the Trainer logs its own loss and learning rate
                self._scalars.setdefault(key.removeprefix("train/"), []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """A training log also gets the method's terms since the last one (min of minima, max of maxima, else the
        mean)."""
        if "loss" in logs and self._scalars:
            for key, values in self._scalars.items():
                reduce = min if key.endswith("_min") else max if key.endswith("_max") else (lambda v: sum(v) / len(v))
                logs[key] = reduce(values)
            self._scalars = {}
        super().log(logs, start_time)

    # ---- checkpoints: each rank's soft targets, kept and restored with its random state ------------------------
    def _state_path(self, folder: str) -> str:
        name = f"{STATE_FILE}.pth" if self.args.world_size <= 1 else f"{STATE_FILE}_{self.args.process_index}.pth"
        return os.path.join(folder, name)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._batches is None:
            return
        state = {"method": self.args.method, "sampler": self._batches.state_dict(), "cache": self._cache.state_dict()}
        torch.save(state, self._state_path(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Where the Trainer restores a rank's random state to resume (at its resume position, never when it
        restarts the epoch, `ignore_data_skip`), the rank's soft targets are restored too."""
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self._batches is None:
            return
        path = self._state_path(checkpoint)
        self._cache.clear()
        if not os.path.isfile(path):
            log.warning("%s holds no soft targets of this rank (%s): the first step after resuming is "
                        "cross-entropy only", checkpoint, os.path.basename(path))
            return
        state = torch.load(path, weights_only=True)
        if state["method"] != self.args.method:
            raise UserError(f"the checkpoint {checkpoint} was trained with method {state['method']!r}, not "
                            f"{self.args.method!r}; resume with the same method")
        self._batches.check_resume(state["sampler"], checkpoint)
        self._cache.load_state_dict(state["cache"])

