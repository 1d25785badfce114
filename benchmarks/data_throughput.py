"""Samples/s of the xray_match reader vs a bare webdataset loop over the same shards, same decode.

Both decode every sample the same way (PIL image -> float tensor, json parse); ours adds shard
ownership by rank/worker, metadata validation and error naming. Goal: ratio >= 0.95.

    uv run python benchmarks/data_throughput.py [--samples 4000] [--workers 0 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from xray_match.data.digit_scenes import build_digit_scenes
from xray_match.data.reader import ShardStream, shard_urls
from xray_match.data.transforms import image_to_tensor

TO_TENSOR = image_to_tensor(64)


class OursTransform:
    parts = frozenset()  # like the bare loop: image + json only

    def __call__(self, sample):
        return {"image": TO_TENSOR(sample["image"]), "n": len(sample["meta"]["captions"])}


def bare_decode(raw):
    img = Image.open(io.BytesIO(raw["png"]))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    meta = json.loads(raw["json"])
    return {"image": TO_TENSOR(img), "n": len(meta["captions"])}


def run(loader) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["n"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="")
    args = ap.parse_args()
    root = args.data or os.path.join(tempfile.gettempdir(), f"xray-bench-scenes-{args.samples}")
    build_digit_scenes(root, train=args.samples, val=0, test=0, maxcount=250, progress=False)
    urls = shard_urls(root, "train")
    print(f"{len(urls)} shards, {args.samples} samples, 64 px; best of {args.repeats}")
    print(f"{'workers':>8} {'webdataset/s':>14} {'xray_match/s':>14} {'ratio':>7}")
    ratios = []
    for w in args.workers:
        best_bare = best_ours = 0.0
        for _ in range(args.repeats):
            bare = wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker,
                                  nodesplitter=None, empty_check=False).map(bare_decode)
            n, dt = run(DataLoader(bare, batch_size=64, num_workers=w, collate_fn=torch.utils.data.default_collate))
            assert n == args.samples, n
            best_bare = max(best_bare, n / dt)
            ours = ShardStream(urls, OursTransform(), train=False)
            n, dt = run(DataLoader(ours, batch_size=64, num_workers=w, collate_fn=torch.utils.data.default_collate))
            assert n == args.samples, n
            best_ours = max(best_ours, n / dt)
        ratios.append(best_ours / best_bare)
        print(f"{w:>8} {best_bare:>14.0f} {best_ours:>14.0f} {ratios[-1]:>7.3f}")
    print(f"xray_match/webdataset throughput ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
