"""Latency of the search service against a bare server: text -> top-10 images over a 100,000-image index.

Builds a synthetic index (random unit vectors; the index is exact inner product, so its cost does
not depend on what the vectors mean) and the model's real text tower (moco_cpu, untrained weights
unless --model names a registered model), and serves them twice on loopback:

- bare: the plain alternative a user would write, the same ``Searcher`` (text tower + faiss index)
  behind one uvicorn + FastAPI process, one query per call, torch and faiss on --bare-threads;
- ours: the real service (``xray_match.serve.app``, Ray Serve) with ServeConfig's defaults, except
  one replica and no alias polling, and any KEY=VALUE given (a ServeConfig field), started as
  ``xray-match serve`` starts it (``serve.app.use_ray_env``; --ray-env NAME=VALUE overrides).

Both are up together. Each is warmed up for --warmup seconds, then measured for --duration seconds
in --slices slices that alternate between the two (bare, ours, ours, bare, ...), so a change in the
machine's load meets both; the idle one waits (Ray's own processes keep running beside the bare
server). The same load drives both: --clients threads, each with one keep-alive connection,
sending the same queries back to back. ``inside p50`` is the server's own time per
request (its ``ms`` field: from the handler to the answer), so ``p50 - inside p50`` is the path
around the work. Also times the two parts alone in this process (text tower, faiss search).

    uv run python benchmarks/serve_latency.py [KEY=VALUE ...] [--images 100000] [--clients 4] [--duration 20]

Last line: ``p50 <ms> ms p99 <ms> ms <qps> qps; p50 vs bare <ratio>`` (ours; the ratio is ours / bare).
Goals on 2 CPU cores with 4 clients: p50 <= 1.5x bare, qps >= 0.8x bare, p99 <= 4x our own p50.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from xray_match.devcluster import free_port

QUERIES = [f"a {c} {d} {w} a {c2} {d2}" for c, d, w, c2, d2 in zip(
    ["red", "blue", "green", "yellow", "white", "orange"] * 4, ["one", "two", "three", "four", "five", "six", "seven", "eight"] * 3,
    ["left of", "above", "right of", "below"] * 6, ["blue", "red", "white", "green"] * 6, ["nine", "zero", "one", "two"] * 6)]


def untrained_checkpoint(out_dir: str, preset: str = "moco_cpu") -> str:
    """A checkpoint folder of ``preset``'s model at its initial weights (no data needed)."""
    import torch

    from xray_match.config import load_config
    from xray_match.registry import RECIPES
    from xray_match.train.recipe import DataInfo

    cfg = load_config(preset, ["tracking.enabled=false"])
    info = DataInfo(root="", dataset="synthetic", counts={})
    model = RECIPES.get(cfg.model.name)(cfg, info).build_model()
    os.makedirs(out_dir, exist_ok=True)
    from xray_match.train.checkpoint import CKPT_FILE, save_checkpoint

    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "info": vars(info), "recipe": cfg.model.name},
                    os.path.join(out_dir, CKPT_FILE))
    return out_dir


def synthetic_index(out: str, n: int, dim: int, seed: int = 0) -> str:
    from xray_match.serve.index_build import write_index

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images = {"key": [f"synthetic-{i:07d}" for i in range(n)], "split": ["synthetic"] * n, "shard": [""] * n,
              "offset": [0] * n, "size": [0] * n, "ext": ["png"] * n}
    m = min(n, 5 * 1000)
    caps = {"text": [f"caption {i}" for i in range(m)], "image": [i // 5 for i in range(m)]}
    return write_index(out, x, images, x[:m], caps, {"model": {"uri": "synthetic"}, "data": ""})


def drive(port: int, clients: int, warmup: float, duration: float, k: int) -> dict[str, Any]:
    """Bounded closed-loop load on loopback -> client latencies (ms, after warm-up), the server's own
    time per request (its ``ms`` field: from the handler to the batch's answer), errors and seconds."""
    start = time.monotonic()
    t_measure, t_end = start + warmup, start + warmup + duration
    lat: list[list[float]] = [[] for _ in range(clients)]
    inside: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(i: int) -> None:
        rnd = random.Random(i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while (now := time.monotonic()) < t_end:
            body = json.dumps({"text": rnd.choice(QUERIES), "k": k})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/search/text", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                payload = r.read()
                ms = 1000 * (time.perf_counter() - t0)
                answer = json.loads(payload)
                ok = r.status == 200 and len(answer["results"]) == k
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if now >= t_measure:
                if ok:
                    lat[i].append(ms)
                    inside[i].append(answer["ms"])
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup + duration + 120)
    return {"lat": [x for xs in lat for x in xs], "inside": [x for xs in inside for x in xs],
            "errors": sum(errors), "seconds": duration}


def bare_server(model: str, index: str, port: int, threads: int, handler: str, tracking_uri: str | None) -> None:
    """The plain alternative: the same Searcher (text tower + faiss index) behind one uvicorn +
    FastAPI process, one query per call, in FastAPI's thread pool (``handler`` thread) or on the
    event loop (loop)."""
    import faiss
    import torch
    import uvicorn
    from fastapi import FastAPI

    from xray_match.serve.search import Searcher
    from xray_match.tracking.models import resolve

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    searcher = Searcher.load(resolve(model, tracking_uri), index)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def search(body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        (hits,) = searcher.text_to_images([body["text"].strip()], int(body.get("k", 10)))
        return {"results": hits, "query": body["text"], "ms": round(1000 * (time.perf_counter() - t0), 2)}

    if handler == "thread":  # `def`: FastAPI runs each request in its thread pool, concurrently
        app.post("/api/search/text")(search)
    else:  # `async def`: each request runs on the event loop, one at a time

        @app.post("/api/search/text")
        async def search_text(body: dict[str, Any]) -> dict[str, Any]:
            return search(body)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the bare server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing healthy on 127.0.0.1:{port} after {timeout:.0f} s")


def parts_alone(model_dir: str, index_dir: str, k: int, threads: int, reps: int = 50) -> dict[str, float]:
    """Per-query milliseconds of the text tower and of the faiss search, in this process, on
    ``threads`` threads (as the bare server and a replica of num_cpus 1 run them)."""
    import faiss
    import torch

    from xray_match.serve.index import SearchIndex
    from xray_match.serve.model import embed_texts, load_embedder
    from xray_match.tracking.models import resolve

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    model = load_embedder(resolve(model_dir))
    index = SearchIndex.load(index_dir)
    embed_texts(model, QUERIES[:2])
    t0 = time.perf_counter()
    qs = [embed_texts(model, [QUERIES[i % len(QUERIES)]]) for i in range(reps)]
    tower = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for q in qs:
        index.search_images(q, k)
    search = (time.perf_counter() - t0) / reps
    return {"text tower": 1000 * tower, "faiss search": 1000 * search}


def setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a :class:`ServeConfig` field, the value typed as the field is."""
    import dataclasses
    import typing

    from xray_match.serve.config import ServeConfig

    key, sep, value = text.partition("=")
    hints = typing.get_type_hints(ServeConfig)
    if not sep or key not in {f.name for f in dataclasses.fields(ServeConfig)}:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a ServeConfig field")
    tp = hints[key]
    if tp is bool:
        from xray_match.cli_serve import parse_bool

        return key, parse_bool(value)
    return key, tp(value) if tp in (int, float) else value


def row(name: str, m: dict[str, Any]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(m["lat"], [50, 90, 99])
    out = {"p50": p50, "p90": p90, "p99": p99, "qps": len(m["lat"]) / m["seconds"],
           "inside": float(np.median(m["inside"])), "n": len(m["lat"]), "errors": m["errors"]}
    print(f"{name:<28}{p50:>9.2f}{p90:>9.2f}{p99:>9.2f}{out['inside']:>11.2f}{out['qps']:>9.1f}{out['n']:>9}{m['errors']:>7}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="*", type=setting, metavar="KEY=VALUE",
                   help="ServeConfig fields for our service (e.g. max_batch_size=8 num_cpus=2)")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per server")
    p.add_argument("--slices", type=int, default=4, help="the measured seconds alternate between the servers in slices")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="a registered model or checkpoint (default: moco_cpu at initial weights)")
    p.add_argument("--tracking-uri")
    p.add_argument("--bare-threads", type=int, default=1, help="torch and faiss threads of the bare server")
    p.add_argument("--bare-handler", choices=["thread", "loop"], default="loop",
                   help="the bare server's handler: a def (FastAPI's thread pool) or an async def (the event loop)")
    p.add_argument("--ray-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of the Ray cluster (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    p.add_argument("--bare-serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_serve:
        bare_server(args.model, args.index, args.bare_serve, args.bare_threads, args.bare_handler, args.tracking_uri)
        return 0
    from xray_match.runtime_env import worker_env, worker_env_vars

    worker_env()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # tearing down: a replica behind HAProxy stays up 30 s for load balancers to let go of it; here nothing does
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    for item in args.ray_env:
        name, _, value = item.partition("=")
        os.environ[name] = value  # before Ray starts: the controller, ingress and replicas inherit it
    import ray
    from ray import serve

    from xray_match.serve.app import APP_NAME, preflight, run, use_ray_env
    from xray_match.serve.config import ServeConfig, build_settings
    from xray_match.serve.model import embed_texts, load_embedder
    from xray_match.tracking.models import resolve

    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        model = args.model or untrained_checkpoint(os.path.join(tmp, "model"))
        dim = embed_texts(load_embedder(resolve(model, args.tracking_uri)), ["a"]).shape[1]
        t0 = time.perf_counter()
        index = synthetic_index(os.path.join(tmp, "index"), args.images, dim)
        print(f"index: {args.images} synthetic vectors of dim {dim}, exact inner product ({time.perf_counter() - t0:.1f} s)")
        parts = parts_alone(model, index, args.k, args.bare_threads)

        settings = {"port": free_port(), "poll_s": 0, "min_replicas": 1, "max_replicas": 1} | dict(args.settings)
        ray_env = use_ray_env(build_settings(ServeConfig, settings, "serve."))  # as `xray-match serve` does
        port = free_port()
        cmd = [sys.executable, os.path.abspath(__file__), "--bare-serve", str(port), "--model", model, "--index", index,
               "--bare-threads", str(args.bare_threads), "--bare-handler", args.bare_handler]
        cmd += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
        bare = subprocess.Popen(cmd, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")})
        try:
            for attempt in range(3):  # on a loaded machine the raylet can miss its start-up deadline: start afresh
                try:
                    ray.init(address="local", num_cpus=2, log_to_driver=False,
                             runtime_env={"env_vars": worker_env_vars()})
                    break
                except Exception as e:  # "The current node timed out during startup"
                    ray.shutdown()
                    if attempt == 2 or "timed out during startup" not in str(e):
                        raise
            t0 = time.perf_counter()
            url = run(*preflight(model, index, args.tracking_uri), settings)
            print(f"service up at {url} in {time.perf_counter() - t0:.1f} s")
            wait_healthy(port, bare)
            ports = {"bare": port, "ours": settings["port"]}
            for name, p in ports.items():  # warm-up, unmeasured
                drive(p, args.clients, 0, args.warmup, args.k)
            # side by side: alternating slices, so a change in the machine's load meets both servers
            for i in range(args.slices):
                for name, p in (ports.items() if i % 2 == 0 else reversed(ports.items())):
                    m = drive(p, args.clients, 0.5, args.duration / args.slices, args.k)
                    for key, value in m.items():
                        measured.setdefault(name, {}).setdefault(key, 0 if key in ("errors", "seconds") else [])
                        measured[name][key] += value
        finally:
            bare.terminate()
            bare.wait(timeout=30)
            try:
                if ray.is_initialized():
                    serve.delete(APP_NAME)
                    serve.shutdown()
            finally:
                ray.shutdown()
    if not measured["ours"]["lat"] or not measured["bare"]["lat"]:
        print(f"no successful requests (errors: bare {measured['bare']['errors']}, ours {measured['ours']['errors']})")
        return 1
    print(f"\n{'part alone, 1 query':<28}{'ms':>9}")
    for name, ms in parts.items():
        print(f"{name:<28}{ms:>9.2f}")
    print(f"\n{args.clients} clients, {args.duration:.0f} s each in {args.slices} alternating slices after {args.warmup:.0f} s "
          f"warm-up, top-{args.k} of {args.images}; "
          f"ours: {' '.join(f'{k}={v}' for k, v in settings.items() if k != 'port')} "
          f"{' '.join(f'{k}={v}' for k, v in ray_env.items())}")
    print(f"{'server':<28}{'p50':>9}{'p90':>9}{'p99':>9}{'inside p50':>11}{'qps':>9}{'requests':>9}{'errors':>7}")
    b = row(f"bare ({args.bare_handler}, {args.bare_threads} thr)", measured["bare"])
    o = row("ours (Ray Serve)", measured["ours"])
    print(f"{'ours / bare':<28}{o['p50'] / b['p50']:>9.2f}{o['p90'] / b['p90']:>9.2f}{o['p99'] / b['p99']:>9.2f}"
          f"{o['inside'] / b['inside']:>11.2f}{o['qps'] / b['qps']:>9.2f}")
    print(f"p50 {o['p50']:.1f} ms p99 {o['p99']:.1f} ms {o['qps']:.1f} qps; p50 vs bare {o['p50'] / b['p50']:.2f}")
    return 0 if o["errors"] == 0 and b["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
