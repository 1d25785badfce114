"""Cross-modal retrieval metrics: Recall@K both directions and rsum, shared by every model.

Conventions: ``scores`` is (N_images, N_captions); ``caption_image[j]`` is the index of the image
that caption ``j`` describes. Image->text counts a hit when *any* of the image's captions ranks
within K (the standard 5-captions-per-image protocol); text->image when the caption's image does.

Ties count against the ground truth: a wrong item scoring *equal* to it ranks above it. Counting
only strictly greater scores (as SCAN / VSE++ do through ``argsort`` order, or ``>``) lets a
collapsed model, whose scores are all equal, score R@1 = 100; here a constant score matrix
scores R@K = 0, below chance.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

KS = (1, 5, 10)


def ranks_i2t(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(N_images,) 0-based rank of the best-ranked ground-truth caption of each image."""
    n_img = scores.shape[0]
    gt = caption_image.view(1, -1) == torch.arange(n_img, device=scores.device).view(-1, 1)  # (N_i, N_c)
    best_gt = scores.masked_fill(~gt, float("-inf")).max(dim=1, keepdim=True).values  # (N_i, 1)
    return ((scores >= best_gt) & ~gt).sum(dim=1)


def ranks_t2i(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(N_captions,) 0-based rank of each caption's image."""
    gt_score = scores.gather(0, caption_image.view(1, -1))  # (1, N_c)
    return (scores >= gt_score).sum(dim=0) - 1  # the ground truth itself ties with its own score


def recall_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def recall_at_k(scores: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"i2t_r1", ..., "t2i_r10", "rsum"}`` in percent from a full score matrix."""
    caption_image = caption_image.to(scores.device)
    return summarize(ranks_i2t(scores, caption_image), ranks_t2i(scores, caption_image), ks)


def summarize(r_i2t: torch.Tensor, r_t2i: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    i2t, t2i = recall_from_ranks(r_i2t, ks), recall_from_ranks(r_t2i, ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    out["rsum"] = sum(i2t.values()) + sum(t2i.values())
    return out


def chunked_ranks(
    score_block: Callable[[slice], torch.Tensor],
    n_images: int,
    caption_image: torch.Tensor,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks without holding more than ``chunk`` image rows of scores at once beyond one pass.

    ``score_block(rows)`` returns scores (len(rows), N_captions). Two passes: the first finds every
    caption's ground-truth score, the second counts what beats it, so memory is O(chunk x N_c).
    """
    n_cap = caption_image.numel()
    gt_score = torch.empty(n_cap)
    r_i2t = torch.empty(n_img := n_images, dtype=torch.long)
    blocks = []
    for start in range(0, n_img, chunk):
        rows = slice(start, min(n_img, start + chunk))
        s = score_block(rows).float().cpu()
        blocks.append(rows)
        idx = torch.arange(rows.start, rows.stop)
        mine = (caption_image.view(1, -1) == idx.view(-1, 1))  # (b, N_c)
        best = s.masked_fill(~mine, float("-inf")).max(dim=1, keepdim=True).values
        r_i2t[rows] = ((s >= best) & ~mine).sum(dim=1)
        sel = (caption_image >= rows.start) & (caption_image < rows.stop)
        cols = sel.nonzero().squeeze(1)
        gt_score[cols] = s[caption_image[cols] - rows.start, cols]
    r_t2i = torch.zeros(n_cap, dtype=torch.long)
    for rows in blocks:
        s = score_block(rows).float().cpu()
        r_t2i += (s >= gt_score.view(1, -1)).sum(dim=0)
    return r_i2t, r_t2i - 1  # minus the ground truth itself


def embedding_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS, chunk: int = 1024
) -> dict[str, float]:
    """Recall@K for embedding models: one chunked matmul per block of images."""
    caption_image = caption_image.cpu()
    r_i2t, r_t2i = chunked_ranks(lambda rows: image_emb[rows] @ text_emb.T, image_emb.shape[0], caption_image, chunk)
    return summarize(r_i2t, r_t2i, ks)


def mean_pairwise_cosine(emb: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows of ``emb`` (N, D): near 1 when the
    embeddings have collapsed onto one direction, near 0 when they spread out. O(N D): the sum
    over all pairs of u_i . u_j is |sum_i u_i|^2, and the N diagonal terms are each 1."""
    n = emb.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(emb.double(), dim=1)
    return ((u.sum(0).square().sum() - n) / (n * (n - 1))).item()


# ----------------------------------------------------------------------------- protocols
#
# Flickr30k 1K and COCO 5K: one query set, the whole test split (``recall_at_k`` on its matrix).
# COCO 5-fold 1K: the 5,000 test images in five folds of 1,000 consecutive images, each scored only
# against its own 5,000 captions; every metric is averaged over the folds. (The SCAN and VSE++
# evaluation scripts print the fold average under the wrong labels - e.g. mean i2t recall x 6 as
# "rsum"; here each mean is computed and returned under its own name.)

FoldScorer = Callable[[slice, torch.Tensor], torch.Tensor]


def folds(n_images: int, caption_image: torch.Tensor, n_folds: int = 5) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``n_folds`` folds of ``n_images / n_folds`` consecutive images. Each fold is ``(image rows,
    caption columns, caption_image within the fold)``; every caption belongs to its image's fold."""
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if n_images % n_folds:
        raise ValueError(f"{n_images} images cannot be split into {n_folds} equal folds (COCO 5-fold 1K needs 5,000)")
    caption_image = caption_image.cpu().long()
    if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError(f"caption_image refers to images outside [0, {n_images})")
    size = n_images // n_folds
    out = []
    for f in range(n_folds):
        rows = slice(f * size, (f + 1) * size)
        cols = ((caption_image >= rows.start) & (caption_image < rows.stop)).nonzero().squeeze(1)
        if cols.numel() == 0:
            raise ValueError(f"fold {f} (images {rows.start}..{rows.stop - 1}) has no captions")
        out.append((rows, cols, caption_image[cols] - rows.start))
    return out


def fold_recall(
    scores: torch.Tensor | FoldScorer,
    caption_image: torch.Tensor,
    n_folds: int = 5,
    n_images: int | None = None,
    ks: Sequence[int] = KS,
) -> dict[str, Any]:
    """COCO 5-fold 1K protocol: ``{"folds": [metrics of fold f], "mean": {metric: mean over folds}}``.

    ``scores`` is the full (N_img, N_cap) matrix, or a callable ``(image rows, caption columns) ->
    (fold images, fold captions)`` scores - a cross-attention model then scores only the five
    diagonal blocks (1/5 of the pairs). ``"mean"`` averages each metric over the folds, rsum included
    (the mean of the folds' rsums equals the sum of the mean recalls).
    """
    if torch.is_tensor(scores):
        n_images = scores.shape[0]
        matrix = scores
        scores = lambda rows, cols: matrix[rows][:, cols.to(matrix.device)]  # noqa: E731
    elif n_images is None:
        raise ValueError("fold_recall: give n_images with a scoring callable")
    per_fold = [recall_at_k(scores(rows, cols), local, ks) for rows, cols, local in folds(n_images, caption_image, n_folds)]
    mean = {k: sum(m[k] for m in per_fold) / len(per_fold) for k in per_fold[0]}
    return {"folds": per_fold, "mean": mean}


def protocol_recall(
    scores: torch.Tensor | FoldScorer,
    caption_image: torch.Tensor,
    protocol: str,
    n_images: int | None = None,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Flat, labelled metrics for one protocol: ``"1k"`` / ``"5k"`` / ``"full"`` (the whole matrix;
    1K and 5K only check the image count) or ``"5fold1k"`` (mean over 5 folds of 1K, keys as
    ``recall_at_k``, plus ``fold{f}_<metric>`` for each fold)."""
    if protocol in ("1k", "5k", "full"):
        if not torch.is_tensor(scores):
            raise ValueError(f"protocol {protocol!r} needs the full score matrix")
        expected = {"1k": 1000, "5k": 5000}.get(protocol)
        if expected is not None and scores.shape[0] != expected:
            raise ValueError(f"protocol {protocol!r} expects {expected} images, the matrix has {scores.shape[0]}")
        return recall_at_k(scores, caption_image, ks)
    if protocol == "5fold1k":
        res = fold_recall(scores, caption_image, 5, n_images, ks)
        out = dict(res["mean"])
        for f, m in enumerate(res["folds"]):
            out |= {f"fold{f}_{k}": v for k, v in m.items()}
        return out
    raise ValueError(f"unknown protocol {protocol!r} (1k, 5k, full, 5fold1k)")


def format_recall(metrics: dict[str, float], title: str = "") -> str:
    """One labelled line per direction, e.g. for logs and docs."""
    ks = sorted(int(k[len("i2t_r"):]) for k in metrics if k.startswith("i2t_r") and k[len("i2t_r"):].isdigit())
    i2t = " ".join(f"R@{k} {metrics[f'i2t_r{k}']:.1f}" for k in ks)
    t2i = " ".join(f"R@{k} {metrics[f't2i_r{k}']:.1f}" for k in ks)
    head = f"{title}: " if title else ""
    return f"{head}image->text {i2t} | text->image {t2i} | rsum {metrics['rsum']:.1f}"
