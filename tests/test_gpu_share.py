"""benchmarks/gpu_share.py: the combined throughput and the recommended share against hand-made reports; (slow) its
CPU rehearsal end to end: processes spawned, a barrier, figures and a recommendation written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trial_configs import REPO, load_benchmark


@pytest.fixture(scope="module")
def share():
    return load_benchmark("gpu_share.py", "gpu_share_benchmark")


def _worker(tokens, seconds, step_s=0.1, peak=1000.0, steps=10):
    return {"tokens": tokens, "seconds": seconds, "step_s": step_s, "peak_mib": peak, "steps": steps}


def test_combined_throughput_is_the_sum_of_each_processs_own_rate(share):
    """Two processes: 4,096 tokens in 2 s and 6,144 in 4 s: 2,048 + 1,536 = 3,584 tokens/s (not 10,240 / 4 s);
    MFU = 3,584 x 1e8 FLOPs a token over 1 TFLOP/s; a failed process makes the whole k failed, with its error."""
    out = share.combine([_worker(4096, 2.0, 0.2, 900.0), _worker(6144, 4.0, 0.4, 1200.0)], peak_tflops=1.0,
                        flops_per_token=1e8)
    assert out["tokens_per_s"] == pytest.approx(3584.0) and out["k"] == 2 and out["ok"]
    assert out["step_ms_median"] == pytest.approx(300.0) and out["peak_mib_max"] == 1200.0
    assert out["mfu"] == pytest.approx(3584.0 * 1e8 / 1e12)
    assert share.combine([_worker(1, 1.0)])["mfu"] is None  # no peak: no MFU
    failed = share.combine([_worker(4096, 2.0), {"error": "OutOfMemoryError: CUDA out of memory"}])
    assert failed == {"k": 2, "ok": False, "errors": ["OutOfMemoryError: CUDA out of memory"]}


@pytest.mark.parametrize("rates, expected", [
    ({1: 100.0, 2: 180.0, 4: 250.0, 8: 255.0}, 4),   # 250 is within 5% of 255: fewer processes for the same
    ({1: 100.0, 2: 180.0, 4: 200.0, 8: 260.0}, 8),   # only 8 reaches 247
    ({1: 100.0, 2: 99.0, 4: 90.0}, 1),               # sharing only slows it
    ({1: 100.0, 2: 150.0, 4: None}, 2),              # 4 ran out of memory: not a candidate
    ({1: None}, None),
])
def test_the_recommendation_is_the_fewest_processes_within_tolerance_of_the_best(share, rates, expected):
    results = [{"k": k, "ok": r is not None, "tokens_per_s": r} for k, r in rates.items()]
    assert share.recommend(results, tolerance=0.05) == expected


@pytest.mark.slow  # spawns 1 + 2 processes that each load torch, a model and RTE (about a minute on 2 cores)
def test_cpu_rehearsal_end_to_end(tmp_path, shared_data_dir):
    out = tmp_path / "share.json"
    env = {**os.environ, "RAYSDPB_DATA_DIR": str(shared_data_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_share.py", "--device", "cpu", "--shares", "1", "2",
                           "--seconds", "2", "--warmup", "1", "--encoder-model", "tiny-bert", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["k"] for r in result["results"]] == [1, 2] and all(r["ok"] for r in result["results"])
    for r in result["results"]:
        assert len(r["workers"]) == r["k"] and all(w["steps"] >= 1 and w["tokens"] == w["steps"] * 32 * 128
                                                   for w in r["workers"])
    assert result["recommended_k"] in (1, 2) and result["results"][0]["vs_one"] == 1.0
