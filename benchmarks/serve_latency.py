"""Latency of the search service: text -> top-10 images over a 100,000-image index.

Starts the real service (Ray Serve, `xray_match.serve.app`) on loopback with a synthetic index
(random unit vectors; the index is exact inner product, so its cost does not depend on what the
vectors mean) and the model's real text tower (moco_cpu, untrained weights unless --model names
a registered model), then drives it with a bounded load: --clients threads, each with one
keep-alive connection, sending queries back to back for --duration seconds after --warmup
seconds. Also times the two parts alone in this process (text tower per query, faiss search per
query) for context.

    uv run python benchmarks/serve_latency.py [--images 100000] [--clients 4] [--duration 20]

Last line: ``p50 <ms> ms p99 <ms> ms <qps> qps``. Goal on 2 CPU cores: p50 <= 50 ms, p99 <= 200 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time

import numpy as np

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(port: int, clients: int, warmup: float, duration: float, k: int) -> tuple[list[float], int, float]:
    """Bounded closed-loop load on loopback -> (latencies in ms after warm-up, errors, measured seconds)."""
    start = time.monotonic()
    t_measure, t_end = start + warmup, start + warmup + duration
    lat: list[list[float]] = [[] for _ in range(clients)]
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
                ok = r.status == 200 and len(json.loads(payload)["results"]) == k
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            ms = 1000 * (time.perf_counter() - t0)
            if now >= t_measure:
                if ok:
                    lat[i].append(ms)
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup + duration + 120)
    return [x for xs in lat for x in xs], sum(errors), duration


def parts_alone(model_dir: str, index_dir: str, k: int, reps: int = 50) -> dict[str, float]:
    """Per-query milliseconds of the text tower and of the faiss search, in this process."""
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.model import embed_texts, load_embedder
    from xray_match.tracking.models import resolve

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="a registered model or checkpoint (default: moco_cpu at initial weights)")
    p.add_argument("--tracking-uri")
    p.add_argument("--max-batch-size", type=int, default=None, help="ServeConfig.max_batch_size")
    p.add_argument("--batch-wait-timeout-s", type=float, default=None, help="ServeConfig.batch_wait_timeout_s")
    args = p.parse_args(argv)
    from xray_match.runtime_env import worker_env, worker_env_vars

    worker_env()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from xray_match.serve.app import APP_NAME, preflight, run
    from xray_match.serve.model import embed_texts, load_embedder
    from xray_match.tracking.models import resolve

    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        model = args.model or untrained_checkpoint(os.path.join(tmp, "model"))
        dim = embed_texts(load_embedder(resolve(model, args.tracking_uri)), ["a"]).shape[1]
        t0 = time.perf_counter()
        index = synthetic_index(os.path.join(tmp, "index"), args.images, dim)
        print(f"index: {args.images} synthetic vectors of dim {dim}, exact inner product ({time.perf_counter() - t0:.1f} s)")
        parts = parts_alone(model, index, args.k)
        port = free_port()
        settings = {"port": port, "poll_s": 0, "min_replicas": 1, "max_replicas": 1, "num_cpus": 1,
                    "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
        ray.init(address="local", num_cpus=2, log_to_driver=False, runtime_env={"env_vars": worker_env_vars()})
        try:
            t0 = time.perf_counter()
            run(*preflight(model, index, args.tracking_uri), {k: v for k, v in settings.items() if v is not None})
            print(f"service up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f} s")
            lat, errors, seconds = drive(port, args.clients, args.warmup, args.duration, args.k)
        finally:
            try:
                serve.delete(APP_NAME)
                serve.shutdown()
            finally:
                ray.shutdown()
    if not lat:
        print(f"no successful requests ({errors} errors)")
        return 1
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    qps = len(lat) / seconds
    print(f"\n{'what':<28}{'ms':>10}")
    for name, ms in parts.items():
        print(f"{name + ' (alone, 1 query)':<28}{ms:>10.2f}")
    print(f"{'HTTP p50':<28}{p50:>10.2f}\n{'HTTP p90':<28}{p90:>10.2f}\n{'HTTP p99':<28}{p99:>10.2f}")
    print(f"{len(lat)} requests, {errors} errors, {args.clients} clients, {seconds:.0f} s, top-{args.k} of {args.images}")
    print(f"p50 {p50:.1f} ms p99 {p99:.1f} ms {qps:.1f} qps")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
