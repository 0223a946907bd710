"""Throughput and MFU (raysdpb.throughput) against hand-computed values, and what a real trial reports."""

from __future__ import annotations

import time

import pytest
import torch

from raysdpb.errors import UserError
from raysdpb.throughput import (PEAK_FLOPS, device_kind, matmul_parameters, mfu, peak_flops, tokens_per_s,
                                train_flops_per_token)


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA A10G", "a10g"), ("NVIDIA L4", "l4"), ("Tesla T4", "t4"), ("Tesla V100-SXM2-16GB", "v100-sxm"),
    ("Tesla V100-PCIE-32GB", "v100-pcie"), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_device_names_map_to_their_peak(name, kind):
    assert device_kind(name) == kind


def test_peak_flops_table_environment_and_cpu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", {}) == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32", {}) == 19.5e12
    assert peak_flops("Tesla T4", "bf16", {}) is None  # no bf16 tensor cores
    assert peak_flops(None, "fp32", {}) is None  # the CPU
    assert peak_flops(None, "fp32", {"RAYSDPB_PEAK_FLOPS": "1.5e12"}) == 1.5e12
    assert peak_flops("NVIDIA H200", "bf16", {"RAYSDPB_PEAK_FLOPS": "2e14"}) == 2e14
    for bad in ("fast", "0", "-1"):
        with pytest.raises(UserError, match=r"\$RAYSDPB_PEAK_FLOPS=.*FLOP/s, e\.g\. 989e12"):
            peak_flops(None, "fp32", {"RAYSDPB_PEAK_FLOPS": bad})
    # every entry: half precision at least the fp32 rate
    for rates in PEAK_FLOPS.values():
        assert rates["fp16"] >= rates["fp32"] > 0


def test_flops_per_token_and_mfu_by_hand():
    # full fine-tuning: 6N; LoRA on a 100M model with 1M adapter parameters: 4 x 100M + 2 x 1M
    assert train_flops_per_token(1_000, 1_000) == 6_000
    assert train_flops_per_token(100_000_000, 1_000_000) == 402_000_000
    assert tokens_per_s(12_000, 4.0) == 3_000 and tokens_per_s(5, 0.0) is None
    # 3,000 tokens/s x 6,000 FLOPs = 18 MFLOP/s, over 2 devices of 100 MFLOP/s: 9%
    assert mfu(3_000, 6_000, 100e6, devices=2) == pytest.approx(0.09)
    assert mfu(3_000, 6_000, None) is None and mfu(None, 6_000, 1e9) is None


def test_matmul_parameters_leave_out_looked_up_tables_but_count_a_tied_output_layer():
    class Tiny(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)      # 40, looked up
            self.position = torch.nn.Embedding(3, 4)    # 12, looked up
            self.body = torch.nn.Linear(4, 4)           # 20
            self.head = torch.nn.Linear(4, 10, bias=False)  # 40 (tied: the embedding's own tensor)
            if tied:
                self.head.weight = self.embed.weight
            self.body.bias.requires_grad_(False)        # 4 frozen

        def get_output_embeddings(self):
            return self.head

    assert matmul_parameters(Tiny(tied=False)) == (60, 56)
    assert matmul_parameters(Tiny(tied=True)) == (60, 56)  # the tied table counted once, as the output layer


def test_a_trial_reports_its_throughput_and_restores_it(shared_data_dir, tmp_path, monkeypatch):
    """A real trial: every report carries tokens_per_s (the non-padding tokens it trained on, counted from the
    batches, over its training seconds) and mfu (None on the CPU; with $RAYSDPB_PEAK_FLOPS, tokens/s x FLOPs per
    token over it). The history (what golden tests and resumes compare) holds no timing."""
    from raysdpb.data import collate
    from raysdpb.recipe import Recipe
    from trial_configs import RecordingContext, encoder_trial, load_benchmark

    cfg = encoder_trial(shared_data_dir, method="dynsdpb", epochs=1, eval_every=0.5)
    recipe = Recipe(cfg, RecordingContext(tmp_path / "cpu")).setup()
    result = recipe.train()
    assert not any("tokens_per_s" in h or "mfu" in h for h in result.history)
    # the tokens it trained on, counted here from the same batches
    loader = torch.utils.data.DataLoader(recipe.train_data, batch_sampler=recipe.sampler,
                                         collate_fn=collate(recipe.tokenizer.pad_token_id))
    recipe.sampler.set_epoch(0)
    assert recipe.train_tokens == sum(int(b["attention_mask"].sum()) for b in loader)
    assert 0 < recipe.train_seconds < recipe.elapsed()
    reports = recipe.context.reports
    assert reports and all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in reports)
    assert reports[-1]["tokens_per_s"] == pytest.approx(recipe.train_tokens / recipe.train_seconds)

    monkeypatch.setenv("RAYSDPB_PEAK_FLOPS", "1e12")
    again = Recipe(cfg, RecordingContext(tmp_path / "peak")).setup()
    again.train()
    last = again.context.reports[-1]
    n, trainable = matmul_parameters(again.model)
    assert n == trainable  # full fine-tuning: 6N
    assert last["mfu"] == pytest.approx(last["tokens_per_s"] * 6 * n / 1e12)
    # the benchmarks' MFU (benchmarks/_common.py) counts as the trial rows do (it counted 6 x every parameter,
    # the input embeddings included: 55x the rows' figure for this tiny model, 2.1x for MiniLM-L6)
    benchmark_mfu = load_benchmark("_common.py", "benchmarks_common").mfu

    assert benchmark_mfu(again.model, last["tokens_per_s"], 1.0) == pytest.approx(last["mfu"])
    # a checkpoint holds the counts, and a resumed recipe continues them
    state = again.state_dict(again.sampler.epoch, 0, [again.rank_state()])
    resumed = Recipe(cfg, RecordingContext(tmp_path / "resumed")).setup()
    resumed.load_state_dict(state)
    assert (resumed.train_tokens, resumed.train_seconds) == (again.train_tokens, again.train_seconds)


def test_a_trial_reports_where_its_time_went(shared_data_dir, tmp_path, monkeypatch):
    """Every report carries time_setup_s, time_train_s, time_eval_s and time_checkpoint_s, cumulative: a known
    delay added to each evaluation and to each checkpoint write shows up in its own phase and no other; the
    phases account for the trial's clock (elapsed_s) but for the reports themselves; a resume restores them."""
    from raysdpb.recipe import Recipe
    from raysdpb.results.schema import PHASE_TIME_KEYS
    from trial_configs import RecordingContext, encoder_trial

    # training waits for each checkpoint write here (with `background_checkpoints`, the default, a write overlaps
    # the next steps and only the wait for it counts: tests/test_engine.py)
    cfg = encoder_trial(shared_data_dir, method="dynsdpb", epochs=1, eval_every=0.5, background_checkpoints=False)

    def run(folder, delay_eval=0.0, delay_checkpoint=0.0):
        recipe = Recipe(cfg, RecordingContext(tmp_path / folder)).setup()
        evaluate, write = recipe.evaluate, recipe.write_checkpoint
        monkeypatch.setattr(recipe, "evaluate", lambda: (time.sleep(delay_eval), evaluate())[1])
        monkeypatch.setattr(recipe, "write_checkpoint", lambda *a: (time.sleep(delay_checkpoint), write(*a))[1])
        recipe.train()
        return recipe, recipe.context.reports

    plain, reports = run("plain")
    n = len(reports)
    assert n >= 2
    for key in PHASE_TIME_KEYS:
        values = [r[key] for r in reports]
        assert values[0] > 0 and values == sorted(values), key  # cumulative
    assert all(r["time_setup_s"] == reports[0]["time_setup_s"] for r in reports)  # once per attempt
    last = reports[-1]
    assert last["time_train_s"] == pytest.approx(plain.train_seconds)
    accounted = sum(last[k] for k in PHASE_TIME_KEYS)
    assert 0.8 * last["elapsed_s"] < accounted <= last["elapsed_s"]

    slow, slow_reports = run("slow", delay_eval=0.4, delay_checkpoint=0.3)
    assert len(slow_reports) == n
    end = slow_reports[-1]
    # each report's delays counted in its own phase (a bound no load can break) ...
    assert end["time_eval_s"] >= n * 0.4 and end["time_checkpoint_s"] >= n * 0.3
    # ... and in no other: set-up and training leave room for them on the trial's own clock, nothing counted twice
    assert end["time_setup_s"] + end["time_train_s"] <= end["elapsed_s"] - n * (0.4 + 0.3)
    assert 0.8 * end["elapsed_s"] < sum(end[k] for k in PHASE_TIME_KEYS) <= end["elapsed_s"]
    # a checkpoint carries the phases; a resumed recipe continues from them
    state = slow.state_dict(slow.sampler.epoch, 0, [slow.rank_state()])
    resumed = Recipe(cfg, RecordingContext(tmp_path / "resumed")).setup()
    resumed.load_state_dict(state)
    assert resumed.phase_seconds == slow.phase_seconds
