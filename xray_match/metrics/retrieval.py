"""Cross-modal retrieval metrics: Recall@K both directions and rsum, shared by every model.

Conventions: ``scores`` is (N_images, N_captions); ``caption_image[j]`` is the index of the image
that caption ``j`` describes. Image->text counts a hit when *any* of the image's captions ranks
within K (the standard 5-captions-per-image protocol); text->image when the caption's image does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

KS = (1, 5, 10)


def ranks_i2t(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(N_images,) 0-based rank of the best-ranked ground-truth caption of each image."""
    n_img = scores.shape[0]
    gt = caption_image.view(1, -1) == torch.arange(n_img, device=scores.device).view(-1, 1)  # (N_i, N_c)
    best_gt = scores.masked_fill(~gt, float("-inf")).max(dim=1, keepdim=True).values  # (N_i, 1)
    return (scores > best_gt).sum(dim=1)


def ranks_t2i(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """(N_captions,) 0-based rank of each caption's image."""
    gt_score = scores.gather(0, caption_image.view(1, -1))  # (1, N_c)
    return (scores > gt_score).sum(dim=0)


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
        r_i2t[rows] = (s > best).sum(dim=1)
        sel = (caption_image >= rows.start) & (caption_image < rows.stop)
        cols = sel.nonzero().squeeze(1)
        gt_score[cols] = s[caption_image[cols] - rows.start, cols]
    r_t2i = torch.zeros(n_cap, dtype=torch.long)
    for rows in blocks:
        s = score_block(rows).float().cpu()
        r_t2i += (s > gt_score.view(1, -1)).sum(dim=0)
    return r_i2t, r_t2i


def embedding_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS, chunk: int = 1024
) -> dict[str, float]:
    """Recall@K for embedding models: one chunked matmul per block of images."""
    caption_image = caption_image.cpu()
    r_i2t, r_t2i = chunked_ranks(lambda rows: image_emb[rows] @ text_emb.T, image_emb.shape[0], caption_image, chunk)
    return summarize(r_i2t, r_t2i, ks)
