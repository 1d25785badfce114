"""The rank-0 logger keeps training going while the tracking server is away: failed writes wait in
order (figures copied aside), reach the run with their own epochs once a server answers, and are
saved to a file if none does by the end. The server's real outage and restart is
tests/test_cluster.py::test_mlflow_server_restarted_mid_run_loses_no_metrics."""

from __future__ import annotations

import json
import socket

import pytest


@pytest.fixture
def logger_env(monkeypatch):
    # the logger sets MLflow's retry variables for its (worker) process: keep them out of this one
    from xray_match.tracking.runs import RankZeroLogger

    for key in RankZeroLogger.ATTEMPT_ENV:
        monkeypatch.delenv(key, raising=False)


def _dead_uri() -> str:
    with socket.socket() as s:  # a loopback port nothing listens on: every write fails at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_writes_wait_in_order_and_land_with_their_epochs(tmp_path, logger_env):
    from mlflow import MlflowClient

    from xray_match.tracking.runs import RankZeroLogger
    from xray_match.tracking.store import client

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(store).create_run(MlflowClient(store).create_experiment(
        "e", artifact_location=f"file://{tmp_path / 'art'}")).info.run_id
    fig = tmp_path / "map.png"
    fig.write_bytes(b"\x89PNG fake")

    logger = RankZeroLogger({"tracking_uri": _dead_uri(), "run_id": run_id}, rank=0)
    logger.log_epoch({"val/rsum": 1.0}, 1, [str(fig)])
    logger.log_epoch({"val/rsum": 2.0}, 2, [])
    assert [kind for kind, _ in logger.pending] == ["metrics", "artifact", "metrics"]
    fig.unlink()  # the loop deletes its figures at the end of the run: the logger kept a copy

    logger.uri, logger.client = store, client(store)  # a server answers again
    logger.log_epoch({"val/rsum": 3.0}, 3, [])
    assert logger.pending == []
    c = MlflowClient(store)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "val/rsum")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [a.path for a in c.list_artifacts(run_id, "figures/epoch001")] == ["figures/epoch001/map.png"]


def test_unsent_writes_are_saved_to_a_file_when_no_server_comes_back(tmp_path, monkeypatch, logger_env):
    from xray_match.tracking.runs import RankZeroLogger

    monkeypatch.chdir(tmp_path)
    logger = RankZeroLogger({"tracking_uri": _dead_uri(), "run_id": "r1"}, rank=0, flush_timeout_s=0)
    logger.log_epoch({"val/rsum": 1.0, "epoch": 1.0}, 1, [])
    logger.end()
    saved = json.loads((tmp_path / "mlflow-unsent-r1.json").read_text())
    assert saved["run_id"] == "r1" and saved["writes"][0][0] == "metrics"
    assert saved["writes"][0][1][:2] == [{"val/rsum": 1.0, "epoch": 1.0}, 1]


def test_other_ranks_log_nothing(logger_env):
    from xray_match.tracking.runs import RankZeroLogger

    logger = RankZeroLogger({"tracking_uri": _dead_uri(), "run_id": "r1"}, rank=1)
    logger.log_epoch({"val/rsum": 1.0}, 1, [])
    assert logger.pending == [] and not logger.active
