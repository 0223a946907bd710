import os
import socket
import subprocess
import sys
import time
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
    * dynsdpb seed 1's trial process (its warm Tune actor) SIGKILLs itself after step 5 (it writes its pid to
      `killed` first): its last checkpoint is step 3's, mid-epoch, with the sampler position and DynSDPB's logit
      cache;
    * dynsdpb seed 0 gets two non-finite losses at step 1 (skipped, counted) and three in a row at step 4
      (`max_nonfinite_steps=3`: diverged).

    One sweep serves two test modules because a sweep costs a Ray start-up and its trials' imports (~30 s on 2 cores):
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


# --- a real S3 API server on loopback, for the tests of s3:// storage (tests/test_s3.py) -----------------------

S3_BUCKET = "raysdpb-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (`moto[server]`, a test extra) on 127.0.0.1, as its own process, with one bucket. Yields the
    environment that points boto3, pyarrow (so Ray Train and Tune) and TensorBoard at it, as a user points them at
    MinIO or another S3-compatible store: `AWS_ENDPOINT_URL` and credentials (`S3_ENDPOINT` for TensorBoard's own
    S3 reader), and a function that makes `s3://` URIs in the bucket."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
    try:
        yield SimpleNamespace(env=env, bucket=S3_BUCKET, client=client, endpoint=endpoint,
                              uri=lambda *parts: "/".join([f"s3://{S3_BUCKET}", *parts]))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """`s3_server`'s environment in this test's process too."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
