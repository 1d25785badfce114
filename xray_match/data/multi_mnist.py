"""Multi-MNIST for weakly supervised grounding (paper: grounding-mcb-attention, §3 "Data Preparing").

"each image contains randomly 1 to 4 in number of 0-9 handwritten digits ... we randomly increase
the overlapping ratio among the numbers and add Gaussian white noise at the same time."

Splits written into the project's shard format (:mod:`xray_match.data.format`):

* ``train`` (digits from MNIST-train 0..53999), ``val`` (MNIST-train 54000..59999) and ``test``
  (MNIST-test): random layouts. 1-4 digits at native 28x28 scale on a ``canvas`` px square,
  placed uniformly at random; each image draws its own overlap cap uniformly from
  ``[0, max_overlap]`` (IoU between the ink boxes of any two digits), so some images are sparse and
  some heavily overlapped — our reading of "randomly increase the overlapping ratio". Digits are
  composed by pixelwise max, then Gaussian white noise of ``noise_std`` (0..255 units) is added.
* ``test_2x2`` and ``test_3x3`` (MNIST-test): Table 2's grids — 4 or 9 *distinct* digits, one per
  28x28 cell (a 56 or 84 px image), same noise. Distinct digits give one ground-truth box per
  query, and at least one digit (6 for 2x2, 1 for 3x3) is absent from every image, which the
  absent-query measurement uses.

Per sample: a grey PNG, and json with ``captions`` (one per distinct digit present: its word,
"seven"), ``objects`` (``box`` = the ink's bounding box, pixels with value > ``ink`` of the clean
digit, ``[x0, y0, x1, y1]`` exclusive ends; ``label`` word; ``label_id`` 0-9; ``mnist_index``) and
``phrases`` linking each caption to every object of that digit. Training uses only the image and
the query label; boxes are for evaluation. Every sample is a pure function of
``(seed, split, index)``: the data set is deterministic per seed, and resumable.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xray_match.config import MultiMnistConfig
from xray_match.data.mnist import load_mnist
from xray_match.data.format import box_iou
from xray_match.data.io import png_bytes
from xray_match.data.writer import write_splits

DATASET = "multi-mnist"
DIGIT = 28
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: split -> (MNIST part, first index, end index, grid side; 0 = random layout)
SPLITS: dict[str, tuple[str, int, int, int]] = {
    "train": ("train", 0, 54000, 0),
    "val": ("train", 54000, 60000, 0),
    "test": ("test", 0, 10000, 0),
    "test_2x2": ("test", 0, 10000, 2),
    "test_3x3": ("test", 0, 10000, 3),
}
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class MultiMnistSpec:
    # the defaults of what the config sets live there (one home)
    canvas: int = MultiMnistConfig.canvas  # side of random-layout images (grids are 28 * side)
    min_digits: int = 1
    max_digits: int = 4
    max_overlap: float = MultiMnistConfig.max_overlap  # per-image overlap cap drawn from U(0, max_overlap)
    noise_std: float = MultiMnistConfig.noise_std  # Gaussian white noise, 0..255 units
    ink: float = 0.1  # a pixel belongs to a digit's box above this fraction of full intensity
    seed: int = MultiMnistConfig.seed

    def __post_init__(self) -> None:
        if self.canvas < DIGIT:
            raise ValueError(f"multi-MNIST canvas {self.canvas} is smaller than one {DIGIT}px digit")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"multi-MNIST digits per image: need 1 <= min ({self.min_digits}) <= max ({self.max_digits})")
        if not 0 <= self.max_overlap <= 1:
            raise ValueError(f"multi-MNIST max_overlap {self.max_overlap} must lie in [0, 1]")


@functools.lru_cache(maxsize=4)
def _by_label(part: str, lo: int, hi: int) -> list[np.ndarray]:
    _, labels = load_mnist(part)
    return [np.flatnonzero(labels[lo:hi] == k) + lo for k in range(10)]


def _ink_box(digit: np.ndarray, ink: float) -> list[int] | None:
    ys, xs = np.nonzero(digit > ink)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def render(split: str, index: int, spec: MultiMnistSpec) -> dict[str, Any]:
    """One sample in the shard format (``__key__``, ``png``, ``json``)."""
    if split not in SPLITS:
        raise ValueError(f"multi-MNIST split {split!r} is not one of {list(SPLITS)}")
    part, lo, hi, grid = SPLITS[split]
    images, labels = load_mnist(part)
    rng = np.random.default_rng((spec.seed, _SPLIT_CODE[split], index))
    size = DIGIT * grid if grid else spec.canvas
    canvas = np.zeros((size, size), np.float32)
    objects: list[dict[str, Any]] = []

    def place(idx: int, ox: int, oy: int, box: list[int]) -> None:
        patch = canvas[oy : oy + DIGIT, ox : ox + DIGIT]
        np.maximum(patch, images[idx].astype(np.float32), out=patch)
        objects.append({"box": [float(ox + box[0]), float(oy + box[1]), float(ox + box[2]), float(oy + box[3])],
                        "label": DIGIT_WORDS[int(labels[idx])], "label_id": int(labels[idx]), "mnist_index": idx})

    if grid:
        pool = _by_label(part, lo, hi)
        digits = rng.choice(10, size=grid * grid, replace=False)  # distinct digits, one per cell
        for cell, k in enumerate(digits):
            idx = int(rng.choice(pool[int(k)]))
            box = _ink_box(images[idx] / 255.0, spec.ink)
            if box is not None:
                place(idx, DIGIT * (cell % grid), DIGIT * (cell // grid), box)
    else:
        n = int(rng.integers(spec.min_digits, spec.max_digits + 1))
        cap = float(rng.uniform(0.0, spec.max_overlap))
        for _ in range(n):
            idx = int(rng.integers(lo, hi))
            box = _ink_box(images[idx] / 255.0, spec.ink)
            if box is None:
                continue
            for _attempt in range(100):
                ox, oy = (int(v) for v in rng.integers(0, size - DIGIT + 1, size=2))
                cand = [ox + box[0], oy + box[1], ox + box[2], oy + box[3]]
                if all(box_iou(cand, o["box"]) <= cap for o in objects):
                    place(idx, ox, oy, box)
                    break
    canvas += rng.normal(0.0, spec.noise_std, canvas.shape).astype(np.float32)
    img = np.clip(canvas, 0, 255).round().astype(np.uint8)
    words: list[str] = []
    for o in objects:
        if o["label"] not in words:
            words.append(o["label"])
    phrases = [[{"text": w, "start": 0, "end": len(w), "object": i} for i, o in enumerate(objects) if o["label"] == w]
               for w in words]
    key = f"{split}-{index:07d}"
    meta = {"image_id": key, "split": split, "width": size, "height": size, "captions": words or ["no digit"],
            "objects": objects, "phrases": phrases if words else [[]], "source": f"mnist-{part}", "layout":
            f"grid{grid}x{grid}" if grid else "random"}
    return {"__key__": key, "png": png_bytes(img), "json": meta}


def build_multi_mnist(
    out: str,
    train: int = MultiMnistConfig.train,
    val: int = MultiMnistConfig.val,
    test: int = MultiMnistConfig.test,
    grid_test: int = MultiMnistConfig.grid_test,
    spec: MultiMnistSpec | None = None,
    maxcount: int = 500,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Write train / val / test / test_2x2 / test_3x3 to ``out`` (resumable: complete shards are
    kept; a split whose size changed is rewritten). The paper's 500k images: ``train=500000``."""
    spec = spec or MultiMnistSpec()
    workers = workers or min(2, os.cpu_count() or 1)
    info = {"generator": "xray_match.data.multi_mnist", "spec": asdict(spec)}
    sizes = {"train": train, "val": val, "test": test, "test_2x2": grid_test, "test_3x3": grid_test}
    make = functools.partial(render, spec=spec)  # picklable for the process pool
    write_splits(out, DATASET, sizes, make, maxcount=maxcount, workers=workers, info=info, progress=progress)
    return out


__all__ = ["DATASET", "DIGIT_WORDS", "SPLITS", "MultiMnistSpec", "render", "build_multi_mnist"]
