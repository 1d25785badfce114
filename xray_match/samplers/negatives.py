"""Negative samplers behind one interface (paper: intermodal-contrastive-gaze, §3.2).

``logits(outputs, image_ids, text_ids) -> (i2t, t2i)``: each (B, 1+N) with the positive similarity
in column 0 and negatives after it (masked ones at -inf); ``update(outputs, image_ids, text_ids)``
after the optimizer step. A pair ``(image i, caption c)`` is a training pair; a key is masked (it is
not a negative) when it shares the query's image id (another caption of the same image) or when
its caption's text id equals that of the query's positive caption (the same sentence, normalised
by :func:`xray_match.text.vocab.sentence_key`: "handwritten seven" describes many digit scenes,
and COCO has near-duplicate captions; pushing a sentence away from itself teaches nothing true).

- batch: in-batch negatives, both directions (gathered across ranks with gradient).
- queue: MoCo — keys from momentum encoders, a FIFO queue of K keys per modality; keys gathered
  across ranks before enqueue; K must be a multiple of the global batch.
- rerank: the queue's key bank scored entirely, the top-n hardest (most similar) kept as negatives.
"""

from __future__ import annotations

import torch
from torch import nn

from xray_match.distributed import all_gather_nograd, all_gather_with_grad, rank

NEG_INF = float("-inf")


class NegativeSampler(nn.Module):
    uses_momentum = False

    def logits(self, outputs: dict[str, torch.Tensor], ids: torch.Tensor,
               text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(self, outputs: dict[str, torch.Tensor], ids: torch.Tensor, text_ids: torch.Tensor) -> None:
        pass


class BatchNegatives(NegativeSampler):
    """Batch-NCE: every other pair of the (global) batch is a negative."""

    def logits(self, outputs, ids, text_ids):
        q_img, q_txt = outputs["image_emb"], outputs["text_emb"]  # (B, D)
        all_img, all_txt = all_gather_with_grad(q_img), all_gather_with_grad(q_txt)  # (G, D)
        not_neg = same_pair(ids, text_ids, all_gather_nograd(ids), all_gather_nograd(text_ids))  # (B, G)
        offset = rank() * q_img.shape[0]
        pos = torch.arange(q_img.shape[0], device=q_img.device) + offset
        # the mask is symmetric: image j is a key of caption i exactly when caption j is one of image i
        return _with_positive_first(q_img @ all_txt.T, pos, not_neg), _with_positive_first(q_txt @ all_img.T, pos, not_neg)


def same_pair(ids: torch.Tensor, text_ids: torch.Tensor, key_ids: torch.Tensor, key_text_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: key k is no negative of query pair b — the same image, or the same sentence."""
    return (ids.view(-1, 1) == key_ids.view(1, -1)) | (text_ids.view(-1, 1) == key_text_ids.view(1, -1))


def _with_positive_first(sim: torch.Tensor, pos: torch.Tensor, not_neg: torch.Tensor) -> torch.Tensor:
    """(B, G) similarities -> (B, G) logits: positive column first, the other G-1 after it, those
    in ``not_neg`` at -inf."""
    b, g = sim.shape
    rows = torch.arange(b, device=sim.device)
    positive = sim[rows, pos].unsqueeze(1)  # (B, 1)
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[rows, pos] = False
    negatives = sim[keep].view(b, g - 1)
    return torch.cat([positive, negatives.masked_fill(not_neg[keep].view(b, g - 1), NEG_INF)], dim=1)


class QueueNegatives(NegativeSampler):
    """MoCo queue per modality; positives are the momentum keys of the paired other modality."""

    uses_momentum = True

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("queue_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("queue_text_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def _bank_logits(self, q: torch.Tensor, k_pos: torch.Tensor, bank: torch.Tensor, not_neg: torch.Tensor) -> torch.Tensor:
        pos = (q * k_pos).sum(-1, keepdim=True)  # (B, 1)
        neg = q @ bank.T  # (B, K)
        return torch.cat([pos, neg.masked_fill(not_neg, NEG_INF)], dim=1)

    def logits(self, outputs, ids, text_ids):
        # each queue slot holds an (image key, text key) pair enqueued together: one mask serves both banks
        not_neg = same_pair(ids, text_ids, self.queue_ids, self.queue_text_ids) | (self.queue_ids.view(1, -1) < 0)
        i2t = self._bank_logits(outputs["image_emb"], outputs["text_key"], self.text_queue.clone(), not_neg)
        t2i = self._bank_logits(outputs["text_emb"], outputs["image_key"], self.image_queue.clone(), not_neg)
        return i2t, t2i

    @torch.no_grad()
    def update(self, outputs, ids, text_ids):
        """Enqueue the global batch's keys (gathered across ranks), dequeue the oldest."""
        img, txt = all_gather_nograd(outputs["image_key"]), all_gather_nograd(outputs["text_key"])
        kid, tid = all_gather_nograd(ids), all_gather_nograd(text_ids)
        n = img.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not a multiple of the global batch {n}")
        p = int(self.ptr)
        self.image_queue[p : p + n] = img.float()
        self.text_queue[p : p + n] = txt.float()
        self.queue_ids[p : p + n] = kid
        self.queue_text_ids[p : p + n] = tid
        self.ptr.fill_((p + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))


class RerankNegatives(QueueNegatives):
    """Rerank (Ma & Collins): score every key in the bank, keep the top-n hardest as negatives."""

    def __init__(self, size: int, dim: int, top_n: int):
        super().__init__(size, dim)
        if top_n > size:
            raise ValueError(f"rerank top_n {top_n} exceeds the key bank size {size}")
        self.top_n = top_n

    def _bank_logits(self, q, k_pos, bank, not_neg):
        full = super()._bank_logits(q, k_pos, bank, not_neg)  # (B, 1+K), masked at -inf
        hardest = full[:, 1:].topk(self.top_n, dim=1).values  # (B, n): -inf sorts last
        return torch.cat([full[:, :1], hardest], dim=1)


def build_sampler(name: str, *, queue_size: int, dim: int, top_n: int) -> NegativeSampler:
    if name == "batch":
        return BatchNegatives()
    if name == "queue":
        return QueueNegatives(queue_size, dim)
    if name == "rerank":
        return RerankNegatives(queue_size, dim, top_n)
    raise ValueError(f"unknown sampler {name!r} (batch | queue | rerank)")
