"""DSPE's objective: bidirectional ranking + structure-preserving constraints with top-K violations.

Wang, Li, Lazebnik, "Learning deep structure-preserving image-text embeddings", CVPR 2016, §3.
With ``d`` the Euclidean distance between embedded (L2-normalized) vectors and margin ``m``:

* Eq. (1), image -> text ranking: ``d(x_i, y_j) + m < d(x_i, y_k)``  for all y_j in Y_i^+, y_k in Y_i^-
* Eq. (2), text -> image ranking: ``d(x_j, y_i) + m < d(x_k, y_i)``  for all x_j in X_i^+, x_k in X_i^-
* Eq. (3), image-side structure:  ``d(x_i, x_j) + m < d(x_i, x_k)``  for all x_j in N(x_i), x_k not in N(x_i)
* Eq. (4), text-side structure:   ``d(y_i, y_j) + m < d(y_i, y_k)``  for all y_j in N(y_i), y_k not in N(y_i)

and the loss, Eq. (5), sums the hinges ``max[0, m + d(anchor, positive) - d(anchor, negative)]`` of
the four families, weighted 1, lambda_1, lambda_2, lambda_3.

Triplet sampling (§3.3): within a minibatch, for each positive pair (a ground-truth image-sentence
pair, two neighbouring images, or two neighbouring sentences) only the top K most violated
constraints of each relevant family count (K = 50 in the paper; most pairs have far fewer).

Readings chosen where the paper leaves room (see docs/dspe.md):

* Relations come from one boolean matrix ``pos`` (n_x, n_y): image/region x_i and sentence/phrase
  y_j match. Y_i^+ = {j : pos[i, j]}, X_j^+ = {i : pos[i, j]}. Negatives are the complement unless
  an explicit ``neg`` mask is given (phrase localization adds mined hard-negative boxes that are
  negatives only for the phrase they were mined for, and neither positive nor negative otherwise).
* Neighbourhoods follow §3.2 literally: N(x_i) = the other images described by a same sentence
  (``(pos @ pos.T)`` off the diagonal); N(y_i) = the other sentences that describe a same image
  (``(pos.T @ pos)`` off the diagonal). The anchor itself is neither neighbour nor negative.
  Within a family, a candidate with no relation to the anchor through ``pos`` is a negative.
* Scale: Eq. (5) is a plain sum over triplets, which grows with the minibatch. We divide every term
  by the same number, the count of ground-truth pairs (``pos.sum()``) in the minibatch, so the
  relative weights of Eq. (5) are exactly the paper's and only the learning rate absorbs the batch
  size (and, for phrases, how many regions share a phrase).
* Distances are Euclidean, as written (not the cosine similarity of later work); on unit vectors
  ``d = sqrt(2 - 2 cos)``, computed with a floor under the square root so that the gradient is
  finite for coincident points.
"""

from __future__ import annotations

import torch
from torch import nn


def euclidean(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(n, m) Euclidean distances between rows of ``a`` (n, D) and ``b`` (m, D)."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * a @ b.T  # (n, m)
    return sq.clamp_min(eps).sqrt()


def topk_hinge(
    dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One constraint family over anchors (rows) and candidates (columns).

    ``dist`` (A, C) anchor-candidate distances; ``pos``/``neg`` (A, C) boolean. For every positive
    pair (a, p) the violations ``max[0, m + dist[a, p] - dist[a, n]]`` over the anchor's negatives n
    are computed and the ``k`` largest are summed (fewer if fewer are violated).

    Returns ``(total, n_violated, n_pairs)``: the summed hinge (a scalar with gradient), the number of
    violated (positive pair, negative) triplets (before the top-K cut) and the number of positive pairs.
    """
    a_idx, p_idx = pos.nonzero(as_tuple=True)  # (P,), (P,)
    if a_idx.numel() == 0 or not bool(neg.any()):
        zero = dist.sum() * 0.0
        return zero, torch.zeros((), device=dist.device), torch.tensor(float(a_idx.numel()), device=dist.device)
    d_pos = dist[a_idx, p_idx].unsqueeze(1)  # (P, 1)
    d_neg = dist[a_idx]  # (P, C)
    viol = (margin + d_pos - d_neg).clamp_min(0.0) * neg[a_idx]  # (P, C): zero where not a negative
    kk = min(k, viol.shape[1])
    top = viol.topk(kk, dim=1, sorted=False).values  # (P, kk)
    return top.sum(), (viol > 0).sum().float(), torch.tensor(float(a_idx.numel()), device=dist.device)


def neighbours(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N_x (n_x, n_x), N_y (n_y, n_y))`` from ``pos`` (n_x, n_y), §3.2: images described by a
    same sentence, and sentences describing a same image; nobody is its own neighbour."""
    p = pos.float()
    n_x = (p @ p.T) > 0
    n_y = (p.T @ p) > 0
    n_x.fill_diagonal_(False)
    n_y.fill_diagonal_(False)
    return n_x, n_y


class StructurePreservingLoss(nn.Module):
    """Eq. (5): ``L = sum Eq.(1) + lambda_1 sum Eq.(2) + lambda_2 sum Eq.(3) + lambda_3 sum Eq.(4)``,
    each with at most ``top_k`` violations per positive pair, divided by the number of ground-truth
    pairs in the minibatch.

    ``forward(outputs, batch)`` reads ``outputs["image_emb"]`` (n_x, D), ``outputs["text_emb"]``
    (n_y, D), ``batch["pos"]`` (n_x, n_y) bool and optionally ``batch["neg"]`` (n_x, n_y) bool.
    Returns the four weighted terms as ``*_loss`` and, per family, the fraction of positive pairs'
    candidate negatives that violate the margin (``viol_*``, before the top-K cut).
    """

    def __init__(self, margin: float = 0.1, lambda_1: float = 2.0, lambda_2: float = 0.1, lambda_3: float = 0.1,
                 top_k: int = 50):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.margin, self.top_k = float(margin), int(top_k)
        self.lambda_1, self.lambda_2, self.lambda_3 = float(lambda_1), float(lambda_2), float(lambda_3)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = outputs["image_emb"].float(), outputs["text_emb"].float()  # (n_x, D), (n_y, D)
        pos = batch["pos"].bool()  # (n_x, n_y)
        if pos.shape != (x.shape[0], y.shape[0]):
            raise ValueError(f"batch['pos'] is {tuple(pos.shape)}, expected ({x.shape[0]}, {y.shape[0]})")
        neg = batch["neg"].bool() if batch.get("neg") is not None else ~pos  # (n_x, n_y)
        m, k = self.margin, self.top_k
        norm = pos.sum().clamp_min(1).float()
        d_xy = euclidean(x, y)  # (n_x, n_y)
        out: dict[str, torch.Tensor] = {}

        s, v, n = topk_hinge(d_xy, pos, neg, m, k)  # Eq. (1): anchors are images
        out["rank_i2t_loss"] = s / norm
        out["viol_i2t"] = v / (n * neg.shape[1]).clamp_min(1)
        if self.lambda_1:
            s, v, n = topk_hinge(d_xy.T, pos.T, neg.T, m, k)  # Eq. (2): anchors are sentences
            out["rank_t2i_loss"] = self.lambda_1 * s / norm
            out["viol_t2i"] = v / (n * neg.shape[0]).clamp_min(1)
        if self.lambda_2 or self.lambda_3:
            n_x, n_y = neighbours(pos)
            if self.lambda_2:  # Eq. (3): image-side structure
                eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
                s, v, n = topk_hinge(euclidean(x, x), n_x, ~n_x & ~eye, m, k)
                out["struct_image_loss"] = self.lambda_2 * s / norm
                out["viol_struct_image"] = v / (n * x.shape[0]).clamp_min(1)
            if self.lambda_3:  # Eq. (4): sentence-side structure
                eye = torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
                s, v, n = topk_hinge(euclidean(y, y), n_y, ~n_y & ~eye, m, k)
                out["struct_text_loss"] = self.lambda_3 * s / norm
                out["viol_struct_text"] = v / (n * y.shape[0]).clamp_min(1)
        return out
