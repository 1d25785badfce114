"""Where MLflow lives and what things are called there: the tracking URI, the artifact folder of a
local store, the one place an ``MlflowClient`` is made, and the registered model's name.

Every MLflow write goes through :mod:`xray_match.tracking` (``runs`` for runs, ``registry`` for
model versions), and every model reference is read through ``models`` (parse, resolve, pin, load);
all build on this module, which imports none of them.
"""

from __future__ import annotations

import os
from typing import Any

from xray_match.config import Config, xray_home

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CHAMPION = "champion"


def resolve_tracking_uri(cfg: Config | None = None, uri: str | None = None) -> str:
    """The package's one rule for the tracking URI: ``uri`` (given by a caller, e.g. ``--tracking-uri``),
    else ``tracking.tracking_uri`` of ``cfg`` (default: :class:`Config`'s), else ``$MLFLOW_TRACKING_URI``,
    else a sqlite store under ``$XRAY_MATCH_HOME``."""
    uri = uri or (cfg or Config()).tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
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


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (the package makes none anywhere else)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def registered_model_name(cfg: Config) -> str:
    """``tracking.registered_model_name``, or ``xray-match-<model.name>``."""
    return cfg.tracking.registered_model_name or f"xray-match-{cfg.model.name}"
