"""MLflow runs: a driver-side session (experiment, parent / child runs, params, metrics,
registering a version), trial runs started inside Ray Tune trials, metrics and tables logged onto an
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
from xray_match.tracking.store import client, local_artifact_root, resolve_tracking_uri

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


def log_metrics(uri: str, run_id: str | None, metrics: dict[str, float], step: int = 0,
                timestamp_ms: int | None = None) -> None:
    """Metrics onto an existing run (the job's run, a study's parent, the best trial's run)."""
    if not run_id:
        return
    from mlflow.entities import Metric

    now = timestamp_ms or int(time.time() * 1000)
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

    def log_texts(self, run_id: str | None, files: dict[str, str], artifact_path: str | None = None) -> None:
        if self.enabled:
            log_texts(self.uri, run_id, files, artifact_path)

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

    def register(self, folder: str, run_id: str, name: str, tags: dict[str, str]) -> int:
        """Log the checkpoint ``folder`` (local) as a model of ``run_id``, register it as a new
        version of ``name`` with alias ``champion`` and ``tags``; returns the version. What a version
        is tagged with is :meth:`xray_match.driver.context.RunContext.register`'s to say."""
        from xray_match.tracking.registry import log_and_register

        return log_and_register(self.uri, run_id, folder, name, tags)


# ----------------------------------------------------------------------------- inside the workers


class RankZeroLogger:
    """Inside a Ray Train worker: logs params, per-epoch metrics and figures from rank 0 only.

    Training does not stop for the tracking server. A write that fails (the server restarting, the
    network gone) is kept, in order, and sent with the next one; metrics carry their own step and
    timestamp, so late ones land where they belong. Figures are copied aside while they wait (the
    loop deletes its copies at the end of the run). :meth:`end` waits up to
    ``tracking.flush_timeout_s`` for the server, then writes what is still unsent to
    ``mlflow-unsent-<run_id>.json`` in the worker's folder and says so. Each attempt is short
    (:data:`ATTEMPT_ENV`): MLflow's own retries would otherwise hold a step for minutes.
    """

    #: MLflow's HTTP retry settings for the workers' writes: one quick try each, the buffer retries
    ATTEMPT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

    def __init__(self, spec: dict[str, Any] | None, rank: int, flush_timeout_s: float = 600.0):
        self.active = spec is not None and rank == 0
        self.pending: list[tuple[str, tuple[Any, ...]]] = []
        self.flush_timeout_s = flush_timeout_s
        self._spool: str | None = None
        if not self.active:
            return
        for k, v in self.ATTEMPT_ENV.items():
            os.environ.setdefault(k, v)
        self.uri = spec["tracking_uri"]
        self.client = client(self.uri)
        self.run_id = spec["run_id"]

    def start(self, cfg: Config, section: str) -> None:
        """Params: the common config sections and the method's own (``section``, the recipe's),
        not the other methods'; the whole merged config as ``config.yaml``."""
        if not self.active:
            return
        self._send("params", (cfg.flat(method=section),))
        self._send("texts", ({"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                              "git_sha.txt": git_sha() + "\n"},))

    def log_epoch(self, metrics: dict[str, float], epoch: int, artifacts: list[str]) -> None:
        if not self.active:
            return
        self._send("metrics", (metrics, epoch, int(time.time() * 1000)))
        for path in artifacts:
            self._send("artifact", (path, f"figures/epoch{epoch:03d}"))

    def end(self) -> None:
        if self.active and not self.pending and self._spool is not None:
            import shutil

            shutil.rmtree(self._spool, ignore_errors=True)
        if not (self.active and self.pending):
            return
        deadline = time.monotonic() + self.flush_timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            self._flush()
        if self.pending:
            import json

            path = os.path.abspath(f"mlflow-unsent-{self.run_id}.json")
            with open(path, "w") as fh:
                json.dump({"tracking_uri": self.uri, "run_id": self.run_id,
                           "writes": [[kind, list(args)] for kind, args in self.pending]}, fh, default=str)
            print(f"[xray_match] warning: {self.uri} did not answer for {self.flush_timeout_s:g} s; "
                  f"{len(self.pending)} unsent MLflow write(s) of run {self.run_id} saved to {path}", flush=True)

    # -------------------------------------------------------------------- the buffer

    def _send(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "artifact":  # a copy of its own: the loop deletes its figures when the run ends
            args = (self._keep(args[0]), args[1])
        self.pending.append((kind, args))
        self._flush()

    def _flush(self) -> bool:
        """Send what waits, oldest first; False (and the rest kept) at the first failure."""
        while self.pending:
            kind, args = self.pending[0]
            try:
                self._write(kind, args)
            except Exception as e:  # noqa: BLE001 - any failure to reach the server: keep and retry later
                if not getattr(self, "_warned", False):
                    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    print(f"[xray_match] MLflow at {self.uri} unreachable ({first}); buffering, training goes on",
                          flush=True)
                    self._warned = True
                return False
            self.pending.pop(0)
        if getattr(self, "_warned", False):
            print(f"[xray_match] MLflow at {self.uri} answers again; buffered writes sent", flush=True)
            self._warned = False
        return True

    def _write(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "params":
            log_params(self.uri, self.run_id, *args)
        elif kind == "texts":
            log_texts(self.uri, self.run_id, *args)
        elif kind == "metrics":
            metrics, step, ts = args
            log_metrics(self.uri, self.run_id, metrics, step=step, timestamp_ms=ts)
        elif kind == "artifact":
            import shutil

            self.client.log_artifact(self.run_id, args[0], artifact_path=args[1])
            shutil.rmtree(os.path.dirname(args[0]), ignore_errors=True)

    def _keep(self, path: str) -> str:
        import shutil

        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="xray-mlflow-spool-")
        folder = tempfile.mkdtemp(dir=self._spool)  # the file keeps its name: MLflow names the artifact by it
        return shutil.copy(path, folder)
