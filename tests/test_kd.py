"""KD (section 8.4 of docs/method.md) end to end: real trials of a tiny random BERT on SuperGLUE CB distilling a
teacher folder, whose logits are computed once, cached on disk and shared; the teacher model's forward calls are
counted where transformers runs them."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from transformers.models.bert import modeling_bert

from raysdpb.config import load_trial_config
from raysdpb.errors import UserError
from raysdpb.recipe import run_trial
from raysdpb.recipe.checkpoint import checkpoint_name
from raysdpb.recipe.context import LocalContext
from trial_configs import encoder_raw, encoder_trial, make_teacher


@pytest.fixture
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "cb-teacher", seed=7)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSDPB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher_logits"


@pytest.fixture
def teacher_calls(monkeypatch, teacher):
    """Forward calls of the teacher model (the BERT loaded from the teacher folder; the student is another)."""
    calls = []
    forward = modeling_bert.BertForSequenceClassification.forward

    def counting(self, *args, **kwargs):
        if self.config._name_or_path == str(teacher):
            calls.append(kwargs["input_ids"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertForSequenceClassification, "forward", counting)
    return calls


def _kd(data_dir, teacher, **overrides):
    return encoder_trial(data_dir, method="kd", teacher_model=str(teacher), alpha=0.5, **overrides)


def test_the_teacher_runs_once_and_a_second_trial_reuses_its_cached_logits(shared_data_dir, tmp_path, teacher, cache,
                                                                           teacher_calls):
    cfg = _kd(shared_data_dir, teacher)
    first = run_trial(cfg, LocalContext(tmp_path / "first"))
    assert first.status == "completed"
    assert sum(teacher_calls) == 48 and len(teacher_calls) == 3  # 48 examples, eval_batch_size 16
    assert [e["teacher_forward_passes"] for e in first.history] == [48]
    [table] = cache.glob("*.safetensors")
    assert (cache / table.name.replace(".safetensors", ".json")).is_file()

    # the cached table is the teacher's logits of the training examples, in dataset order (recomputed by hand)
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raysdpb.data import collate
    from raysdpb.recipe.components import load_train_data
    from raysdpb.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    data = load_train_data(cfg, get_task("superglue/cb"), tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    batch = collate(tokenizer.pad_token_id)([data[i] for i in range(48)])
    with torch.no_grad():
        by_hand = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"]).logits
    teacher_calls.clear()
    assert torch.allclose(load_file(str(table))["logits"], by_hand, atol=1e-5)

    # a second trial with the same teacher and data: no teacher forward, the same training
    teacher_calls.clear()
    second = run_trial(cfg.model_copy(update={"seed": 0}), LocalContext(tmp_path / "second"))
    assert teacher_calls == []
    assert [e["teacher_forward_passes"] for e in second.history] == [0]
    # the table it distils from took 48 teacher passes, whoever ran them: the cost column's count, for both
    tables = [[e["teacher_table_passes"] for e in trial.history] for trial in (first, second)]
    assert tables == [[48], [48]]
    strip = [{k: v for k, v in e.items() if k != "teacher_forward_passes"} for e in first.history]
    assert [{k: v for k, v in e.items() if k != "teacher_forward_passes"} for e in second.history] == strip
    assert len(list(cache.glob("*.safetensors"))) == 1

    # other inputs (another max_length) are another table: a miss
    run_trial(_kd(shared_data_dir, teacher, max_length=32), LocalContext(tmp_path / "third"))
    assert sum(teacher_calls) == 48 and len(list(cache.glob("*.safetensors"))) == 2


def test_two_trials_starting_at_once_compute_the_table_once(shared_data_dir, teacher, cache, teacher_calls):
    """The key's lock: of two callers at once, one computes and the other waits, then reads it."""
    from raysdpb.models import load_tokenizer, resolve_model
    from raysdpb.tasks import get_task
    from raysdpb.teacher import teacher_table

    cfg = _kd(shared_data_dir, teacher)
    task, tokenizer = get_task("superglue/cb"), load_tokenizer(resolve_model("tiny-bert"))
    results = [None, None]

    def run(k):
        results[k] = teacher_table(cfg, task, tokenizer, torch.device("cpu"))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[1] for r in results) == [0, 48] and sum(teacher_calls) == 48
    assert torch.equal(results[0][0], results[1][0])
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_a_resumed_kd_trial_reads_the_cache_and_matches_the_uninterrupted_one(shared_data_dir, tmp_path, teacher,
                                                                              cache, teacher_calls):
    cfg = _kd(shared_data_dir, teacher, epochs=2, checkpoint_every_steps=4)
    full = run_trial(cfg, LocalContext(tmp_path / "full", keep=100))
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(4)
    shutil.copytree(mid, tmp_path / "resumed" / "from")
    teacher_calls.clear()
    resumed = run_trial(cfg, LocalContext(tmp_path / "resumed", resume_from=tmp_path / "resumed" / "from"))
    assert teacher_calls == []  # a cache hit; the trial's count (48) comes from its checkpoint
    assert resumed.history == full.history and resumed.history[-1]["teacher_forward_passes"] == 48


def test_kd_refusals_are_one_clear_line(shared_data_dir, tmp_path, teacher, cache):
    with pytest.raises(UserError, match="kd distils a teacher: give teacher_model"):
        load_trial_config(None, raw=encoder_raw(shared_data_dir, method="kd", alpha=0.5))
    with pytest.raises(UserError, match=r"kd: alpha mixes its two targets, so it must lie in \[0, 1\]"):
        load_trial_config(None, raw=encoder_raw(shared_data_dir, method="kd", alpha=2.0, teacher_model=str(teacher)))
    with pytest.raises(UserError, match="teacher_model: .* is no model folder"):
        run_trial(_kd(shared_data_dir, tmp_path / "nowhere"), LocalContext(tmp_path / "a"))
    two_class = make_teacher(tmp_path / "rte-teacher", task="glue/rte")
    with pytest.raises(UserError, match="predicts 2 classes, and superglue/cb has 3"):
        run_trial(_kd(shared_data_dir, two_class), LocalContext(tmp_path / "b"))


def test_teacher_model_is_ignored_and_not_hashed_by_other_methods(shared_data_dir, teacher):
    from raysdpb.sweep.grid import trial_id

    plain = encoder_trial(shared_data_dir, method="finetune")
    assert trial_id(plain) == trial_id(plain.model_copy(update={"teacher_model": str(teacher)}))
    kd = _kd(shared_data_dir, teacher)
    assert trial_id(kd) != trial_id(kd.model_copy(update={"teacher_model": str(teacher) + "-other"}))


@pytest.mark.parametrize("method", ["kd", "ps_kd"])
def test_the_hf_trainer_refuses_methods_whose_targets_are_the_recipes_state(method):
    from raysdpb.hf import SelfDistillationArguments

    with pytest.raises(UserError, match=rf"method '{method}' needs .* which SelfDistillationTrainer does not keep"):
        SelfDistillationArguments(output_dir="unused", method=method, alpha=0.5)
