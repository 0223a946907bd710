"""`python -m raysdpb.export`: a sweep's trial as a Hugging Face folder that `from_pretrained` and `pipeline()` load,
scoring on the validation split what the sweep recorded for those weights; a LoRA trial as its adapter or merged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysdpb.results.storage import read_rows
from trial_configs import REPO, decoder_trial, sweep_env


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysdpb.export", *args], cwd=REPO, env=sweep_env(),
                          capture_output=True, text=True, timeout=300)


def _accuracy_with_pipeline(folder: Path, config: dict) -> float:
    """The exported model's accuracy on the trial's validation records, through `transformers.pipeline`."""
    from transformers import pipeline

    from raysdpb.config import TrialConfig
    from raysdpb.tasks import data_dir_from, load_examples, resolve_task

    cfg = TrialConfig.model_validate(config)
    task = resolve_task(cfg)
    records = load_examples(task, "validation", data_dir_from(cfg.data_dir))[: cfg.max_eval_samples]
    classify = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    inputs = [{"text": r["text"], "text_pair": r["text_pair"]} for r in records]
    predicted = classify(inputs, truncation=True, max_length=cfg.max_length)
    label2id = classify.model.config.label2id
    return sum(label2id[p["label"]] == r["label"] for p, r in zip(predicted, records)) / len(records)


def test_a_trial_and_the_best_ones_export_as_folders_pipeline_loads(faulty_sweep, tmp_path):
    experiment = faulty_sweep.experiment
    rows = read_rows(str(experiment / "trials.parquet"))
    configs = json.loads((experiment / "grid.json").read_text())["trials"]
    finetune = next(r for r in rows if r["method"] == "finetune" and r["seed"] == 0)

    out = _export(str(experiment), "--trial", finetune["trial_id"], "--out", str(tmp_path / "one"))
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one")
    assert model.config.id2label == {0: "entailment", 1: "contradiction", 2: "neutral"}
    # the weights of its best evaluation: pipeline() scores what the sweep recorded as the trial's best
    assert _accuracy_with_pipeline(tmp_path / "one", configs[finetune["trial_id"]]) == pytest.approx(
        finetune["best_eval_accuracy"])
    card = (tmp_path / "one" / "README.md").read_text()
    assert finetune["trial_id"] in card and "superglue/cb" in card and "`eval_accuracy`" in card

    out = _export(str(experiment), "--best", "--per-method", "--out", str(tmp_path / "best"))
    assert out.returncode == 0, out.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "best").iterdir())
    assert folders == ["superglue-cb_tiny-bert", "superglue-cb_tiny-bert_dynsdpb", "superglue-cb_tiny-bert_finetune"]
    for name in folders:
        assert (tmp_path / "best" / name / "config.json").exists() and (tmp_path / "best" / name / "README.md").exists()

    missing = _export(str(experiment), "--trial", "nope", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and missing.stderr.startswith("raysdpb: error: --trial nope: no such trial")


def _decoder_experiment(tmp_path: Path, data_dir: Path) -> tuple[Path, dict, object]:
    """A one-trial experiment folder as a sweep lays it out, from a local run of a LoRA decoder trial."""
    from raysdpb.recipe import Recipe
    from raysdpb.recipe.checkpoint import complete_checkpoints, mark_complete
    from raysdpb.recipe.context import LocalContext
    from raysdpb.results.recorder import TrialInfo, summarize_trial, to_table
    from raysdpb.results.storage import write_json, write_table
    from raysdpb.sweep.grid import trial_id
    from raysdpb.sweep.worker import REPORT_FILE

    cfg = decoder_trial(data_dir, method="dynsdpb")
    recipe = Recipe(cfg, LocalContext(tmp_path / "run"))
    result = recipe.setup().train()
    tid = trial_id(cfg)
    experiment = tmp_path / "experiment"
    _, checkpoint = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    target = experiment / "train_runs" / tid / Path(checkpoint).name
    target.mkdir(parents=True)
    for f in Path(checkpoint).iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / REPORT_FILE).write_text(json.dumps(result.history))
    mark_complete(target)
    write_json(str(experiment / "grid.json"), {"format": 2, "trial_ids": [tid],
                                               "trials": {tid: cfg.model_dump(mode="json")}})
    info = TrialInfo(tid, "method=dynsdpb", {"task": cfg.task, "model": cfg.model, "method": cfg.method, "seed": 0},
                     1, main_metric="eval_exact_match")
    write_table(to_table([summarize_trial(info, result.history, status="completed", main_metric="eval_exact_match")]),
                str(experiment / "trials.parquet"))
    return experiment, {"trial_id": tid}, recipe


def test_a_lora_trial_exports_its_adapter_or_the_merged_model(tmp_path, shared_data_dir):
    """The adapter on its base (peft) and the merged model (transformers alone) compute the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raysdpb.models import build_model, resolve_model
    from raysdpb.recipe.components import seed_everything

    experiment, trial, recipe = _decoder_experiment(tmp_path, shared_data_dir)
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    recipe.model.eval()
    with torch.no_grad():
        want = recipe.model(input_ids=ids).logits  # the trained adapter on its base

    out = _export(str(experiment), "--trial", trial["trial_id"], "--out", str(tmp_path / "adapter"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "config.json").exists()  # the adapter only, not the base
    seed_everything(0)  # tiny-llama's base is random: the same seed builds the same one
    base = build_model(resolve_model("tiny-llama"), kind="generation", tokenizer=recipe.tokenizer)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    out = _export(str(experiment), "--trial", trial["trial_id"], "--merge", "--out", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_a_trial_whose_weights_the_sweep_dropped_is_one_clear_message(tmp_path):
    """Lean storage drops the weights of finished trials outside the best `keep_weights`: exporting one says so and
    what to do, instead of a bare 'no checkpoint'."""
    from raysdpb.errors import UserError
    from raysdpb.export import _best_checkpoint

    run = tmp_path / "train_runs" / "finetune-0"
    run.mkdir(parents=True)
    (run / "checkpoint_step_00000004").mkdir()  # no manifest: not a whole checkpoint
    with pytest.raises(UserError, match=r"no whole checkpoint to export: a sweep keeps the weights of its best "
                                        r"finished trials only \(sweep\.keep_weights.*keep_weights: all"):
        _best_checkpoint(str(run), "eval_accuracy")
