import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml


@pytest.fixture(scope="session")
def shared_data_dir():
    return Path(os.environ.get("RAYSDPB_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --- one real sweep with faults, shared by tests/test_reliability.py and tests/test_report.py ----------------

@pytest.fixture(scope="session")
def faulty_sweep(tmp_path_factory, shared_data_dir):
    """A real sweep on a local Ray, as a user runs it, with two faults injected (tests/faults.py):
    finetune and dynsdpb, seeds 0 and 1, on 32 SuperGLUE CB examples with tiny-bert, 2 epochs, an evaluation and a
    checkpoint every 3 steps, one CPU per trial (two at a time).

    * finetune seeds 0 and 1 run undisturbed;
    * dynsdpb seed 1's Ray Train worker SIGKILLs itself after step 5 (it writes its pid to `killed` first): its
      last checkpoint is step 3's, mid-epoch, with the sampler position and DynSDPB's logit cache;
    * dynsdpb seed 0 gets two non-finite losses at step 1 (skipped, counted) and three in a row at step 4
      (`max_nonfinite_steps=3`: diverged).

    One sweep serves two test modules because each Ray trial costs ~35 s of start-up on 2 cores:
    test_reliability checks how the sweep came through the faults, test_report the report of it (on a copy).
    Returns the experiment folder, the sweep's CompletedProcess, the `killed` marker and the scratch folder."""
    from trial_configs import fault_env, sweep_env, sweep_raw

    root = tmp_path_factory.mktemp("faulty-sweep")
    raw = sweep_raw(shared_data_dir, root / "results", "faults", {"method": ["finetune", "dynsdpb"], "seed": [0, 1]},
                    log_every_steps=1, grad_norm_every_steps=1)
    config = root / "faults.yaml"
    config.write_text(yaml.safe_dump(raw))
    killed, scratch = root / "killed", root / "scratch"
    env = sweep_env(RAYSDPB_SCRATCH_DIR=str(scratch), **fault_env(
        {"point": "after_step", "step": 5, "where": {"method": "dynsdpb", "seed": 1}, "marker": str(killed)},
        {"point": "loss", "step": 1, "times": 2, "where": {"method": "dynsdpb", "seed": 0}},
        {"point": "loss", "step": 4, "times": 3, "where": {"method": "dynsdpb", "seed": 0}}))
    out = subprocess.run([sys.executable, "-m", "raysdpb.sweep", str(config), "-q"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return SimpleNamespace(experiment=root / "results" / "faults", out=out, killed=killed, scratch=scratch)


# --- fixtures for tests/test_tasks.py (raysdpb.tasks) --------------------------------------------------------

@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """The Hugging Face hub made unreachable and its caches empty, also when `datasets`/`huggingface_hub`
    were imported before the offline variables were set (they read them once, at import)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.delenv("RAYSDPB_DATA_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path
