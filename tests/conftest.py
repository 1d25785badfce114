"""Shared fixtures: a tiny real digit-scenes shard set, a real local Ray cluster, a real MLflow store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory) -> str:
    """A real digit-scenes data set: 240 train / 60 val / 60 test images in 30-sample shards."""
    from xray_match.data.digit_scenes import build_digit_scenes

    root = str(tmp_path_factory.mktemp("scenes"))
    build_digit_scenes(root, train=240, val=60, test=60, size=64, seed=0, maxcount=30, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray cluster for the session (4 logical CPUs on 2 cores: room for a Tune
    trial's driver beside two training workers)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        log_to_driver=True,
        runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow store: sqlite + a local artifact folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
