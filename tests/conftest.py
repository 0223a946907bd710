import os
from pathlib import Path
import pytest
@pytest.fixture(scope="session")
def shared_data_dir():
    return Path(os.environ.get("RAYSDPB_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
