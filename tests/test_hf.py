"""`raysdpb.hf`: every method from an ordinary Hugging Face Trainer script (`SelfDistillationTrainer`).

Real training throughout: raysdpb's tiny random BERT (and LLaMA with LoRA) on SuperGLUE CB (and GSM8K) from
`../shared/data`, through the real `transformers.Trainer` loop, accelerate, `torchrun` with two gloo processes and
Ray Tune. What is checked: the same losses step for step as raysdpb's own loop, each rank's own overlapping stream
under DDP, exact resumption from a Trainer checkpoint, gradient accumulation, evaluation, the hyperparameter search,
and one clear `UserError` per mistake.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from hf_trials import (NoDropoutRecipe, RecordingTrainer, hf_arguments, hf_dataset, step_losses, trial_model)
from raysdpb.config import load_trial_config
from raysdpb.errors import UserError
from raysdpb.hf import SelfDistillationArguments, SelfDistillationTrainer
from raysdpb.hf.arguments import TRAINER_REFUSES
from raysdpb.methods import METHODS
from raysdpb.recipe import run_trial
from raysdpb.recipe.components import make_sampler
from raysdpb.sampler import OverlapBatchSampler
from trial_configs import REPO, RecordingContext, decoder_trial, encoder_trial, small_encoder_raw, sweep_env

REL = 1e-5


def recipe_losses(cfg, out, recipe=None) -> list[float]:
    context = RecordingContext(out)
    run_trial(cfg, context, recipe=recipe)
    return [s["train/loss"] for _, s in context.scalars if "train/loss" in s]


def compare(reference: list[float], got: list[float], what: str) -> None:
    assert len(got) == len(reference), f"{what}: {len(got)} steps, the recipe ran {len(reference)}"
    diffs = [abs(a - b) for a, b in zip(reference, got)]
    rel = max(d / abs(a) for d, a in zip(diffs, reference))
    print(f"{what}: {len(reference)} steps, max abs diff {max(diffs):.3g}, max rel diff {rel:.3g}")
    assert rel <= REL, f"{what}: per-step losses differ (max rel {rel:.3g}): {reference} vs {got}"


# --- 1. the same losses as raysdpb's own loop ---------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].soft_targets not in TRAINER_REFUSES))
def test_same_losses_step_for_step_as_the_recipe(method, shared_data_dir, tmp_path):
    """Every optimizer step's total loss under the HF Trainer equals the one `raysdpb.recipe.run_trial` logs in
    local mode, for the same trial (tiny random BERT on 48 CB examples, batch 8, 2 epochs, seed 0).

    The settings are made to match rather than the check loosened: the Trainer gets the recipe's optimisation
    (fused AdamW at the same learning rate and weight decay, with biases and LayerNorm weights undecayed in both,
    the linear schedule without warm-up, clipping at 1.0) and the model is built without dropout, because the
    Trainer draws from the global random generator where the recipe does not (it seeds it again when it is built,
    its loader draws a base seed from it), so dropout masks cannot line up. The Trainer also evaluates every 5
    steps, which must not move a training loss. The step count is the recipe's (`total_batches`), so the schedules
    agree too. Float32 on the CPU: the losses come out identical."""
    cfg = encoder_trial(shared_data_dir, method=method, epochs=2, log_every_steps=1)
    reference = recipe_losses(cfg, tmp_path / "recipe", NoDropoutRecipe)
    model, tokenizer, task = trial_model(cfg, NoDropoutRecipe)
    trainer = SelfDistillationTrainer(
        model=model, args=hf_arguments(cfg, tmp_path / "hf", eval_strategy="steps", eval_steps=5),
        train_dataset=hf_dataset(cfg, task, tokenizer), eval_dataset=hf_dataset(cfg, task, tokenizer, "validation"),
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()
    sampler = make_sampler(METHODS[method], cfg.max_train_samples, cfg.batch_size, seed=cfg.seed)
    assert trainer.state.global_step == sampler.total_batches(cfg.epochs * METHODS[method].epoch_multiplier)
    compare(reference, step_losses(trainer), f"encoder {method}")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if METHODS[method].soft_targets == "previous_batch":  # none at the first step
        assert "distill" not in logged[0] and all("distill" in entry for entry in logged[1:])
    else:  # R-Drop's other pass from the first step on; none for the others
        assert all(("distill" in entry) == METHODS[method].distills for entry in logged)


def test_decoder_with_lora_same_losses_as_the_recipe(shared_data_dir, tmp_path):
    """DynSDPB on a causal LM (tiny random LLaMA with LoRA, GSM8K): the vocabulary maps of the answer tokens. The
    Trainer's batches are HF-style, labels -100 outside the answer, padded by DataCollatorForSeq2Seq; the losses
    equal the recipe's (answer masks) step for step. No dropout anywhere in this model (LoRA dropout 0)."""
    import datasets
    from transformers import DataCollatorForSeq2Seq

    from raysdpb.recipe.components import load_train_data

    cfg = decoder_trial(shared_data_dir, method="dynsdpb", log_every_steps=1, max_train_samples=8, max_length=64,
                        max_eval_samples=1, max_new_tokens=2)
    reference = recipe_losses(cfg, tmp_path / "recipe")
    model, tokenizer, task = trial_model(cfg)
    rows = [{"input_ids": it["input_ids"], "attention_mask": it["attention_mask"],
             "labels": [t if m else -100 for t, m in zip(it["input_ids"], it["answer_mask"])]}
            for it in load_train_data(cfg, task, tokenizer).items]
    trainer = SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path / "hf"),
                                      train_dataset=datasets.Dataset.from_list(rows),
                                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.train()
    compare(reference, step_losses(trainer), "decoder dynsdpb (VMM)")


# --- 2. each rank its own overlapping stream under torchrun ------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_ddp_rank_trains_on_its_own_overlapping_stream(shared_data_dir, tmp_path):
    """`torchrun --nproc_per_node 2` (two CPU processes, gloo), DynSDPB, 32 examples, batch 4 per rank, 2 epochs.
    accelerate would deal consecutive batches to alternate ranks; instead every rank trains on raysdpb's
    overlapping stream of its own share: each batch's first half is the rank's previous batch's second half (across
    the epoch boundary too), the batches are exactly `OverlapBatchSampler(rank=r, num_replicas=2)`'s, the two ranks'
    half-batches of an epoch are disjoint and together cover the data, and DDP kept the ranks' weights equal."""
    out = tmp_path / "ddp"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(REPO / "tests" / "hf_ddp_worker.py"), str(out),
         str(shared_data_dir), "dynsdpb", "1"],
        cwd=tmp_path, env=sweep_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    half, epochs = 2, 2
    streams = []
    for r, record in enumerate(ranks):
        assert (record["rank"], record["world_size"]) == (r, 2)
        batches = record["batches"]
        for previous, current in zip(batches, batches[1:]):
            assert current[:half] == previous[half:], f"rank {r}: a batch does not open with its previous one's end"
        sampler = OverlapBatchSampler(record["num_samples"], 4, shuffle=True, seed=record["seed"], num_replicas=2,
                                      rank=r)
        assert batches == [b for e in range(epochs) for b in sampler.epoch_batches(e)]
        assert record["global_step"] == record["max_steps"] == sampler.total_batches(epochs)
        streams.append([b[:half] for b in batches] + [batches[-1][half:]])  # the rank's half-batches, in order
    per_epoch = len(streams[0]) // epochs
    for e in range(epochs):
        seen = [{i for h in stream[e * per_epoch:(e + 1) * per_epoch] for i in h} for stream in streams]
        assert not seen[0] & seen[1], f"epoch {e}: both ranks trained on {sorted(seen[0] & seen[1])}"
        assert seen[0] | seen[1] == set(range(ranks[0]["num_samples"]))
    assert ranks[0]["weights"] == ranks[1]["weights"]


# --- checkpoints, gradient accumulation, evaluation --------------------------------------------------------

@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_from_a_trainer_checkpoint_matches_the_uninterrupted_run(accumulation, shared_data_dir, tmp_path):
    """A run resumed from a mid-epoch checkpoint of the Trainer (step 3 of 12: its logit cache and stream position,
    saved per rank next to the random state) trains the same batches with the same losses as the run that was not
    interrupted, dropout included. With gradient accumulation the stream is the same (a micro-batch's teacher is the
    previous micro-batch) and the run ends after the step that holds the last batch of the last epoch."""
    cfg = encoder_trial(shared_data_dir, method="dynsdpb", epochs=2)

    def trainer(output):
        model, tokenizer, task = trial_model(cfg)
        return RecordingTrainer(model=model, args=hf_arguments(cfg, output, save_strategy="steps", save_steps=3,
                                                               gradient_accumulation_steps=accumulation),
                                train_dataset=hf_dataset(cfg, task, tokenizer),
                                data_collator=DataCollatorWithPadding(tokenizer))

    full = trainer(tmp_path / "full")
    full.train()
    stream = make_sampler(METHODS["dynsdpb"], cfg.max_train_samples, cfg.batch_size, seed=cfg.seed)
    planned = stream.total_batches(cfg.epochs)
    assert full.seen[:planned] == [b for e in range(cfg.epochs) for b in stream.epoch_batches(e)]
    # one accumulation step holds the planned stream's last batch and the epoch's extra one: 24 batches in 12 steps
    assert len(full.seen) == (planned if accumulation == 1 else planned + 1)
    assert full.state.global_step == -(-len(full.seen) // accumulation)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "raysdpb_state.pth").is_file()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.seen == full.seen[3 * accumulation:]
    assert step_losses(resumed) == step_losses(full)  # the resumed log holds the checkpoint's first 3 entries


def test_resume_with_another_method_is_one_clear_error(shared_data_dir, tmp_path):
    cfg = encoder_trial(shared_data_dir, method="dynsdpb", epochs=1)
    model, tokenizer, task = trial_model(cfg)
    data = hf_dataset(cfg, task, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path, save_strategy="steps", save_steps=2),
                            train_dataset=data, data_collator=collator).train()
    other = SelfDistillationTrainer(model=trial_model(cfg)[0], args=hf_arguments(cfg, tmp_path / "b"),
                                    train_dataset=data, data_collator=collator, method="random_dlb")
    with pytest.raises(UserError, match="trained with method 'dynsdpb', not 'random_dlb'; resume with the same"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_evaluation_is_the_stock_trainers(shared_data_dir, tmp_path):
    """evaluate() and predict() are the stock Trainer's (the model's cross-entropy, its logits), for any method."""
    cfg = encoder_trial(shared_data_dir, method="dynsdpb")
    model, tokenizer, task = trial_model(cfg)
    validation = hf_dataset(cfg, task, tokenizer, "validation")
    collator = DataCollatorWithPadding(tokenizer)
    ours = SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path / "a"), eval_dataset=validation,
                                   data_collator=collator)
    stock = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True,
                                                        per_device_eval_batch_size=cfg.eval_batch_size),
                    eval_dataset=validation, data_collator=collator)
    assert ours.evaluate()["eval_loss"] == stock.evaluate()["eval_loss"]
    assert torch.equal(torch.as_tensor(ours.predict(validation).predictions),
                       torch.as_tensor(stock.predict(validation).predictions))


# --- 3. hyperparameter search -------------------------------------------------------------------------------

@pytest.mark.slow  # the default suite's 15 minutes (2-core machine, 2026-12-07: 965 s with it)
def test_hyperparameter_search_with_ray_trains_each_trial_with_its_alpha(shared_data_dir, tmp_path):
    """`trainer.hyperparameter_search(backend="ray")` over DynSDPB's alpha (0.25 and 1.0, one tiny trial each, local
    Ray): both trials finish, and each trial's logged per-sample alpha_i lies in (alpha/2, alpha] (the tiny random
    model is uncertain, so alpha_i = alpha * w_i with w_i near 1): the searched alpha reached the loss."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_search.py"), str(tmp_path), str(shared_data_dir)],
                          cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "search.json").read_text())
    trials = result["trials"]
    assert sorted(t["alpha"] for t in trials) == [0.25, 1.0]
    for trial in trials:
        assert trial["status"] == "TERMINATED" and trial["objective"] is not None
        logged = [entry for entry in trial["log_history"] if "loss" in entry]
        assert logged and all("distill" in entry for entry in logged)
        for entry in logged:
            assert trial["alpha"] / 2 < entry["dynamic/alpha_mean"] <= entry["dynamic/alpha_max"] <= trial["alpha"]
    assert result["best"]["hyperparameters"]["alpha"] in (0.25, 1.0)


# --- the settings and the mistakes --------------------------------------------------------------------------

def test_a_plain_training_arguments_gets_the_method_keywords(tmp_path):
    """The trainer's method keywords extend a plain TrainingArguments into SelfDistillationArguments, every
    Trainer setting kept; HfArgumentParser makes the settings command-line flags."""
    from transformers import HfArgumentParser

    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-5, per_device_train_batch_size=6,
                              save_strategy="epoch", report_to="none", use_cpu=True)
    trainer = SelfDistillationTrainer(model=torch.nn.Linear(2, 2), args=plain, method="random_dlb", alpha=0.5)
    assert isinstance(trainer.args, SelfDistillationArguments)
    assert (trainer.args.method, trainer.args.alpha, trainer.args.tau) == ("random_dlb", 0.5, 1.0)
    settings = {"method", "alpha", "tau", "tau_min_scale", "tau_max_scale", "tau_relative"}
    assert {k: v for k, v in trainer.args.to_dict().items() if k not in settings} == plain.to_dict()
    (parsed,) = HfArgumentParser(SelfDistillationArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--method", "sequential_dlb", "--alpha", "0.3", "--tau", "4"])
    assert (parsed.method, parsed.alpha, parsed.tau) == ("sequential_dlb", 0.3, 4.0)


@pytest.mark.parametrize("settings, message", [
    ({"method": "dlb"}, r"unknown method 'dlb'; choose one of: finetune, double_finetune, .*dynsdpb"),
    ({"alpha": -1.0}, r"alpha=-1.0: Input should be greater than or equal to 0"),
    ({"tau": 0.0}, r"tau=0.0: Input should be greater than 0"),
    ({"tau_min_scale": 3.0}, r"tau_min_scale=3.0 exceeds tau_max_scale=2.0"),
    ({"per_device_train_batch_size": 7}, r"dynsdpb needs an even per_device_train_batch_size .* got 7"),
])
def test_a_wrong_setting_is_one_clear_error(settings, message, tmp_path):
    with pytest.raises(UserError, match=message):
        SelfDistillationArguments(output_dir=str(tmp_path), report_to="none", **settings)
    trainer_keywords = {k: v for k, v in settings.items() if k != "per_device_train_batch_size"}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             **{k: v for k, v in settings.items() if k not in trainer_keywords})
    with pytest.raises(UserError, match=message):
        SelfDistillationTrainer(model=torch.nn.Linear(2, 2), args=args, **trainer_keywords)


def test_batches_the_losses_cannot_take_are_one_clear_error():
    from raysdpb.hf.trainer import method_outputs

    logits = torch.zeros(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 4  # the second sequence has no answer token
    with pytest.raises(UserError, match="a training sequence has no answer token"):
        method_outputs(logits, labels)
    with pytest.raises(UserError, match=r"labels of shape \(2, 5\) with logits of shape \(2, 3\)"):
        method_outputs(torch.zeros(2, 3), labels)


@pytest.fixture(scope="module")
def small(shared_data_dir):
    cfg = load_trial_config(None, raw=small_encoder_raw(shared_data_dir))
    model, tokenizer, task = trial_model(cfg)
    return cfg, model, tokenizer, hf_dataset(cfg, task, tokenizer)


def test_missing_training_data_or_labels_is_one_clear_error(small, tmp_path):
    cfg, model, tokenizer, data = small
    collator = DataCollatorWithPadding(tokenizer)
    with pytest.raises(UserError, match="needs a train_dataset"):
        SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path), data_collator=collator).train()
    unlabelled = data.remove_columns("label")
    with pytest.raises(UserError, match="the training batches have no labels .* name the dataset's label column"):
        SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path), train_dataset=unlabelled,
                                data_collator=collator).train()
    streamed = data.to_iterable_dataset()
    with pytest.raises(UserError, match="needs a map-style train_dataset"):
        SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path), train_dataset=streamed,
                                data_collator=collator)
    tiny = data.select(range(6))
    with pytest.raises(UserError, match="dataset too small: 6 samples cannot fill one overlapping batch of 8"):
        SelfDistillationTrainer(model=model, args=hf_arguments(cfg, tmp_path), train_dataset=tiny,
                                data_collator=collator).train()
    grouped = hf_arguments(cfg, tmp_path, train_sampling_strategy="group_by_length")
    with pytest.raises(UserError, match="the method's batch sampler decides the order"):
        SelfDistillationTrainer(model=model, args=grouped, train_dataset=data, data_collator=collator).train()


def test_missing_accelerate_is_one_clear_error():
    """Without accelerate (hidden from this interpreter), importing raysdpb.hf ends in one UserError naming the
    extra to install."""
    code = "import sys; sys.modules['accelerate'] = None; import raysdpb.hf"
    proc = subprocess.run([sys.executable, "-c", code], env=sweep_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "raysdpb.errors.UserError: raysdpb.hf needs accelerate, which the Hugging Face Trainer runs on: "
        "pip install 'raysdpb[hf]' (or pip install 'accelerate>=1.0')")


def test_the_example_script_runs(shared_data_dir, tmp_path):
    """examples/hf_trainer_dynsdpb.py as the README runs it, with small settings: MiniLM-L6 on 8 CB examples, one
    epoch of batch 4 (4 half-batches of 2: 3 steps), evaluated on 8; its last line is the final evaluation."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "hf_trainer_dynsdpb.py"), "--data-dir", str(shared_data_dir),
         "--output-dir", str(tmp_path / "out"), "--max-train-samples", "8", "--max-eval-samples", "8",
         "--epochs", "1", "--batch-size", "4", "--max-length", "32"],
        cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (last["method"], last["alpha"], last["tau"], last["steps"]) == ("dynsdpb", 0.5, 2.0, 3)
    assert 0.0 <= last["eval_accuracy"] <= 1.0 and "eval_macro_f1" in last
