"""CPU per training sample at 224 px: a COCO-sized JPEG as converted byte for byte, against the same
photo converted with ``--max-side 256`` (``data.convert.images.load_image``, JPEG quality 90).

The photos are the two 640 x 427 ones scikit-learn ships (``china.jpg``, ``flower.jpg``; COCO's are
about 640 x 480). Each sample goes the reader's way in one thread, as in a DataLoader worker:
``decode_sample``, then the moco transform at 224 px (resize, normalize, one caption tokenized; the
preset's own tokenizer family, the shipped MiniLM, since DistilBERT's is not available offline)
inside the reader's per-sample seeding (``reader._seeded``). Prints ms per sample and bytes per
image, the ratio last (original / max-side 256).

    uv run python benchmarks/decode_cost.py [--n 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import sklearn.datasets
import torch

from xray_match.config import load_config
from xray_match.data.convert.images import load_image
from xray_match.data.reader import _seeded, decode_sample
from xray_match.recipes.moco import MocoTransform

CAPTIONS = ["a pagoda among trees under a pale sky", "a flower in close up", "an old building", "a red roof", "a garden"]


def raw_sample(data: bytes, ext: str, i: int) -> dict:
    meta = {"image_id": i, "split": "train", "captions": CAPTIONS}
    return {"__key__": f"train-{i:07d}", "__url__": "mem", ext: data, "json": json.dumps(meta).encode()}


def ms_per_sample(samples: list[dict], transform: MocoTransform, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        with _seeded(i):
            transform(decode_sample(samples[i % len(samples)], transform.parts))
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    paths = [os.path.join(folder, n) for n in ("china.jpg", "flower.jpg")]
    transform = MocoTransform(load_config("moco_gpu", {"moco.text_model": ""}), train=True)
    transform.tokenizer  # loaded once, as each worker does before its first sample
    ways = {"original": [load_image(p) for p in paths], "max-side 256": [load_image(p, max_side=256) for p in paths]}
    samples = {w: [raw_sample(b.data, b.ext, i) for i, b in enumerate(blobs)] for w, blobs in ways.items()}
    for w in samples:
        ms_per_sample(samples[w], transform, 20)  # warm-up
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(args.repeats):
        for w in ways:
            times[w].append(ms_per_sample(samples[w], transform, args.n))
    print(f"{'shard image':>14} {'size':>9} {'kB':>6} {'ms a sample':>12}   (one thread, median of {args.repeats} x {args.n})")
    med = {}
    for w, blobs in ways.items():
        med[w] = statistics.median(times[w])
        kb = statistics.mean(len(b.data) for b in blobs) / 1e3
        print(f"{w:>14} {f'{blobs[0].width}x{blobs[0].height}':>9} {kb:>6.0f} {med[w]:>12.2f}")
    print(f"original/max-side-256 cost {med['original'] / med['max-side 256']:.2f}")


if __name__ == "__main__":
    main()
