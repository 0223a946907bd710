"""`gradient_checkpointing: true`: the layers really recompute in the backward pass, the gradients and whole
trials are those of the plain backward (dropout included), and the trial id does not change."""

from __future__ import annotations

import pytest
import torch

from raysdpb.config import TrialConfig
from raysdpb.data import TokenizedDataset
from raysdpb.errors import UserError
from raysdpb.models import build_model, load_tokenizer, resolve_model
from raysdpb.recipe import Recipe, run_trial
from raysdpb.recipe.context import LocalContext
from raysdpb.sweep.grid import trial_id
from trial_configs import decoder_trial, encoder_trial


def _build(name: str, kind: str, checkpointing: bool, lora=None):
    source = resolve_model(name)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = build_model(source, kind=kind, num_labels=3, tokenizer=tokenizer, lora=lora,
                        gradient_checkpointing=checkpointing)
    return model, tokenizer


def _batch(kind: str, vocab: int, generator: torch.Generator, step: int) -> dict:
    ids = torch.randint(5, vocab, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # one padded row
    # the overlapping stream's indices: each batch's first half is the previous batch's second half
    batch = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(2 * step, 2 * step + 4)}
    if kind == "generation":
        answer = torch.zeros_like(ids)
        answer[:, 10:18] = 1
        batch["answer_mask"] = answer
    else:
        batch["labels"] = torch.randint(0, 3, (4,), generator=generator)
    return batch


def _layer_part(model, kind: str) -> torch.nn.Module:
    """A module inside the first layer: its forward pre-hook fires once per forward, again in a recompute (a
    forward hook may not: the recompute stops as soon as the last saved tensor is back, inside LLaMA's MLP)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.bert.encoder.layer[0].intermediate if kind == "classification" else base.model.layers[0].mlp


class _GradientRecorder(torch.optim.SGD):
    """An optimizer that changes nothing and keeps the gradients each step hands it."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[dict] = []

    def step(self, closure=None):
        self.seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})


def _recipe_for(model, kind: str) -> Recipe:
    """The real recipe around `model` (dynsdpb, no clipping), its optimizer a gradient recorder."""
    task = "superglue/cb" if kind == "classification" else "nlg/gsm8k"
    recipe = Recipe(TrialConfig(task=task, model="tiny-bert", method="dynsdpb", alpha=1.0, tau=2.0, batch_size=4,
                                max_grad_norm=None, progress_bar=False))
    recipe.setup_runtime()
    recipe.setup_data(TokenizedDataset([{"index": i} for i in range(8)], kind), [])
    recipe.setup_model(model)
    recipe.setup_loader(None)
    recipe.setup_optimization()
    recipe.optimizer = _GradientRecorder(model.parameters())
    recipe.scheduler = torch.optim.lr_scheduler.LambdaLR(recipe.optimizer, lambda _: 1.0)
    return recipe


@pytest.mark.parametrize("name,kind,lora", [
    ("tiny-bert", "classification", None),
    ("tiny-llama", "generation", dict(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])),
])
def test_checkpointed_layers_recompute_and_give_the_plain_gradients(name, kind, lora):
    from raysdpb.config import LoraConfig

    lora = LoraConfig(**lora) if lora else None
    plain, tokenizer = _build(name, kind, False, lora)
    checkpointed, _ = _build(name, kind, True, lora)
    checkpointed.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = [_batch(kind, len(tokenizer), generator, step) for step in range(3)]

    grads, calls = {}, {}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        recipe = _recipe_for(model, kind)
        model.train()  # dropout on: the recompute must replay the same masks
        count = [0]
        _layer_part(model, kind).register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for step, batch in enumerate(batches):
            torch.manual_seed(100 + step)
            assert recipe.train_step(batch) is not None
        names = {id(p): n for n, p in model.named_parameters()}
        grads[label] = [{names[k]: g for k, g in seen.items()} for seen in recipe.optimizer.seen]
        calls[label] = count[0]

    assert calls["plain"] == len(batches)
    assert calls["checkpointed"] == 2 * len(batches)  # each layer ran again in the backward pass
    assert len(grads["plain"]) == len(batches)
    for plain_step, ckpt_step in zip(grads["plain"], grads["checkpointed"]):
        assert plain_step.keys() == ckpt_step.keys() and plain_step
        for key in plain_step:
            torch.testing.assert_close(ckpt_step[key], plain_step[key], rtol=1e-5, atol=1e-7, msg=key)


def _trial(data_dir, **overrides):
    return encoder_trial(data_dir, epochs=2, **overrides)


def _nlg_trial(data_dir, **overrides):
    lora = dict(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])  # dropout: masks to replay
    return decoder_trial(data_dir, max_length=96, max_train_samples=8, max_eval_samples=2, max_new_tokens=4,
                         lora=lora, **overrides)


@pytest.mark.parametrize("make", [_trial, _nlg_trial], ids=["encoder", "lora-decoder"])
def test_a_checkpointed_trial_trains_exactly_as_the_plain_one(make, shared_data_dir, tmp_path):
    plain_cfg, ckpt_cfg = make(shared_data_dir), make(shared_data_dir, gradient_checkpointing=True)
    # it changes memory and compute, not what is trained: the same trial (a sweep resumes it either way)
    assert trial_id(ckpt_cfg) == trial_id(plain_cfg)
    plain = run_trial(plain_cfg, LocalContext(tmp_path / "plain"))
    ckpt = run_trial(ckpt_cfg, LocalContext(tmp_path / "ckpt"))
    assert plain.status == ckpt.status == "completed" and plain.steps == ckpt.steps > 0
    assert len(plain.history) == len(ckpt.history)
    for a, b in zip(plain.history, ckpt.history):
        for key in ("train_loss", "train_ce", "train_distill", "alpha_mean", "tau_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        for key in (k for k in a if k.startswith("eval_")):
            assert b[key] == pytest.approx(a[key], abs=1e-9), key


def test_a_model_without_gradient_checkpointing_is_one_clear_error(monkeypatch):
    from transformers import BertPreTrainedModel

    monkeypatch.setattr(BertPreTrainedModel, "supports_gradient_checkpointing", False)
    with pytest.raises(UserError, match="gradient_checkpointing: the model tiny-bert .* does not support it"):
        _build("tiny-bert", "classification", True)
