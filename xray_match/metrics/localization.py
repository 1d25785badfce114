"""Phrase localization (Flickr30K Entities protocol) and the candidate boxes it ranks.

A phrase counts as localized when the candidate box its model scores best overlaps a ground-truth
box of the phrase with IoU >= 0.5 (Plummer et al., ICCV 2015; DSPE §4.3). Flickr30K Entities
ranks EdgeBoxes proposals; on the digit scenes the candidates are the ground-truth boxes plus
jittered copies of them plus sliding windows (:func:`candidate_boxes`), so the task is to pick the
tight box of the right digit among near misses and background windows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

IOU_HIT = 0.5


def jitter_boxes(box: Sequence[float], n: int, size: tuple[float, float], rng: np.random.Generator,
                 shift: float = 0.3, scale: float = 0.3) -> np.ndarray:
    """(n, 4) copies of ``box`` [x0, y0, x1, y1]: centre moved by up to ``shift`` x its side, sides
    scaled by up to 1 +- ``scale``, clipped to the ``size`` = (width, height) image, never empty."""
    x0, y0, x1, y1 = map(float, box)
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.uniform(-shift, shift, n) * w
    cy = (y0 + y1) / 2 + rng.uniform(-shift, shift, n) * h
    nw = w * (1 + rng.uniform(-scale, scale, n))
    nh = h * (1 + rng.uniform(-scale, scale, n))
    out = np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], 1)
    return _clip(out, size)


def sliding_windows(size: tuple[float, float], scales: Sequence[float], stride: float = 0.5) -> np.ndarray:
    """(n, 4) square windows of side ``s * min(width, height)`` for each ``s`` in ``scales``, every
    ``stride`` x side, the last one flush with the right/bottom edge."""
    W, H = size
    out = []
    for s in scales:
        side = s * min(W, H)
        step = max(1.0, stride * side)
        xs = np.unique(np.append(np.arange(0, W - side + 1e-6, step), W - side))
        ys = np.unique(np.append(np.arange(0, H - side + 1e-6, step), H - side))
        out += [[x, y, x + side, y + side] for y in ys for x in xs]
    return np.asarray(out, np.float64).reshape(-1, 4)


def candidate_boxes(gt: Sequence[Sequence[float]], size: tuple[float, float], n_jitter: int,
                    scales: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """(C, 4) float32: the ground-truth boxes first (in order), then ``n_jitter`` jittered copies
    of each, then the sliding windows."""
    gt_arr = np.asarray(gt, np.float64).reshape(-1, 4)
    parts = [gt_arr]
    if n_jitter:
        parts += [jitter_boxes(b, n_jitter, size, rng) for b in gt_arr]
    parts.append(sliding_windows(size, scales))
    return np.concatenate(parts).astype(np.float32)


def _clip(boxes: np.ndarray, size: tuple[float, float], min_side: float = 2.0) -> np.ndarray:
    W, H = size
    b = boxes.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, W)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, H)
    # keep at least min_side pixels, moving the box back inside the image
    for lo, hi, lim in ((0, 2, W), (1, 3, H)):
        short = b[:, hi] - b[:, lo] < min_side
        b[short, hi] = np.minimum(b[short, lo] + min_side, lim)
        b[short, lo] = b[short, hi] - min_side
    return b


def best_candidates(dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P,) index of the nearest valid candidate of each phrase; ``dist``/``valid`` are (P, C)."""
    if not bool(valid.any(1).all()):
        raise ValueError("a phrase has no candidate box (every phrase needs its image's candidates)")
    return dist.masked_fill(~valid, float("inf")).argmin(1)


def localization_hits(chosen: torch.Tensor, gt: torch.Tensor, iou: float = IOU_HIT) -> torch.Tensor:
    """(P,) bool: chosen box (P, 4) overlaps its ground truth (P, 4) with IoU >= ``iou``."""
    if chosen.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return box_iou(chosen.float(), gt.float()).diagonal() >= iou


def phrase_accuracy(dist: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor, gt: torch.Tensor,
                    iou: float = IOU_HIT) -> float:
    """Fraction of phrases whose nearest candidate (``dist`` (P, C), ``valid`` (P, C), candidate
    ``boxes`` (C, 4)) has IoU >= ``iou`` with the phrase's ground-truth box ``gt`` (P, 4)."""
    if dist.shape[0] == 0:
        return float("nan")
    hits = localization_hits(boxes[best_candidates(dist, valid)], gt, iou)
    return hits.float().mean().item()
