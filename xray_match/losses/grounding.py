"""Losses of weakly supervised attention grounding (paper: grounding-mcb-attention, §2.3).

Eq. (1): ``L = L_ce + λ · L_p + β · R``.

Eq. (2) as printed::

    L_p = ||f'_i - f'_j - m||²   if y_i = y_j
          -||f'_i - f'_j||²      otherwise

is unsound: the second branch is unbounded below (scaling the features sends L to -inf), and
subtracting a margin *vector* ``m`` inside the first norm has no clear meaning. The text says m is
"the minimum margin distance among the intra-class features" and the loss should give "more
inter-class dispersion and intra-class compactness" (citing center/range losses). We implement the
bounded reading of that intent, the contrastive loss of Hadsell et al. (2006)::

    L_p(i, j) = d_ij²                    if y_i = y_j   (pull together)
                max(0, m - d_ij)²        otherwise      (push apart until the margin m)

with ``d_ij = ||z_i - z_j||`` on L2-normalised features ``z = f' / ||f'||`` — the normalisation
gives the margin a fixed scale (d ∈ [0, 2]); the classifier still sees the raw f'. L_p is the mean
over all unordered pairs i < j of the (per-rank) batch.

Eq. (3): ``R = (1/n²) Σ_{x,y} r(x, y)²``, the mean squared attention over an n x n map (for an
H x W map, 1/(HW)); averaged over the queries of the batch. The paper's sum "x, y = 0 .. n" has
n + 1 terms per axis for a 1/n² normaliser; we read it as the mean over the map's pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def pair_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. (2), bounded (contrastive) reading: mean over pairs i < j of ``d²`` (same label) or
    ``max(0, m - d)²`` (different labels), ``d`` between L2-normalised rows. ``features`` (Q, D),
    ``labels`` (Q,). Zero when the batch has fewer than two rows."""
    q = features.shape[0]
    if q < 2:
        return features.sum() * 0.0
    z = F.normalize(features.float(), dim=1)  # (Q, D)
    d2 = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)  # (Q, Q)
    d = d2.clamp(min=1e-12).sqrt()  # clamp: d's gradient is infinite at 0
    same = labels[:, None] == labels[None, :]  # (Q, Q)
    per_pair = torch.where(same, d2, F.relu(margin - d).pow(2))  # (Q, Q)
    upper = torch.triu(torch.ones(q, q, dtype=torch.bool, device=features.device), diagonal=1)
    return per_pair[upper].mean()


def attention_l2(r: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``R = (1/n²) Σ r(x, y)²`` per map, averaged over maps; ``r`` (Q, H, W)."""
    return r.float().pow(2).mean(dim=(-2, -1)).mean()


class GroundingLoss(nn.Module):
    """Eq. (1). ``forward(outputs, batch)`` -> ``ce_loss`` (L_ce), ``pair_loss`` (λ·L_p),
    ``attention_loss`` (β·R) — the loop sums the ``*_loss`` keys — plus the unweighted ``pair``
    and ``attention_l2`` and the query classification accuracy ``acc`` for logging."""

    def __init__(self, lambda_: float = 0.1, beta: float = 0.1, margin: float = 1.0):
        super().__init__()
        self.lambda_, self.beta, self.margin = lambda_, beta, margin

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["query"]  # (Q,)
        logits = outputs["logits"].float()  # (Q, K)
        ce = F.cross_entropy(logits, labels)
        lp = pair_loss(outputs["pooled"], labels, self.margin)
        reg = attention_l2(outputs["attention"])
        return {
            "ce_loss": ce,
            "pair_loss": self.lambda_ * lp,
            "attention_loss": self.beta * reg,
            "pair": lp.detach(),
            "attention_l2": reg.detach(),
            "acc": (logits.argmax(1) == labels).float().mean().detach(),
        }


__all__ = ["pair_loss", "attention_l2", "GroundingLoss"]
