"""Grounding metrics from attention maps (paper: grounding-mcb-attention, §3, Tables 1-2).

Boxes come from the attention map with no post-processing beyond a threshold and connected
components (§3: "the attentive map are evaluated directly without any further post-processing"):
pixels with ``r >= threshold``, 8-connected components (``scipy.ndimage.label``), one box per
component. Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends, the convention of the
ground-truth boxes that :mod:`xray_match.data.multi_mnist` writes. Each box is scored by the
attention mass of its component (the sum of ``r`` over its pixels).

Evaluation asks every image for every digit: the digits present (scored against their boxes) and
the digits absent (whose boxes can only be false detections).

* **Avg IoU** (Table 1), over present queries: its predicted boxes are matched one-to-one to the
  ground-truth boxes of that digit by maximum total IoU (Hungarian, ``linear_sum_assignment``); the
  mean, over ground-truth boxes, of the IoU of the box matched to each (0 when none is).
* **mAP at IoU t** (Table 2, ``ap_iouNN``). The paper names "the standard evaluation metric for both
  the detection and the localization tasks (a.k.a. the mean average precision)" and gives no more
  detail; we read it as detection AP, as in PASCAL VOC / COCO. Per digit class: every box that any
  query for that class produced on any image (present or absent), ranked by score; down the ranking
  a box is a true positive when its IoU with a not yet matched ground-truth box of that digit in its
  image is >= t (the best such box), else a false positive; AP is the area under the precision /
  recall curve with precision made monotone (all-point interpolation, VOC 2010+); the mAP is the
  mean over the classes that have ground truth. ``map`` is the mean over t ∈ {0.3, 0.4, 0.5} (the
  paper's "Avg mAP").
* **precision / recall at IoU t** (``prec_iouNN``, ``recall_iouNN``), over present queries and
  without ranking: Hungarian-matched pairs with IoU >= t divided by the number of predicted boxes
  (a present query whose map yields no box counts as one wrong prediction) or by the number of
  ground-truth boxes. Every extra component counts against precision whatever its score, so it is
  far stricter than AP.
* **absent queries** (Fig. 3, "an almost blank attentive map"): the mean activation of maps for
  digits absent from the image, beside that of present queries, and the share of absent maps that
  yield no box at all.

All figures are percentages except the mean activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

IOU_THRESHOLDS = (0.3, 0.4, 0.5)
_EIGHT = np.ones((3, 3), dtype=bool)


def scored_boxes_from_map(att: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``att`` (H, W) -> boxes (k, 4) ``[x0, y0, x1, y1]`` (exclusive ends), one per 8-connected
    component of ``att >= threshold`` in scan order, and each one's score (k,): the sum of ``att``
    over the component's pixels."""
    from scipy import ndimage

    att = np.asarray(att, dtype=np.float64)
    if att.ndim != 2:
        raise ValueError(f"boxes_from_map: expected an (H, W) map, got shape {att.shape}")
    labels, n = ndimage.label(att >= threshold, structure=_EIGHT)
    boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]
    scores = ndimage.sum_labels(att, labels, np.arange(1, n + 1)) if n else np.zeros(0)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)


def boxes_from_map(att: np.ndarray, threshold: float) -> np.ndarray:
    """The boxes of :func:`scored_boxes_from_map` without their scores."""
    return scored_boxes_from_map(att, threshold)[0]


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
    return _hungarian_ious(box_iou(pred, gt))


def _hungarian_ious(iou: np.ndarray) -> np.ndarray:
    """Each column's IoU under the one-to-one row/column matching of maximum total ``iou`` (n, m)."""
    from scipy.optimize import linear_sum_assignment

    out = np.zeros(iou.shape[1])
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        out[cols] = iou[rows, cols]
    return out


@dataclass
class QueryRecord:
    """What one query contributes to the metrics (small and picklable, for ``gather_objects``)."""

    present: bool
    n_pred: int
    gt_ious: list[float] = field(default_factory=list)  # per ground-truth box: Hungarian-matched IoU
    mean_act: float = 0.0  # mean of the attention map
    correct: bool = False  # the classifier C named the queried digit
    label: int = -1  # the queried digit (the class of its detections)
    scores: list[float] = field(default_factory=list)  # per predicted box
    iou: list[list[float]] = field(default_factory=list)  # predicted x ground-truth boxes


def score_query(att: np.ndarray, gt_boxes: Sequence[Sequence[float]], threshold: float, present: bool,
                correct: bool = False, label: int = -1) -> QueryRecord:
    pred, scores = scored_boxes_from_map(att, threshold)
    iou = box_iou(pred, gt_boxes if present else [])  # (boxes, ground truth)
    return QueryRecord(present, len(pred), _hungarian_ious(iou).tolist(), float(np.mean(att)), bool(correct),
                       int(label), scores.tolist(), iou.tolist())


def average_precision(scores: Sequence[float], tp: Sequence[bool], n_gt: int) -> float:
    """Area under the precision / recall curve of detections ``scores`` (n,) with true-positive
    flags ``tp`` (n,) against ``n_gt`` ground-truth boxes: precision made monotone from the right,
    summed over the recall steps (all-point interpolation, PASCAL VOC 2010+). In [0, 1]."""
    if n_gt <= 0:
        raise ValueError("average_precision: no ground-truth boxes, AP is undefined")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hit = np.asarray(tp, dtype=np.float64)[order]
    tps, fps = np.cumsum(hit), np.cumsum(1.0 - hit)
    recall = np.concatenate([[0.0], tps / n_gt])
    precision = np.concatenate([[1.0], tps / np.maximum(tps + fps, 1.0)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * precision[1:]))


def greedy_hits(scores: Sequence[float], iou: np.ndarray, t: float) -> np.ndarray:
    """True-positive flags of one query's boxes at IoU ``t``: in descending score order each box
    takes the not yet matched ground-truth box it overlaps most, if that IoU is >= ``t``."""
    hits = np.zeros(len(scores), dtype=bool)
    if not len(scores):
        return hits
    iou = np.asarray(iou, dtype=np.float64).reshape(len(scores), -1)
    free = np.ones(iou.shape[1], dtype=bool)
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        if not free.any():
            break
        j = int(np.argmax(np.where(free, iou[i], -1.0)))
        if iou[i, j] >= t:
            hits[i], free[j] = True, False
    return hits


def class_aps(records: Sequence[QueryRecord], t: float) -> dict[int, float]:
    """AP (%) at IoU ``t`` per queried class with ground truth: that class's boxes from all its
    records (absent queries' boxes are false positives), ranked by score, greedily matched."""
    by_class: dict[int, list[QueryRecord]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    aps = {}
    for label, recs in sorted(by_class.items()):
        n_gt = sum(len(r.gt_ious) for r in recs if r.present)
        if n_gt:
            hits = [greedy_hits(r.scores, np.asarray(r.iou), t) if r.present else np.zeros(len(r.scores), bool)
                    for r in recs]
            aps[label] = 100.0 * average_precision([s for r in recs for s in r.scores], np.concatenate(hits), n_gt)
    return aps


def detection_map(records: Sequence[QueryRecord], t: float) -> float:
    """Detection mAP (%) at IoU ``t``: :func:`class_aps` averaged over the classes with ground
    truth. 0 when no record has ground truth."""
    aps = class_aps(records, t)
    return float(np.mean(list(aps.values()))) if aps else 0.0


def summarize(records: Iterable[QueryRecord], thresholds: Sequence[float] = IOU_THRESHOLDS,
              per_class_t: float | None = 0.5) -> dict[str, float]:
    """Avg IoU, detection mAP / precision / recall at each IoU threshold, the mean mAP, the AP of
    each class at IoU ``per_class_t`` (``ap_iou50_c<k>``; weakly supervised grounding tends to fail
    whole classes, which the mean hides) and the absent-query statistics."""
    records = list(records)
    present = [r for r in records if r.present]
    absent = [r for r in records if not r.present]
    ious = np.asarray([x for r in present for x in r.gt_ious], dtype=np.float64)
    n_pred = sum(max(r.n_pred, 1) for r in present)  # a blank map counts as one wrong answer
    out: dict[str, float] = {"queries": float(len(present)), "avg_iou": 100.0 * float(ious.mean()) if len(ious) else 0.0}
    aps = []
    for t in thresholds:
        tp = float((ious >= t).sum())
        tag = f"iou{int(round(t * 100))}"
        per_class = class_aps(records, t)
        out[f"ap_{tag}"] = float(np.mean(list(per_class.values()))) if per_class else 0.0
        if t == per_class_t:
            out |= {f"ap_{tag}_c{k}": v for k, v in per_class.items()}
        out[f"prec_{tag}"] = 100.0 * tp / n_pred if n_pred else 0.0
        out[f"recall_{tag}"] = 100.0 * tp / len(ious) if len(ious) else 0.0
        aps.append(out[f"ap_{tag}"])
    out["map"] = float(np.mean(aps)) if aps else 0.0
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

    from xray_match.metrics.plots import save_png

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
    return save_png(fig, path)


__all__ = ["IOU_THRESHOLDS", "scored_boxes_from_map", "boxes_from_map", "box_iou", "match_ious", "QueryRecord",
           "score_query", "average_precision", "greedy_hits", "class_aps", "detection_map", "summarize", "save_attention_overlays"]
