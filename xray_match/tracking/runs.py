"""MLflow tracking: a driver-side session (experiment, parent/child runs, registration) and a
rank-0 logger inside the Ray Train workers. Ray's MLflowLoggerCallback does not work with Train
V2, so workers log directly, rank 0 only."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Any

import yaml

from xray_match.config import Config, xray_home

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CHAMPION = "champion"


def resolve_tracking_uri(cfg: Config) -> str:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        home = xray_home()
        home.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{home / 'mlflow.db'}"
    return uri


def local_artifact_root(uri: str) -> str | None:
    """For a sqlite / file store: an artifact folder beside it (MLflow's default is ./mlruns
    relative to the current directory, which differs between the driver and Ray workers)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), "mlartifacts")
    return None


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class TrackingSession:
    """Driver side: creates the experiment and runs, registers checkpoints."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri = resolve_tracking_uri(cfg)
        if not self.enabled:
            return
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment_name)
        if exp is None:  # created here, once, before any worker touches the store
            self.experiment_id = self.client.create_experiment(cfg.tracking.experiment_name,
                                                               artifact_location=local_artifact_root(self.uri))
        else:
            self.experiment_id = exp.experiment_id

    def start_run(self, run_name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        t = {"mlflow.runName": run_name, "model": self.cfg.model.name, "git_sha": git_sha()} | (tags or {})
        if parent_run_id:
            t["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, tags=t, run_name=run_name).info.run_id

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status)

    def worker_spec(self, run_id: str | None) -> dict[str, Any] | None:
        return {"tracking_uri": self.uri, "run_id": run_id} if self.enabled and run_id else None

    def register(self, checkpoint: Any, run_id: str, metrics: dict[str, Any], info: Any,
                 name: str | None = None, extra_tags: dict[str, str] | None = None) -> int:
        """Log ``checkpoint`` (a Ray Checkpoint or a folder) as a model of ``run_id``, register it
        as a new version of ``name`` with alias ``champion`` and tags; returns the version."""
        from xray_match.tracking.registry import log_and_register

        from xray_match.registry import RECIPES

        recipe = RECIPES.get(self.cfg.model.name)
        name = name or self.cfg.tracking.registered_model_name or f"xray-match-{self.cfg.model.name}"
        metric = recipe.metric
        tags = {"metric": metric, "metric_value": str(metrics.get(metric, "")), "dataset": getattr(info, "dataset", ""),
                "data_path": getattr(info, "root", ""), "run_id": run_id} | (extra_tags or {})
        path = checkpoint.path if hasattr(checkpoint, "path") else str(checkpoint)
        if hasattr(checkpoint, "as_directory"):
            with checkpoint.as_directory() as d:
                return log_and_register(self.client, self.uri, run_id, d, name, tags)
        return log_and_register(self.client, self.uri, run_id, path, name, tags)


class RankZeroLogger:
    """Inside a Ray Train worker: logs params, per-epoch metrics and figures from rank 0 only."""

    def __init__(self, spec: dict[str, Any] | None, rank: int):
        self.active = spec is not None and rank == 0
        if not self.active:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(spec["tracking_uri"])
        self.run_id = spec["run_id"]

    def start(self, cfg: Config) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        flat = {k: str(v)[:6000] for k, v in cfg.flat().items()}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.yaml"), "w") as fh:
                yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
            with open(os.path.join(d, "git_sha.txt"), "w") as fh:
                fh.write(git_sha() + "\n")
            self.client.log_artifact(self.run_id, os.path.join(d, "config.yaml"))
            self.client.log_artifact(self.run_id, os.path.join(d, "git_sha.txt"))

    def log_epoch(self, metrics: dict[str, float], epoch: int, artifacts: list[str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=ms)
        for path in artifacts:
            self.client.log_artifact(self.run_id, path, artifact_path=f"figures/epoch{epoch:03d}")

    def end(self) -> None:
        pass
