"""scripts/gpu_check.sh, rehearsed on the CPU (GPU_CHECK_SMOKE=1): every step of the script the GPU sessions run
must start, finish and write what the closing notes read (the trials' final JSON lines, the benchmarks' JSON
figures), so that a GPU session's 15 minutes are not spent on a broken script. The steps' time limits are
raised (GPU_CHECK_TIME_SCALE) so that a busy machine fails nothing here: this checks what runs, not how fast.
Slow (several minutes on 2 cores): run with `-m slow`."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from raysdpb.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
STEPS = ["environment", "encoder_dynsdpb", "decoder_dynsdpb", "overhead", "vs_hf_trainer", "loss_cost",
         "encoder_finetune"]


def _final_json(log: Path) -> dict:
    """The last stdout line of `python -m raysdpb.train`: the final evaluation as one JSON object."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, f"{log.name}: no final JSON line; its end:\n{log.read_text()[-2000:]}"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_every_step_and_writes_its_figures(tmp_path, shared_data_dir):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", GPU_CHECK_TIME_SCALE="40", TMPDIR=str(tmp_path),
               RAYSDPB_DATA_DIR=str(shared_data_dir))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "== gpu check: 0 failed step(s)" in proc.stdout
    for name in STEPS:
        assert f"== {name}: exit 0 after" in proc.stdout, name
        assert (out / f"{name}.log").stat().st_size > 0, name

    assert "precision auto on cpu" in (out / "environment.log").read_text()

    # the three trials: their final evaluation, on the task and method asked for, finished and finite
    for name, task, method, metric in [("encoder_dynsdpb", "glue/rte", "dynsdpb", "eval_accuracy"),
                                       ("encoder_finetune", "glue/rte", "finetune", "eval_accuracy"),
                                       ("decoder_dynsdpb", "gsm8k", "dynsdpb", None)]:
        final = _final_json(out / f"{name}.log")
        assert final["method"] == method and final["status"] == "completed", (name, final)
        assert task in final["task"], (name, final)
        scores = {k: v for k, v in final.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        assert scores and all(math.isfinite(v) for v in scores.values()), (name, final)
        if metric:
            assert 0.0 <= final[metric] <= 1.0, (name, final)
    assert (tmp_path / "raysdpb-gpu-check" / "rte-dynsdpb").is_dir()

    overhead = json.loads((out / "overhead-cpu.json").read_text())
    assert overhead["benchmark"] == "overhead" and overhead["device"] == "cpu"
    assert set(overhead["configs"]) >= {"enc-32x128", "dec-2x256"}
    encoder = overhead["configs"]["enc-32x128"]["methods"]
    assert set(encoder) == {m for m in METHODS if METHODS[m].soft_targets != "teacher"}  # kd needs a teacher
    assert encoder["finetune"]["step_time_ratio"] == 1.0
    for method, row in encoder.items():
        assert math.isfinite(row["step_time_ratio"]) and row["step_time_ratio"] > 0, (method, row)
        assert row["steps"] >= 1, (method, row)
    assert "dynsdpb" in overhead["configs"]["dec-2x256"]["methods"]

    hf = json.loads((out / "vs_hf_trainer-cpu.json").read_text())
    assert hf["benchmark"] == "vs_hf_trainer" and hf["device"] == "cpu"
    assert set(hf["sides"]) >= {"ours", "hf"}
    for side in ("ours", "hf"):
        row = hf["sides"][side]
        assert row["samples_per_s"] > 0 and row["steps_timed"] >= 1, (side, row)
        # every timed step has its batch's padded tokens (the HF side once missed each epoch's first batch)
        assert row["mean_tokens_per_step"] > 0 and math.isfinite(row["tokens_per_s"]), (side, row)

    loss = json.loads((out / "loss_cost-cpu.json").read_text())
    for side in ("encoder", "decoder"):
        assert loss[side]["ratio"] > 0, (side, loss[side])
