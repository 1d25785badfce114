"""Checks a job runs before Ray starts or any compute: the things a user typed that can be wrong
(a tracking server that does not answer, a data folder that is not there) fail in seconds with one
line naming them, instead of minutes of retries or a traceback from deep inside a worker.

Expected failures of a job (a bad config, a bad path, a server that cannot be reached, a data set
that is not a shard folder) are :data:`EXPECTED`: the job entry points print them as
``error: <message>`` and exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from xray_match.config import Config, ConfigError
from xray_match.data.format import MANIFEST, ShardFormatError, read_manifest

TRACKING_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """Something the job needs is not there; the message names it."""


#: errors a job reports as one line and exit status 2
EXPECTED: tuple[type[BaseException], ...] = (ConfigError, PreflightError, ShardFormatError, FileNotFoundError)


def first_line(e: BaseException) -> str:
    """An expected failure as the one line a job or the CLI prints after ``error: ``."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check_tracking(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer within ``timeout_s`` (MLflow itself retries for
    minutes); a sqlite or file store's folder must exist or be creatable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                r.read(1)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # it answers; credentials are MLflow's business
                return
            raise PreflightError(f"tracking.tracking_uri: {uri} answered HTTP {e.code} (is it an MLflow server?)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PreflightError(f"tracking.tracking_uri: cannot reach {uri} within {timeout_s:g} s ({reason})") from None
        return
    path = ""
    if uri.startswith("sqlite:///"):
        path = os.path.dirname(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file://"):
        path = uri[len("file://") :]
    elif "://" not in uri and uri:
        path = uri
    if path:
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip("/"))
        if parent and not os.access(parent, os.W_OK):
            raise PreflightError(f"tracking.tracking_uri: {uri}: {parent} is not writable")


def check_data(path: str) -> None:
    """A local ``data.path`` must be a folder holding a finished manifest. Remote URLs are read
    by the driver before any worker starts (:func:`~xray_match.train.prepare.prepare_info`)."""
    if not path or "://" in path:
        return
    if not os.path.isdir(path):
        raise PreflightError(f"data.path: {path}: no such folder")
    if not os.path.exists(os.path.join(path, MANIFEST)):
        raise PreflightError(f"data.path: {path}: no {MANIFEST} (convert the data first: xray-match data --help)")
    read_manifest(path)  # refuses an unfinished or malformed one, naming it


def preflight(cfg: Config) -> None:
    """Everything a job checks before Ray starts (the config itself was validated on load)."""
    check_data(cfg.data.path)
    if cfg.tracking.enabled:
        from xray_match.tracking.store import resolve_tracking_uri

        check_tracking(resolve_tracking_uri(cfg))
