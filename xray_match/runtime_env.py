"""The environment of every process the package starts on Ray: training workers, Serve replicas,
conversion tasks. The one home of the ``runtime_env`` of each ``ray.init``
(``driver.worker.ensure_ray``, the converters' Ray tasks, the benchmarks) and of the replicas'."""

from __future__ import annotations

import os


def worker_env_vars() -> dict[str, str]:
    """The variables every such process gets."""
    return {"MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}


def worker_env() -> None:
    """Set :func:`worker_env_vars` where the process does not have them."""
    for key, value in worker_env_vars().items():
        os.environ.setdefault(key, value)
