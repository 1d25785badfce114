"""Digit scenes: a captioned, grounded, gaze-annotated data set built from real MNIST digits.

It stands in for COCO + SALICON on machines that cannot reach them. Each image holds 1-4
recoloured, rescaled handwritten digits placed with bounded overlap, plus Gaussian noise. Each
image gets five captions from templates that mention digits, colours, counts and spatial
relations ("a red seven left of a blue two"), with phrase->box links, per-digit boxes and labels,
and a synthetic gaze map (Gaussian blobs on the digits) in place of a SALICON saliency map.

Train and val draw digits from disjoint parts of MNIST-train (0..53999 / 54000..59999), test
from MNIST-test. Every sample is a pure function of (seed, split, index).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from xray_match.config import DigitScenesConfig
from xray_match.data.mnist import load_mnist
from xray_match.data.format import box_iou
from xray_match.data.io import png_bytes
from xray_match.data.writer import write_splits

DATASET = "digit-scenes"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 245),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 60, 220),
    "white": (240, 240, 240),
    "orange": (250, 140, 20),
}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_SOURCES = {"train": ("train", 0, 54000), "val": ("train", 54000, 60000), "test": ("test", 0, 10000)}


@dataclass(frozen=True)
class SceneSpec:
    size: int = DigitScenesConfig.size  # the defaults of what the config sets live there (one home)
    min_digits: int = 1
    max_digits: int = 4
    digit_scale: tuple[float, float] = (0.32, 0.5)  # digit side as a fraction of the image side
    max_overlap: float = 0.2  # max IoU between two digits' boxes (rejection sampling)
    noise_std: float = 10.0  # Gaussian noise, in 0..255 units
    seed: int = DigitScenesConfig.seed


# ----------------------------------------------------------------------------- geometry


def relation(a: list[float], b: list[float]) -> str:
    """Where box ``a`` lies relative to box ``b``: 'left of', 'right of', 'above' or 'below'."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def gaze_map(boxes: list[list[float]], size: int) -> np.ndarray:
    """Synthetic saliency: one isotropic Gaussian per digit, sigma = 0.3 x its box side, max 255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.zeros((size, size), np.float32)
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        sigma = 0.3 * max(x1 - x0, y1 - y0)
        out = np.maximum(out, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)))
    return (out * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- captions


class _Caption:
    """Builds a caption while recording the character span of each digit phrase."""

    def __init__(self) -> None:
        self.text = ""
        self.links: list[dict[str, Any]] = []

    def add(self, s: str) -> "_Caption":
        self.text += s
        return self

    def phrase(self, obj: int, objects: list[dict[str, Any]], article: bool = True, colour: bool = True) -> "_Caption":
        obj = int(obj)
        words = ([objects[obj]["colour"]] if colour else []) + [objects[obj]["label"]]
        body = " ".join(words)
        if article:
            body = ("an " if words[0] in ("eight", "orange") else "a ") + body
        start = len(self.text)
        self.text += body
        self.links.append({"text": body, "start": start, "end": len(self.text), "object": obj})
        return self


def _listing(cap: _Caption, order: list[int], objects: list[dict[str, Any]], **kw: Any) -> None:
    for n, i in enumerate(order):
        if n:
            cap.add(" and " if n == len(order) - 1 else ", ")
        cap.phrase(i, objects, **kw)


def make_captions(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[list[str], list[list[dict]]]:
    """Five captions with phrase links; templates vary in count, colour, order and relation."""
    n = len(objects)
    boxes = [o["box"] for o in objects]
    left_to_right = sorted(range(n), key=lambda i: boxes[i][0] + boxes[i][2])
    caps: list[_Caption] = []

    def pair() -> tuple[int, int]:
        a, b = rng.choice(n, size=2, replace=False)
        return int(a), int(b)

    # 1. a relation between two digits (or the lone digit on its background)
    c = _Caption()
    if n == 1:
        c.phrase(0, objects).add(rng.choice([" on a dark background", " alone in the picture", " in the image"]))
    else:
        a, b = pair()
        c.phrase(a, objects).add(f" {relation(boxes[a], boxes[b])} ").phrase(b, objects)
    caps.append(c)
    # 2. the count, then every digit
    c = _Caption()
    c.add(f"{COUNT_WORDS[n]} digit{'s' if n > 1 else ''}: ")
    _listing(c, list(rng.permutation(n)), objects)
    caps.append(c)
    # 3. 'there is' + a relation, or the digit's position in the frame
    c = _Caption()
    if n == 1:
        x = (boxes[0][0] + boxes[0][2]) / 2 / objects[0]["image_size"]
        where = "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"
        c.add("there is ").phrase(0, objects).add(f" {where}")
    else:
        a, b = pair()
        c.add("there is ").phrase(a, objects).add(f" {relation(boxes[a], boxes[b])} ").phrase(b, objects)
    caps.append(c)
    # 4. left-to-right order
    c = _Caption()
    if n == 1:
        c.add("a single ").phrase(0, objects, article=False)
    else:
        c.add("from left to right: ")
        _listing(c, left_to_right, objects)
    caps.append(c)
    # 5. digits without colours, with the count
    c = _Caption()
    c.add(rng.choice(["handwritten ", "noisy picture of ", "an image of "]))
    if n > 1:
        c.add(f"{COUNT_WORDS[n]} digits, ")
    _listing(c, list(rng.permutation(n)), objects, colour=False)
    caps.append(c)
    return [c.text for c in caps], [c.links for c in caps]


# ----------------------------------------------------------------------------- scenes


def render_scene(split: str, index: int, spec: SceneSpec) -> dict[str, Any]:
    """One sample in the shard format: image, saliency map, json with captions/boxes/links."""
    part, lo, hi = _SOURCES[split]
    images, labels = load_mnist(part)
    rng = np.random.default_rng((spec.seed, SPLIT_CODE[split], index))
    size = spec.size
    n = int(rng.integers(spec.min_digits, spec.max_digits + 1))
    canvas = np.zeros((size, size, 3), np.float32)
    objects: list[dict[str, Any]] = []
    placed: list[list[float]] = []
    colour_names = list(COLOURS)
    for _ in range(n):
        idx = int(rng.integers(lo, hi))
        side = max(8, int(round(size * rng.uniform(*spec.digit_scale))))
        digit = np.asarray(Image.fromarray(images[idx]).resize((side, side), Image.BILINEAR), np.float32) / 255.0
        ys, xs = np.nonzero(digit > 0.1)
        if len(xs) == 0:
            continue
        tight = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        for attempt in range(100):
            ox, oy = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = [float(ox + tight[0]), float(oy + tight[1]), float(ox + tight[2]), float(oy + tight[3])]
            if all(box_iou(box, p) <= spec.max_overlap for p in placed):
                break
        else:
            continue  # no room left: fewer digits in this scene
        colour = colour_names[int(rng.integers(len(colour_names)))]
        rgb = np.asarray(COLOURS[colour], np.float32)
        patch = canvas[oy : oy + side, ox : ox + side]
        np.maximum(patch, digit[..., None] * rgb, out=patch)
        placed.append(box)
        objects.append(
            {"box": box, "label": DIGIT_WORDS[int(labels[idx])], "label_id": int(labels[idx]), "colour": colour,
             "mnist_index": idx, "image_size": size}
        )
    canvas += rng.normal(0.0, spec.noise_std, canvas.shape).astype(np.float32)
    img = np.clip(canvas, 0, 255).astype(np.uint8)
    captions, phrases = make_captions(objects, rng)
    for o in objects:
        del o["image_size"]
    key = f"{split}-{index:07d}"
    meta = {
        "image_id": key, "split": split, "width": size, "height": size, "captions": captions,
        "objects": objects, "phrases": phrases, "source": f"mnist-{part}",
    }
    return {"__key__": key, "png": png_bytes(img), "saliency.png": png_bytes(gaze_map(placed, size)), "json": meta}


def build_digit_scenes(
    out: str,
    train: int = DigitScenesConfig.train,
    val: int = DigitScenesConfig.val,
    test: int = DigitScenesConfig.test,
    size: int = DigitScenesConfig.size,
    seed: int = DigitScenesConfig.seed,
    maxcount: int = 500,
    workers: int | None = None,
    progress: bool = True,
) -> str:
    """Write the data set to ``out`` (resumable; complete shards are kept). Returns ``out``."""
    spec = SceneSpec(size=size, seed=seed)
    workers = workers or min(4, os.cpu_count() or 1)
    info = {"generator": "xray_match.data.digit_scenes", "spec": {**vars(spec), "digit_scale": list(spec.digit_scale)}}
    render = functools.partial(render_scene, spec=spec)  # picklable for the process pool
    write_splits(out, DATASET, {"train": train, "val": val, "test": test}, render, maxcount=maxcount, workers=workers,
                 info=info, progress=progress)
    return out
