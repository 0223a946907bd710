"""What tests/test_hf.py and the scripts it runs (tests/hf_ddp_worker.py, tests/hf_search.py) share: a raysdpb trial's
model and data as an ordinary Hugging Face Trainer script has them (a `datasets.Dataset` tokenized by `map`, a
`DataCollatorWithPadding`), and `SelfDistillationArguments` with the trial's optimisation settings."""

from __future__ import annotations

import dataclasses

from raysdpb.config import TrialConfig
from raysdpb.recipe.recipe import Recipe
from raysdpb.hf import SelfDistillationArguments, SelfDistillationTrainer

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class NoDropoutRecipe(Recipe):
    """The recipe with its tiny random model built without dropout: the HF Trainer draws from the global random
    generator where the recipe does not (it seeds it again when built, its loader draws a base seed from it), so
    dropout masks could not match step for step; without dropout nothing in training is random but the data order,
    which both take from raysdpb's seeded sampler."""

    def build_model(self, source):
        return super().build_model(dataclasses.replace(source, random_config={**source.random_config, **NO_DROPOUT}))


def trial_model(cfg: TrialConfig, recipe: type[Recipe] = Recipe):
    """`(model, tokenizer, task)` exactly as a trial of `cfg` starts them (seeded, built before anything else draws)."""
    built = recipe(cfg)
    model = built.load_model()
    return model, built.tokenizer, built.task


def hf_dataset(cfg: TrialConfig, task, tokenizer, split: str | None = None):
    """The trial's training records (or `split`'s) as a `datasets.Dataset`, tokenized as a user's script does."""
    import datasets

    from raysdpb.tasks import data_dir_from, load_examples

    name = split or task.training_split(cfg.train_split)
    records = load_examples(task, name, data_dir_from(cfg.data_dir))
    limit = cfg.max_eval_samples if split else cfg.max_train_samples
    rows = [{"text": r["text"], "text_pair": r["text_pair"], "label": r["label"]} for r in records[:limit]]
    return datasets.Dataset.from_list(rows).map(
        lambda b: tokenizer(b["text"], b["text_pair"], truncation=True, max_length=cfg.max_length), batched=True)


def hf_arguments(cfg: TrialConfig, output_dir, **overrides) -> SelfDistillationArguments:
    """The trial's optimisation as TrainingArguments: AdamW (fused) at `lr` with `weight_decay`, the linear schedule
    without warm-up, clipping at `max_grad_norm`, `batch_size` per device, `epochs`, `seed`; the method and its
    hyperparameters; a log every step, no evaluation, no checkpoints, no reporting (`overrides` change any)."""
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch_fused", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        seed=cfg.seed, use_cpu=True, disable_tqdm=True, method=cfg.method, alpha=cfg.alpha, tau=cfg.tau,
        tau_min_scale=cfg.tau_min_scale, tau_max_scale=cfg.tau_max_scale, tau_relative=cfg.tau_relative)
    return SelfDistillationArguments(**{**settings, **overrides})


class RecordingTrainer(SelfDistillationTrainer):
    """Also keeps the dataset indices of every training batch it computes a loss on, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append(inputs["index"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def step_losses(trainer) -> list[float]:
    """The training loss of every logged step (`logging_steps=1`: one entry per optimizer step, the step's loss)."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
