"""Samples/s of the xray_match reader vs MosaicML Streaming over the same samples, same decode, same workers.

The embedded digit-scenes train split (as ``benchmarks/data_throughput.py`` builds it) is read two
ways in one run: our :class:`~xray_match.data.reader.ShardStream` over its tar shards, and
``streaming.StreamingDataset`` over an MDS copy that this script writes with ``streaming.MDSWriter``
into a temporary folder (the same bytes per sample: png, json, key; about as many samples per MDS
shard as per tar shard). Both decode each sample with :func:`~xray_match.data.reader.decode_sample`
(image, json and its checks) and the same transform, and both run in a DataLoader with the same
batch size and worker count. Then mixing: the split as two sources (its shards in two halves, 0.5 /
0.5) against the split read as one, both as training streams (shuffled, endless), ours and
Streaming's (``Stream(proportion=0.5)``). Goal: ours/streaming >= 1.0. Needs the bench group:

    uv sync --group bench
    uv run --group bench python benchmarks/streaming_compare.py [--samples 4000] [--workers 0 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Callable, Iterable

import torch
from streaming import MDSWriter, Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from xray_match.data.digit_scenes import build_digit_scenes
from xray_match.data.format import read_manifest
from xray_match.data.reader import ShardStream, decode_sample, iter_raw, shard_urls
from xray_match.data.transforms import image_to_tensor

TO_TENSOR = image_to_tensor(64)
BATCH = 64
COLUMNS = {"key": "str", "png": "bytes", "json": "bytes"}


class Transform:
    """The decoded sample's image as a float tensor and its caption count (what both sides return)."""

    parts = frozenset()  # image + json only, as the MDS copy holds

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": TO_TENSOR(sample["image"]), "n": len(sample["meta"]["captions"])}


class DecodedMDS(StreamingDataset):
    """Streaming's dataset with our decode and transform applied to each MDS sample."""

    transform = Transform()

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        s = super().get_item(sample_id, retry)
        raw = {"__key__": s["key"], "__url__": "mds", "png": s["png"], "json": s["json"]}
        return self.transform(decode_sample(raw, self.transform.parts))


def write_mds(urls: list[str], out: str, size_limit: int) -> int:
    """The samples of ``urls`` as an MDS folder ``out``; returns their count."""
    n = 0
    with MDSWriter(out=out, columns=COLUMNS, size_limit=size_limit) as w:
        for url in urls:
            for raw in iter_raw(url):
                w.write({"key": raw["__key__"], "png": raw["png"], "json": raw["json"]})
                n += 1
    return n


def rate(loader: Iterable[dict[str, Any]], limit: int = 0) -> tuple[int, float]:
    """(samples, seconds) of one pass over ``loader``, or of its first ``limit`` samples."""
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["n"])
        if limit and n >= limit:
            break
    return n, time.perf_counter() - t0


def race(runs: dict[str, tuple[Callable[[], Iterable[dict[str, Any]]], int]], repeats: int) -> dict[str, float]:
    """The best samples/s of each ``name: (make a loader, samples to read)`` over ``repeats``
    rounds, each round running every loader once in turn (on a shared machine the load then falls
    on all of them alike)."""
    out = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, (make, samples) in runs.items():
            n, dt = rate(make(), samples)
            assert n >= samples, (name, n, samples)
            out[name] = max(out[name], n / dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffle-buffer", type=int, default=500, help="training streams (mixing): data.shuffle_buffer")
    ap.add_argument("--data", default="")
    args = ap.parse_args()
    root = args.data or os.path.join(tempfile.gettempdir(), f"xray-bench-scenes-{args.samples}")
    build_digit_scenes(root, train=args.samples, val=0, test=0, maxcount=250, progress=False)
    urls = shard_urls(root, "train")
    halves = {"a": urls[: len(urls) // 2], "b": urls[len(urls) // 2 :]}
    shard_bytes = max(s.bytes for s in read_manifest(root).shards("train"))
    clean_stale_shared_memory()
    with tempfile.TemporaryDirectory(prefix="xray-bench-mds-") as mds:
        t0 = time.perf_counter()
        assert write_mds(urls, os.path.join(mds, "all"), shard_bytes) == args.samples
        for name, part in halves.items():
            write_mds(part, os.path.join(mds, name), shard_bytes)
        print(f"{len(urls)} tar shards, {args.samples} samples, 64 px; MDS copy written in {time.perf_counter() - t0:.1f} s; "
              f"mosaicml-streaming; batch {BATCH}; best of {args.repeats}")
        print(f"{'workers':>8} {'streaming/s':>12} {'ours/s':>8} {'ratio':>7} {'ours mix/s':>11} {'ours one/s':>11} "
              f"{'mix/one':>8} {'str. mix/s':>11} {'str. one/s':>11} {'mix/one':>8}")
        ratios = []
        for w in args.workers:
            def loader(ds: Any) -> DataLoader:
                return DataLoader(ds, batch_size=BATCH, num_workers=w, collate_fn=torch.utils.data.default_collate)

            def streaming(**kw: Any) -> DataLoader:
                return loader(DecodedMDS(batch_size=BATCH, **kw))

            n, buf = args.samples, args.shuffle_buffer
            r = race({
                # one pass over the split, in order
                "streaming": (lambda: streaming(local=os.path.join(mds, "all")), n),
                "ours": (lambda: loader(ShardStream(urls, Transform(), train=False)), n),
                # mixing: training streams (shuffled; endless for ours), their first n samples
                "mix": (lambda: loader(ShardStream(halves, Transform(), train=True, shuffle_buffer=buf,
                                                   weights=[0.5, 0.5])), n),
                "one": (lambda: loader(ShardStream(urls, Transform(), train=True, shuffle_buffer=buf)), n),
                "s_mix": (lambda: streaming(streams=[Stream(local=os.path.join(mds, k), proportion=0.5) for k in halves],
                                            shuffle=True, epoch_size=n), n),
                "s_one": (lambda: streaming(local=os.path.join(mds, "all"), shuffle=True), n),
            }, args.repeats)
            ratios.append(r["ours"] / r["streaming"])
            print(f"{w:>8} {r['streaming']:>12.0f} {r['ours']:>8.0f} {ratios[-1]:>7.3f} {r['mix']:>11.0f} {r['one']:>11.0f} "
                  f"{r['mix'] / r['one']:>8.3f} {r['s_mix']:>11.0f} {r['s_one']:>11.0f} {r['s_mix'] / r['s_one']:>8.3f}")
    print(f"ours/streaming {min(ratios):.3f}")


if __name__ == "__main__":
    main()
