"""Shared fixtures: a tiny real digit-scenes shard set, a real local Ray cluster, a real MLflow store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# under `uv run pytest` Ray would start every worker through `uv run` with a fresh virtual
# environment (minutes on 2 cores, worker-start timeouts); the test cluster is local, so its
# workers run this interpreter, as the jobs' local clusters do (launch.py)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


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

    for attempt in range(3):  # on a loaded machine the raylet can give up waiting for its dashboard
        try:  # agent (a fixed 15 s, ray-project/ray#65983) and the node never comes up: start afresh
            ray.init(
                address="local",
                num_cpus=4,
                log_to_driver=True,
                runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}},
            )
            break
        except Exception as e:  # "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow store: sqlite + a local artifact folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def served_model(tiny_scenes, ray_cluster, tmp_path_factory):
    """A tiny MoCo model (3 real training steps) registered in a real sqlite MLflow store as
    ``serve-moco`` version 1 (alias champion), with a real faiss index of the test split built by
    ``xray-match index`` and tagged on the version. Shared by tests/test_index.py, tests/test_serve*.py."""
    from serve_helpers import index_cli, register, train_checkpoint

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ckpt = train_checkpoint(tiny_scenes, str(root / "ckpt-v1"), steps=3, seed=0)
    version = register(uri, ckpt, "serve-moco", tiny_scenes)
    index = index_cli("models:/serve-moco@champion", tiny_scenes, str(root / "index-v1"), uri)
    return {"tracking_uri": uri, "name": "serve-moco", "version": str(version), "checkpoint": ckpt,
            "index": index, "data": tiny_scenes, "root": str(root)}
