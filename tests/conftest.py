"""Shared fixtures: a tiny real digit-scenes shard set, a real local Ray cluster, a real MLflow store,
a real S3 endpoint (SeaweedFS)."""

from __future__ import annotations

import os

import pytest

from xray_match.runtime_env import worker_env

worker_env()
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# under `uv run pytest` Ray would start every worker through `uv run` with a fresh virtual
# environment (minutes on 2 cores, worker-start timeouts); the test cluster is local, so its
# workers run this interpreter, as the jobs' local clusters do (launch.py)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


#: the slow tier: a test with one of these markers, or one that uses one of these fixtures, is marked
#: ``slow`` here; other tests over a few seconds carry ``@pytest.mark.slow`` themselves.
#: ``pytest -m "not slow"`` is the fast tier (README); the README's test command and CI run everything
SLOW_MARKERS = ("ray", "s3", "cluster")
SLOW_FIXTURES = {"ray_cluster", "ray_cluster_s3", "s3_store", "served_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(m) for m in SLOW_MARKERS) or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory) -> str:
    """A real digit-scenes data set: 240 train / 60 val / 60 test images in 30-sample shards."""
    from xray_match.data.digit_scenes import build_digit_scenes

    root = str(tmp_path_factory.mktemp("scenes"))
    build_digit_scenes(root, train=240, val=60, test=60, size=64, seed=0, maxcount=30, workers=1, progress=False)
    return root


#: the S3 endpoint in the environment the session's Ray cluster was started with
_RAY_STARTED_WITH: dict[str, str | None] = {}


def _start_ray():
    import ray

    from xray_match.runtime_env import worker_env_vars
    from xray_match.serve.app import use_ray_env
    from xray_match.serve.config import ServeConfig

    use_ray_env(ServeConfig())  # the session's Serve runs as `xray-match serve` starts it (HAProxy ingress)
    for attempt in range(3):  # on a loaded machine the raylet can give up waiting for its dashboard
        try:  # agent (a fixed 15 s, ray-project/ray#65983) and the node never comes up: start afresh
            ray.init(
                address="local",
                num_cpus=4,
                log_to_driver=True,
                runtime_env={"env_vars": worker_env_vars()},
            )
            break
        except Exception as e:  # "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    _RAY_STARTED_WITH["endpoint"] = os.environ.get("AWS_ENDPOINT_URL")
    return ray


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray cluster for the session (4 logical CPUs on 2 cores: room for a Tune
    trial's driver beside two training workers)."""
    ray = _start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster_s3(s3_store, ray_cluster):
    """The session's Ray cluster, its processes able to reach ``s3_store``. Ray's workers take
    their environment from the raylet, which has the driver's environment of the moment the
    cluster started: a cluster started before ``s3_store`` set the AWS variables is restarted."""
    if _RAY_STARTED_WITH.get("endpoint") != s3_store["endpoint"]:
        ray_cluster.shutdown()
        _start_ray()
    return ray_cluster


#: variables that would send the session's S3 clients elsewhere than the store it starts
_S3_OVERRIDES = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3 endpoint for the session: SeaweedFS alone (``devcluster.up(services=("s3",))``,
    about 5 s), configured the way users configure one: its ``AWS_*`` variables and
    ``XRAY_BUCKET`` in ``os.environ`` (subprocesses inherit them), the old values put back at
    the end. Yields ``{"bucket", "endpoint"}``. The store is always stopped and its data
    deleted, also when a test or the start itself fails: nothing is left running."""
    from xray_match import devcluster

    folder = str(tmp_path_factory.mktemp("s3-store"))
    saved: dict[str, str | None] = {}
    try:
        state = devcluster.up(folder, services=("s3",), owner_pid=os.getpid())
        env = {k: v for k, v in state.exports().items() if k.startswith("AWS_") or k == "XRAY_BUCKET"}
        saved = {k: os.environ.get(k) for k in (*env, *_S3_OVERRIDES)}
        for k in _S3_OVERRIDES:
            os.environ.pop(k, None)
        os.environ.update(env)
        yield {"bucket": state.bucket, "endpoint": env["AWS_ENDPOINT_URL"]}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        devcluster.down(folder, purge=True)


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
    version = register(uri, ckpt, "serve-moco")
    index = index_cli("models:/serve-moco@champion", tiny_scenes, str(root / "index-v1"), uri)
    return {"tracking_uri": uri, "name": "serve-moco", "version": str(version), "checkpoint": ckpt,
            "index": index, "data": tiny_scenes, "root": str(root)}
