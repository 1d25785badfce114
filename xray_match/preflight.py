"""Checks a job runs before Ray starts or any compute: the things a user typed that can be wrong
(a tracking server that does not answer, a data folder that is not there, an object store that
does not answer or has no such bucket) fail in seconds with one line naming them, instead of
minutes of retries or a traceback from deep inside a worker.

Expected failures of a job (a bad config, a bad path, a server that cannot be reached, a data set
that is not a shard folder) are :data:`EXPECTED`: the job entry points print them as
``error: <message>`` and exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

from xray_match.config import Config
from xray_match.configfile import ConfigError
from xray_match.data.format import MANIFEST, ShardFormatError, join, read_manifest
from xray_match.data.io import S3_SCHEMES, exists, filesystem, local_path, s3_endpoint, scheme
from xray_match.tracking.models import ModelLookupError

TRACKING_TIMEOUT_S = 5.0
#: connect and read timeouts of the object store check; no retries (botocore's and s3fs's would
#: turn a store that is down into a minute of silence)
STORE_TIMEOUT_S = 3.0


class PreflightError(RuntimeError):
    """Something the job needs is not there; the message names it."""


#: errors a job reports as one line and exit status 2
EXPECTED: tuple[type[BaseException], ...] = (ConfigError, PreflightError, ShardFormatError, FileNotFoundError,
                                             ModelLookupError)


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


def store_endpoint() -> str:
    """The S3 endpoint requests go to, as an error message names it."""
    return f"{s3_endpoint()} (AWS_ENDPOINT_URL)" if s3_endpoint() else "AWS S3 (AWS_ENDPOINT_URL is not set)"


def check_store(url: str, what: str, timeout_s: float = STORE_TIMEOUT_S) -> None:
    """The object store of ``url`` must answer within ``timeout_s`` and hold the URL's bucket.
    Local paths, ``file://`` and ``memory://`` pass. ``what`` (``data.path``, ``--out``) starts
    the one-line error, which names the endpoint and the URL."""
    sch = scheme(url)
    if local_path(url) is not None or sch == "memory":
        return
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if sch in S3_SCHEMES:
        _check_s3(url, bucket, what, timeout_s)
        return
    # another store (gs://, ...): its own client, bounded by a thread we stop waiting for
    found: dict[str, object] = {}

    def probe() -> None:
        try:
            fs, _ = filesystem(f"{sch}://{bucket}")
            found["exists"] = fs.exists(bucket)
        except Exception as e:  # noqa: BLE001 - reported below as one line
            found["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise PreflightError(f"{what}: {url}: the {sch}:// store did not answer within {timeout_s:g} s")
    if "error" in found:
        raise PreflightError(f"{what}: {url}: cannot open the {sch}:// store ({first_line(found['error'])})")
    if not found["exists"]:
        raise PreflightError(f"{what}: {url}: bucket {bucket!r} does not exist")


def _check_s3(url: str, bucket: str, what: str, timeout_s: float) -> None:
    import botocore.exceptions

    fs, _ = filesystem(url, skip_instance_cache=True, config_kwargs={
        "connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 1, "mode": "standard"}})
    fs.retries = 1  # s3fs's own retry loop around botocore's
    where = f"the S3 endpoint {store_endpoint()}"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise PreflightError(f"{what}: {url}: bucket {bucket!r} does not exist at {where}") from None
    except PermissionError:
        raise PreflightError(f"{what}: {url}: {where} denies access to bucket {bucket!r} "
                             f"(check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
    except botocore.exceptions.NoCredentialsError:
        raise PreflightError(f"{what}: {url}: no credentials for {where} "
                             f"(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:  # refused, timeouts, DNS
        raise PreflightError(f"{what}: {url}: cannot reach {where} within {timeout_s:g} s ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - it answered, with something else than yes
        raise PreflightError(f"{what}: {url}: {where} answered the check of bucket {bucket!r} with: {first_line(e)}") from None


def check_data(path: str, what: str = "data.path") -> None:
    """``data.path`` (or the source ``what``) must be a folder (local, or on an object store that
    answers) holding a finished manifest."""
    if not path:
        return
    local = local_path(path)
    if local is None:
        check_store(path, what)
    elif not os.path.isdir(local):
        raise PreflightError(f"{what}: {path}: no such folder")
    if not exists(join(path, MANIFEST)):
        raise PreflightError(f"{what}: {path}: no {MANIFEST} (convert the data first: xray-match data --help)")
    read_manifest(path)  # refuses an unfinished or malformed one, naming it


def check_storage(cfg: Config) -> None:
    """A run storage on an object store must answer and hold its bucket (Ray would retry its
    first upload for minutes, after the cluster started and the data was read)."""
    from xray_match.driver.storage import STORAGE_KEY, run_storage

    storage = run_storage(cfg)
    if storage.remote:
        check_store(storage.root, STORAGE_KEY)


def preflight(cfg: Config) -> None:
    """Everything a job checks before Ray starts (the config itself was validated on load)."""
    check_data(cfg.data.path)
    for i, source in enumerate(cfg.data.sources):
        check_data(source.path, f"data.sources[{i}].path")
    check_storage(cfg)
    if cfg.tracking.enabled:
        from xray_match.tracking.store import resolve_tracking_uri

        check_tracking(resolve_tracking_uri(cfg))
