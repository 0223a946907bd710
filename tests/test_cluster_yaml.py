"""cluster.yaml is a valid Ray cluster launcher config: checked with Ray's own schema and validation
(`ray.autoscaler._private.util.prepare_config` + `validate_config`, what `ray up` runs before launching)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_validation_catches_a_broken_config(cluster):
    # the same check fails on a config Ray would reject, so the test above means something
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x_a10g"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    unknown = copy.deepcopy(cluster)
    unknown["not_a_ray_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(unknown))


def test_cluster_has_gpu_workers_and_installs_the_project(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    gpu_types = [t["node_config"]["InstanceType"] for name, t in types.items() if name != cluster["head_node_type"]]
    assert any(t.startswith(("g5.", "p4d.", "p5.")) for t in gpu_types)
    assert sum(t.get("min_workers", 0) for t in types.values()) >= 1  # a GPU node is up when the sweep checks resources
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install -e" in setup and "raysdpb" in setup
    assert "/home/ubuntu/raysdpb" in cluster["file_mounts"]
    # the cluster runs the same Ray as the driver that submits the sweep
    pinned = re.search(r"ray\[[^\]]*\]==([0-9.]+)", setup)
    assert pinned and pinned.group(1) == ray.__version__
    # shared storage for storage_path: the documented command points the sweep at S3
    assert "storage_path=s3://" in CLUSTER_YAML.read_text()


def test_nodes_get_a_driver_for_pypis_cuda_13_torch_and_not_the_gpu_checks_wheels(cluster):
    """What the GPU Ray check (scripts/gpu_ray_check.sh) taught: PyPI's torch is a CUDA 13 build, so the nodes run
    the Deep Learning Base AMI (its 580+ driver, its system Python, the one setup_commands install into), a GPU node
    whose torch cannot see its GPU fails at setup, and the check's 46 MB wheel folder is not synced to every node."""
    images = {t["node_config"]["ImageId"] for t in cluster["available_node_types"].values()}
    assert len(images) == 1  # one AMI, so one Python version across the cluster, as Ray needs
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in images.pop()
    assert any("torch.cuda.is_available()" in c for c in cluster["worker_setup_commands"])
    assert {"**/.gpu_ray", "**/.whl"} <= set(cluster["rsync_exclude"])
    ignored = (CLUSTER_YAML.parent / ".gitignore").read_text().split()
    assert "/.gpu_ray/" in ignored and "/.whl/" in ignored
