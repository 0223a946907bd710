"""Small real trials that test modules share: a tiny random BERT on SuperGLUE CB and a tiny random LLaMA with
LoRA on GSM8K, both on data from `../shared/data`; `overrides` change any key."""

from __future__ import annotations

import os
from pathlib import Path

from raysdpb.config import TrialConfig, load_trial_config
from raysdpb.recipe.context import LocalContext
from raysdpb.recipe.recipe import RECIPE_ENV
from faults import FAULTS_ENV, fault_env  # noqa: F401 (fault_env: for the tests)

REPO = Path(__file__).resolve().parents[1]


def encoder_raw(data_dir, **overrides) -> dict:
    """The encoder trial as the raw mapping a trial YAML holds."""
    raw = dict(task="superglue/cb", model="tiny-bert", method="dynsdpb", data_dir=str(data_dir), epochs=1,
               batch_size=8, eval_batch_size=16, max_length=64, lr=1e-3, max_train_samples=48, max_eval_samples=24,
               seed=0, progress_bar=False, alpha=1.0, tau=2.0)
    return {**raw, **overrides}


def small_encoder_raw(data_dir, **overrides) -> dict:
    """The encoder trial, smaller still (32 training examples of 32 tokens, 16 to evaluate), for tests that run
    many trials, several in subprocesses or on Ray."""
    return encoder_raw(data_dir, **{"max_length": 32, "max_train_samples": 32, "max_eval_samples": 16, **overrides})


def sweep_raw(data_dir, storage, name, search, sweep=None, **trial) -> dict:
    """A sweep YAML's mapping over the small encoder trial (2 epochs at lr 1e-4, an evaluation and a checkpoint
    every 3 steps, diverged after 3 non-finite losses in a row): `search` as given, one 1-CPU worker per trial,
    one checkpoint kept, one retry, no ASHA, every finished trial's best weights kept (`keep_weights: all`, so
    that each trial's storage is one checkpoint whatever the ranking); `sweep` overrides that block, `trial` the
    trial's keys."""
    raw = small_encoder_raw(data_dir, epochs=2, lr=1e-4, max_nonfinite_steps=3, eval_every_steps=3)
    raw.pop("progress_bar")
    raw.update(trial)
    raw["search"] = search
    raw["sweep"] = {"name": name, "storage_path": str(storage), "num_workers": 1, "cpus_per_worker": 1,
                    "keep_checkpoints": 1, "keep_weights": "all", "max_failures": 1, "asha": None,
                    **(sweep or {})}
    return raw


def encoder_trial(data_dir, **overrides) -> TrialConfig:
    return load_trial_config(None, raw=encoder_raw(data_dir, **overrides))


def decoder_trial(data_dir, **overrides) -> TrialConfig:
    raw = dict(task="nlg/gsm8k", model="tiny-llama", method="dynsdpb", data_dir=str(data_dir), epochs=1,
               batch_size=2, eval_batch_size=4, max_length=128, lr=5e-3, max_train_samples=12, max_eval_samples=4,
               max_new_tokens=6, seed=0, progress_bar=False, alpha=1.0, tau=2.0,
               lora=dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    return load_trial_config(None, raw={**raw, **overrides})


def sweep_env(**extra) -> dict:
    """The environment a test's `python -m raysdpb.sweep` runs in: offline, a local Ray (no RAY_ADDRESS), no
    injected faults unless `extra` sets them, and the checkout under test first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULTS_ENV, RECIPE_ENV)}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", **extra)
    # the checkout under test first, and tests/ for the faults a test injects (`faults.FaultyRecipe`)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    return env


def load_benchmark(script: str, name: str):
    """A script of benchmarks/ (`script`, e.g. "quality.py") as a module named `name`, for its tests (registered in
    `sys.modules` first: dataclasses look their module up while the class is made)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class RecordingContext(LocalContext):
    """LocalContext that also keeps every TensorBoard scalar (the recipe's per-step losses, `train/loss`), to
    check what the loop logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalars: list[tuple[int, dict]] = []

    def log_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))
        super().log_scalars(step, scalars)


def make_teacher(folder: Path, task: str = "superglue/cb", model: str = "tiny-bert", seed: int = 0) -> Path:
    """A teacher folder for KD as `python -m raysdpb.export` writes one (`save_pretrained` of the classification
    model and its tokenizer): here the tiny random BERT built for `task` from `seed`, not trained (the tests check
    where its logits go, not how good they are)."""
    import torch

    from raysdpb.models import build_model, load_tokenizer, resolve_model
    from raysdpb.tasks import get_task

    spec = get_task(task)
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(seed)
    built = build_model(source, kind=spec.kind, num_labels=spec.num_labels, tokenizer=tokenizer)
    built.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
