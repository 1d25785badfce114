"""Bidirectional hinge ranking losses over a score matrix (RDAN Eq. (12) and (13); VSE++).

Everything here works on a score matrix ``scores`` (N_img, N_cap) (any model: cross-attention
similarities F(I, T) or embedding dot products) and the positive pairs it contains:
``caption_image[c]`` is the row of caption ``c``'s image (default: the diagonal of a square batch).
A pair (i, c) is a *negative* when ``caption_image[c] != i`` and it is not in ``ignore`` - a mask
for pairs that are not known to be wrong (two batch items that show the same image, or two
captions with identical text: synthetic data sets produce such duplicates and calling them
negatives would teach the model to separate identical inputs).

For each positive pair (I, T) = (caption_image[c], c) there are two terms: against the negative
captions T^ of image I (its row) and against the negative images I^ of caption T (its column).
Per positive pair, Eq. (12) sums the hinge over all negatives and Eq. (13) keeps only the hardest
one; the loss over a batch is the sum over its positive pairs (as in VSE++ and SCAN) or the mean.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Reduction = Literal["sum", "mean"]


def _pairs(scores: torch.Tensor, caption_image: torch.Tensor | None, ignore: torch.Tensor | None):
    """Positive scores and negative masks in per-positive-pair layout.

    Returns ``pos`` (N_c,), ``row`` (N_c, N_c) the scores of each positive pair's image against every
    caption, ``row_neg`` (N_c, N_c) which of those are negatives, ``col`` (N_c, N_i) the scores of each
    caption against every image, ``col_neg`` (N_c, N_i).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N_img, N_cap), got shape {tuple(scores.shape)}")
    n_img, n_cap = scores.shape
    if caption_image is None:
        if n_img != n_cap:
            raise ValueError(f"scores is {n_img}x{n_cap}: give caption_image when the batch is not square")
        caption_image = torch.arange(n_cap, device=scores.device)
    caption_image = caption_image.to(scores.device).long()
    if caption_image.shape != (n_cap,):
        raise ValueError(f"caption_image must be ({n_cap},), got {tuple(caption_image.shape)}")
    if n_cap and (caption_image.min() < 0 or caption_image.max() >= n_img):
        raise ValueError(f"caption_image has an image index outside [0, {n_img})")
    neg = caption_image.view(1, -1) != torch.arange(n_img, device=scores.device).view(-1, 1)  # (N_i, N_c)
    if ignore is not None:
        if ignore.shape != scores.shape:
            raise ValueError(f"ignore must have the shape of scores {tuple(scores.shape)}, got {tuple(ignore.shape)}")
        neg = neg & ~ignore.to(scores.device).bool()
    cols = torch.arange(n_cap, device=scores.device)
    pos = scores[caption_image, cols]  # (N_c,)  F(I, T)
    row = scores[caption_image]  # (N_c, N_c)  F(I, T^) for every caption T^
    row_neg = neg[caption_image]  # (N_c, N_c)
    col = scores.t()  # (N_c, N_i)  F(I^, T) for every image I^
    col_neg = neg.t()  # (N_c, N_i)
    return pos, row, row_neg, col, col_neg


def _reduce(per_pair: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "mean":
        return per_pair.mean() if per_pair.numel() else per_pair.sum()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def hinge_all_negatives(
    scores: torch.Tensor,
    margin: float,
    caption_image: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    reduction: Reduction = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (12): sum_T^ [m - F(I,T) + F(I,T^)]_+ and sum_I^ [m - F(I,T) + F(I^,T)]_+ per positive pair.

    scores (N_img, N_cap). Returns the two terms (caption negatives, image negatives), each reduced
    over the positive pairs; the loss is their sum.
    """
    pos, row, row_neg, col, col_neg = _pairs(scores, caption_image, ignore)
    cost_t = (margin - pos.view(-1, 1) + row).clamp_min(0) * row_neg  # (N_c, N_c)
    cost_i = (margin - pos.view(-1, 1) + col).clamp_min(0) * col_neg  # (N_c, N_i)
    return _reduce(cost_t.sum(1), reduction), _reduce(cost_i.sum(1), reduction)


def hinge_hardest_negatives(
    scores: torch.Tensor,
    margin: float,
    caption_image: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    reduction: Reduction = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (13): [m - F(I,T) + F(I,T^_h)]_+ and [m - F(I,T) + F(I^_h,T)]_+ with the hardest negatives
    T^_h = argmax_{d != T} F(I, d), I^_h = argmax_{g != I} F(g, T) in the batch (VSE++).

    A positive pair without any negative (a batch of one) contributes 0.
    """
    pos, row, row_neg, col, col_neg = _pairs(scores, caption_image, ignore)
    hard_t = row.masked_fill(~row_neg, float("-inf")).max(dim=1).values  # (N_c,)
    hard_i = col.masked_fill(~col_neg, float("-inf")).max(dim=1).values  # (N_c,)
    # -inf (no negative) -> clamp gives 0; the gradient through a -inf fill is 0 as well
    cost_t = (margin - pos + hard_t).clamp_min(0)
    cost_i = (margin - pos + hard_i).clamp_min(0)
    cost_t = torch.where(row_neg.any(1), cost_t, torch.zeros_like(cost_t))
    cost_i = torch.where(col_neg.any(1), cost_i, torch.zeros_like(cost_i))
    return _reduce(cost_t, reduction), _reduce(cost_i, reduction)


class HingeRankingLoss(nn.Module):
    """``loss(outputs, batch) -> {"rank_loss", "rank_caption_neg", "rank_image_neg", "pos_score", "neg_score"}``.

    Reads ``outputs[score_key]`` (N_img, N_cap) and, when present, ``batch["caption_image"]`` (N_cap,)
    and ``batch["ignore_pairs"]`` (N_img, N_cap) bool. ``hardest=True`` is Eq. (13), False Eq. (12).
    """

    def __init__(self, margin: float = 0.2, hardest: bool = True, reduction: Reduction = "sum", score_key: str = "scores"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.hardest, self.reduction, self.score_key = float(margin), bool(hardest), reduction, score_key

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        if self.score_key not in outputs:
            raise KeyError(f"HingeRankingLoss: outputs have no {self.score_key!r} (have: {', '.join(outputs)})")
        scores = outputs[self.score_key].float()
        batch = batch or {}
        caption_image, ignore = batch.get("caption_image"), batch.get("ignore_pairs")
        fn = hinge_hardest_negatives if self.hardest else hinge_all_negatives
        t_term, i_term = fn(scores, self.margin, caption_image, ignore, self.reduction)
        with torch.no_grad():
            pos, row, row_neg, _, _ = _pairs(scores, caption_image, ignore)
            neg_score = (row * row_neg).sum() / row_neg.sum().clamp_min(1)  # mean over negative pairs
        return {
            "rank_loss": t_term + i_term,
            "rank_caption_neg": t_term.detach(),
            "rank_image_neg": i_term.detach(),
            "pos_score": pos.mean().detach(),
            "neg_score": neg_score.detach(),
        }
