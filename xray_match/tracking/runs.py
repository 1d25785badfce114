"""MLflow runs: a driver-side session (experiment, parent / child runs, params, metrics,
registration), trial runs started inside Ray Tune trials, metrics and tables logged onto an
existing run, and a rank-0 logger inside the Ray Train workers. Ray's MLflowLoggerCallback does
not work with Train V2, so workers log directly, rank 0 only."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Any

import yaml

from xray_match.config import Config
from xray_match.tracking.store import client, local_artifact_root, registered_model_name, resolve_tracking_uri

_BATCH = 100  # params per log_batch call (MLflow's limit)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- onto an existing run


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    c = client(uri)
    for i in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[i : i + _BATCH])


def log_metrics(uri: str, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics onto an existing run (the job's run, a study's parent, the best trial's run)."""
    if not run_id:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    c = client(uri)
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def log_texts(uri: str, run_id: str | None, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Text files (``{name: text}``, e.g. markdown tables) as artifacts of an existing run."""
    if not run_id or not files:
        return
    c = client(uri)
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as fh:
                fh.write(text)
            c.log_artifact(run_id, os.path.join(d, name), artifact_path=artifact_path)


def tags_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching runs that carry every one of ``tags``."""
    return " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())


def start_trial_run(study: dict[str, Any], run_name: str, tags: dict[str, str]) -> dict[str, Any]:
    """Inside a Tune trial: a child run of the study's parent (``study`` is
    :meth:`TrackingSession.study_spec`); returns the spec the trial's workers log with. A trial
    that runs again (a resumed study, a retried trial) continues its earlier child run, found by
    ``tags``; the run's ``attempts`` tag counts the starts."""
    c = client(study["tracking_uri"])
    where = tags_filter(tags | {"mlflow.parentRunId": study["parent_run_id"]})
    earlier = c.search_runs([study["experiment_id"]], where, max_results=1)
    if earlier:
        run_id = earlier[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        c.set_tag(run_id, "attempts", str(int(earlier[0].data.tags.get("attempts", "1")) + 1))
        return {"tracking_uri": study["tracking_uri"], "run_id": run_id}
    run = c.create_run(study["experiment_id"], run_name=run_name,
                       tags={"mlflow.parentRunId": study["parent_run_id"], "attempts": "1"} | tags)
    return {"tracking_uri": study["tracking_uri"], "run_id": run.info.run_id}


def end_run(spec: dict[str, Any] | None, status: str = "FINISHED") -> None:
    """Mark the run of a worker spec (:meth:`TrackingSession.worker_spec`, :func:`start_trial_run`) ended."""
    if spec:
        client(spec["tracking_uri"]).set_terminated(spec["run_id"], status)


# ----------------------------------------------------------------------------- driver side


class TrackingSession:
    """Driver side: creates the experiment and runs, logs onto them, registers checkpoints."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.uri = resolve_tracking_uri(cfg)
        if not self.enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self.client = client(self.uri)
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
        """What the rank-0 logger of a run's workers needs (picklable)."""
        return {"tracking_uri": self.uri, "run_id": run_id} if self.enabled and run_id else None

    def study_spec(self, parent_run_id: str | None) -> dict[str, Any] | None:
        """What a Tune trial needs to start its child run (:func:`start_trial_run`; picklable)."""
        if not (self.enabled and parent_run_id):
            return None
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": parent_run_id}

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if self.enabled and run_id:
            log_params(self.uri, run_id, params)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float]) -> None:
        if self.enabled:
            log_metrics(self.uri, run_id, metrics)

    def find_child_run(self, parent_run_id: str, tags: dict[str, str]) -> str | None:
        """The first child run of ``parent_run_id`` carrying ``tags``."""
        return self.find_run(tags | {"mlflow.parentRunId": parent_run_id})

    def end_trial_runs(self, parent_run_id: str | None, statuses: dict[str, str]) -> None:
        """Set each Tune trial's child run (by ``ray_trial_id``) to its final status."""
        if not (self.enabled and parent_run_id):
            return
        for trial_id, status in statuses.items():
            run_id = self.find_child_run(parent_run_id, {"ray_trial_id": trial_id})
            if run_id:
                self.client.set_terminated(run_id, status)

    def find_run(self, tags: dict[str, str]) -> str | None:
        """The newest run of the experiment carrying ``tags`` (None when tracking is off or none does)."""
        if not self.enabled:
            return None
        runs = self.client.search_runs([self.experiment_id], tags_filter(tags), order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def register(self, checkpoint: Any, run_id: str, metrics: dict[str, Any], info: Any, *,
                 cfg: Config | None = None, extra_tags: dict[str, str] | None = None) -> int:
        """Log ``checkpoint`` (a :class:`~xray_match.train.checkpoint.StoredCheckpoint` or a local
        folder) as a model of ``run_id``, register it as a new version of
        :func:`~xray_match.tracking.store.registered_model_name` of ``cfg`` (default: the
        session's) with alias ``champion`` and tags (``checkpoint``: where it came from, as a URL
        under an object store); returns the version."""
        from xray_match.registry import RECIPES
        from xray_match.tracking.registry import log_and_register

        cfg = cfg or self.cfg
        metric = RECIPES.get(cfg.model.name).metric
        tags = {"metric": metric, "metric_value": str(metrics.get(metric, "")), "dataset": getattr(info, "dataset", ""),
                "data_path": getattr(info, "root", ""), "run_id": run_id, "checkpoint": str(checkpoint)} | (extra_tags or {})
        name = registered_model_name(cfg)
        if hasattr(checkpoint, "as_directory"):
            with checkpoint.as_directory() as d:
                return log_and_register(self.uri, run_id, d, name, tags)
        return log_and_register(self.uri, run_id, str(checkpoint), name, tags)


# ----------------------------------------------------------------------------- inside the workers


class RankZeroLogger:
    """Inside a Ray Train worker: logs params, per-epoch metrics and figures from rank 0 only."""

    def __init__(self, spec: dict[str, Any] | None, rank: int):
        self.active = spec is not None and rank == 0
        if not self.active:
            return
        self.uri = spec["tracking_uri"]
        self.client = client(self.uri)
        self.run_id = spec["run_id"]

    def start(self, cfg: Config, section: str) -> None:
        """Params: the common config sections and the method's own (``section``, the recipe's),
        not the other methods'; the whole merged config as ``config.yaml``."""
        if not self.active:
            return
        log_params(self.uri, self.run_id, cfg.flat(method=section))
        log_texts(self.uri, self.run_id, {"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                                          "git_sha.txt": git_sha() + "\n"})

    def log_epoch(self, metrics: dict[str, float], epoch: int, artifacts: list[str]) -> None:
        if not self.active:
            return
        log_metrics(self.uri, self.run_id, metrics, step=epoch)
        for path in artifacts:
            self.client.log_artifact(self.run_id, path, artifact_path=f"figures/epoch{epoch:03d}")

    def end(self) -> None:
        pass
