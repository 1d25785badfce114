"""Grounding metrics from attention maps (paper: grounding-mcb-attention, §3, Tables 1-2).

Boxes come from the attention map with no post-processing beyond a threshold and connected
components (§3: "the attentive map are evaluated directly without any further post-processing"):
pixels with ``r >= threshold``, 8-connected components (``scipy.ndimage.label``), one box per
component. Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends, the convention of the
ground-truth boxes that :mod:`xray_match.data.multi_mnist` writes.

Scoring one query (an image and a digit present in it): its predicted boxes are matched one-to-one
to the ground-truth boxes of that digit by maximum total IoU (Hungarian, ``linear_sum_assignment``).

* **Avg IoU** (Table 1): the mean, over ground-truth boxes, of the IoU of the box matched to each
  (0 when none is). Extra predicted boxes do not lower it; they lower precision.
* **precision at IoU t** (Table 2): matched pairs with IoU >= t, divided by the number of predicted
  boxes. A present query whose map yields no box counts as one wrong prediction (a blank answer is a
  wrong answer), so a model cannot gain precision by staying silent. ``map`` is the mean over
  t ∈ {0.3, 0.4, 0.5} (the paper's "Avg mAP"). Recall at t (over ground-truth boxes) is reported too.
* **absent queries** (Fig. 3, "an almost blank attentive map"): the mean activation of maps for a
  digit absent from the image, beside that of present queries, and the share of absent maps that
  yield no box at all.

All figures are percentages except the mean activations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

IOU_THRESHOLDS = (0.3, 0.4, 0.5)
_EIGHT = np.ones((3, 3), dtype=bool)


def boxes_from_map(att: np.ndarray, threshold: float) -> np.ndarray:
    """``att`` (H, W) -> boxes (k, 4) ``[x0, y0, x1, y1]`` (exclusive ends), one per 8-connected
    component of ``att >= threshold``, in scan order of the components."""
    from scipy import ndimage

    att = np.asarray(att)
    if att.ndim != 2:
        raise ValueError(f"boxes_from_map: expected an (H, W) map, got shape {att.shape}")
    labels, n = ndimage.label(att >= threshold, structure=_EIGHT)
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (n, 4) and ``b`` (m, 4) -> (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy  # (n, m)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_ious(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """One-to-one matching by maximum total IoU; returns each ground-truth box's matched IoU (m,)."""
    from scipy.optimize import linear_sum_assignment

    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(len(gt))
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    if len(gt) == 0 or len(pred) == 0:
        return out
    iou = box_iou(pred, gt)  # (n, m)
    rows, cols = linear_sum_assignment(-iou)
    out[cols] = iou[rows, cols]
    return out


@dataclass
class QueryRecord:
    """What one query contributes to the metrics (small and picklable, for ``gather_objects``)."""

    present: bool
    n_pred: int
    gt_ious: list[float] = field(default_factory=list)  # per ground-truth box (present queries)
    mean_act: float = 0.0  # mean of the attention map
    correct: bool = False  # the classifier C named the queried digit


def score_query(att: np.ndarray, gt_boxes: Sequence[Sequence[float]], threshold: float, present: bool,
                correct: bool = False) -> QueryRecord:
    pred = boxes_from_map(att, threshold)
    ious = match_ious(pred, np.asarray(gt_boxes, dtype=np.float64)) if present else np.zeros(0)
    return QueryRecord(present, len(pred), [float(x) for x in ious], float(np.mean(att)), bool(correct))


def summarize(records: Iterable[QueryRecord], thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
    """Avg IoU, precision / recall at each IoU threshold and their mean, absent-query statistics."""
    records = list(records)
    present = [r for r in records if r.present]
    absent = [r for r in records if not r.present]
    ious = np.asarray([x for r in present for x in r.gt_ious], dtype=np.float64)
    n_pred = sum(max(r.n_pred, 1) for r in present)  # a blank map counts as one wrong answer
    out: dict[str, float] = {"queries": float(len(present)), "avg_iou": 100.0 * float(ious.mean()) if len(ious) else 0.0}
    precs = []
    for t in thresholds:
        tp = float((ious >= t).sum())
        tag = f"iou{int(round(t * 100))}"
        out[f"prec_{tag}"] = 100.0 * tp / n_pred if n_pred else 0.0
        out[f"recall_{tag}"] = 100.0 * tp / len(ious) if len(ious) else 0.0
        precs.append(out[f"prec_{tag}"])
    out["map"] = float(np.mean(precs)) if precs else 0.0
    out["boxes_per_query"] = float(np.mean([r.n_pred for r in present])) if present else 0.0
    out["cls_acc"] = 100.0 * float(np.mean([r.correct for r in present])) if present else 0.0
    out["present_act"] = float(np.mean([r.mean_act for r in present])) if present else 0.0
    if absent:
        out["absent_act"] = float(np.mean([r.mean_act for r in absent]))
        out["absent_blank"] = 100.0 * float(np.mean([r.n_pred == 0 for r in absent]))
        out["absent_ratio"] = out["absent_act"] / out["present_act"] if out["present_act"] > 0 else 0.0
    return out


def save_attention_overlays(images: np.ndarray, rows: list[list[dict]], path: str, threshold: float, title: str = "") -> str:
    """A grid of PNG overlays: per image (row) the input, then per query its attention map over
    the image with predicted boxes (red) and ground-truth boxes (green). ``images`` (N, H, W) in
    [0, 1]; ``rows[i]`` = ``[{"label", "present", "att" (H, W), "pred" (k, 4), "gt" (m, 4)}]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(rows)
    cols = 1 + max((len(r) for r in rows), default=0)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.4), dpi=100, squeeze=False)
    for i, row in enumerate(rows):
        axes[i, 0].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title("input", fontsize=7)
        for j, q in enumerate(row):
            ax = axes[i, j + 1]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            ax.imshow(q["att"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            for boxes, colour in ((q["gt"], "lime"), (q["pred"], "red")):
                for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1))
            ax.set_title(f"'{q['label']}' {'present' if q['present'] else 'absent'}", fontsize=7)
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j > len(row):
                ax.axis("off")
    if title:
        fig.suptitle(f"{title} (threshold {threshold:g}; red: predicted, green: ground truth)", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["IOU_THRESHOLDS", "boxes_from_map", "box_iou", "match_ious", "QueryRecord", "score_query", "summarize",
           "save_attention_overlays"]
