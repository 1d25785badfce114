"""Weakly supervised attention grounding with MCB (paper: grounding-mcb-attention, §2, Fig. 2).

A dense backbone F gives feature maps ``f = F(I)``; the top-down signal (a one-hot label through a
128-unit dense layer, §3, or a GRU over the words of a phrase, §2.2) is tiled over the map and fused
with every pixel's feature by MCB; two 1x1 convolutions turn the fused map into a one-channel
attention map ``r = A(f, O)``; the classifier C sees the attention-weighted features, ``C(f ⊗ r)``.

Readings where the paper is silent (docs/grounding.md):

* ``r = sigmoid(·)``: the paper names no output nonlinearity. A sigmoid keeps r in (0, 1), so the
  L2 penalty R (Eq. (3)) pulls it towards a blank map, a fixed threshold turns it into boxes, and an
  absent query can yield a near-empty map (Fig. 3).
* ``C(f ⊗ r)`` is a linear classifier on the global *average* of ``r · f`` over pixels. Averaging
  (not ``Σ r f / Σ r``) matters: with a normalised pooling R could shrink r uniformly at no cost
  to the classifier; with the average, evidence only reaches C where r is large, so CE and R
  trade coverage against sparsity, which is what the β ablation of Table 1 measures.
* C is linear *without a bias*, and in the fine-tune schema starts from the stage-1 classifier
  (the classifier of the pretrained classification model, trained at the backbone's rate). Then
  the only cheap way to make C say "7" is to pool features the backbone already reads as a 7.
  A freshly initialised C with a bias let the attention encode the query in *where it does not
  look* (background for one digit, a blank map for another) at 99.7% classification accuracy
  and 14% Avg IoU in our first runs — weak supervision needs C to mean "digit", not "code".
* "tiled to the feature map": the tiled query vector is the same at every pixel, so its sketch and
  FFT are computed once per query and broadcast — identical to tiling, without the copy.
* the two 1x1 convolutions are per-pixel linear maps applied on the channels-last MCB output
  (the same operation as ``nn.Conv2d(k=1)``, without transposing a (Q, H, W, d) tensor).
* ``fused=True`` computes MCB followed by the first 1x1 convolution through the exact
  re-association :meth:`~xray_match.models.mcb.CompactBilinearPooling.fused_linear` — the same
  numbers (tested) without the per-pixel d-point FFTs, which dominate the cost otherwise (on CPU,
  about 80% of a training step at d = 256). ``fused=False`` runs the literal per-pixel MCB. Both
  use the same parameters, so a checkpoint loads into either.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from xray_match.models.mcb import CompactBilinearPooling


class LabelQuery(nn.Module):
    """§3: one-hot class label -> a ``dim``-unit dense layer: ``(Q,) long -> (Q, dim)``."""

    def __init__(self, num_classes: int = 10, dim: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(num_classes, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"LabelQuery: labels must lie in [0, {self.num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return self.fc(F.one_hot(labels.long(), self.num_classes).float())  # (Q, dim)


class PhraseQuery(nn.Module):
    """§2.2 / Fig. 2: word embeddings -> GRU -> last hidden state: ``(Q, L), (Q,) -> (Q, dim)``."""

    def __init__(self, vocab_size: int, dim: int = 128, word_dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, dim, batch_first=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h = self.gru(packed)  # h: (1, Q, dim), the state after each phrase's last word
        return h[0]


class MCBGrounder(nn.Module):
    """Backbone + query encoder + MCB attention + classifier (Fig. 2).

    ``forward(batch)`` takes ``image`` (B, c, H, W), ``query`` (Q,) class ids (or ``query_tokens``
    (Q, L) + ``query_lengths`` (Q,) with a :class:`PhraseQuery`), and ``query_image`` (Q,) — the
    image each query is asked about, so several queries share one backbone pass. It returns
    ``attention`` r (Q, H, W) in (0, 1), ``pooled`` (Q, C) = mean over pixels of r·f (the
    "attentive high-lightened features" f' of Eq. (2)) and ``logits`` (Q, num_classes) = C(f ⊗ r).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, query: nn.Module, query_dim: int,
                 num_classes: int = 10, mcb_dim: int = 2048, head_hidden: int = 512, mcb_seed: int = 0,
                 fused: bool = True, norm: str = "l2"):
        super().__init__()
        if norm not in ("none", "l2", "sqrt_l2"):
            raise ValueError(f"MCBGrounder: norm {norm!r} is not one of none, l2, sqrt_l2")
        if fused and norm == "sqrt_l2":
            raise ValueError("MCBGrounder: the signed square root has no fused form; use fused=False or norm='l2'")
        self.fused, self.norm = fused, norm
        self.backbone = backbone
        self.query = query
        self.mcb = CompactBilinearPooling(feature_dim, query_dim, mcb_dim, seed=mcb_seed)
        # "two 1x1 convolutional layers ... generate a one channel attentive map" (§3)
        self.head = nn.Sequential(nn.Linear(mcb_dim, head_hidden), nn.ReLU(inplace=True), nn.Linear(head_hidden, 1))
        # no bias: an empty map must carry no evidence for any class; with a bias "attend nothing"
        # becomes a code for one class and the map stops grounding (seen in our first CPU runs)
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False)

    # ---- pieces (evaluation reuses one backbone pass for many queries) ---------------------
    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)  # (B, C, H, W)

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        if isinstance(self.query, PhraseQuery):
            return self.query(batch["query_tokens"], batch["query_lengths"])  # (Q, D)
        return self.query(batch["query"])  # (Q, D)

    def attend(self, feats: torch.Tensor, q: torch.Tensor, query_image: torch.Tensor) -> torch.Tensor:
        """Attention map r (Q, H, W) in (0, 1) for query vectors ``q`` (Q, D) on ``feats`` (B, C, H, W)."""
        first, act, last = self.head
        if self.fused:
            a = self.mcb.fused_linear(q, first.weight)  # (Q, C, hidden): MCB + first 1x1 conv, per query
            x = feats.permute(0, 2, 3, 1)[query_image].flatten(1, 2).float()  # (Q, HW, C)
            z = torch.bmm(x, a)  # (Q, HW, hidden) = first.weight @ MCB(x, q), bias not yet added
            if self.norm == "l2":
                sq = (torch.bmm(x, self.mcb.fused_gram(q)) * x).sum(-1, keepdim=True)  # (Q, HW, 1) = ||MCB||²
                z = z / sq.clamp(min=0).sqrt().clamp(min=1e-12)
            z = (z + first.bias).unflatten(1, feats.shape[2:])  # (Q, H, W, hidden)
        else:
            fx = self.mcb.spectrum_x(feats.permute(0, 2, 3, 1))  # (B, H, W, d/2+1): one sketch per image
            fy = self.mcb.spectrum_y(q)[:, None, None, :]  # (Q, 1, 1, d/2+1): tiled by broadcasting
            z = self.mcb.combine(fx[query_image], fy)  # (Q, H, W, d)
            if self.norm == "sqrt_l2":
                z = torch.sign(z) * z.abs().clamp(min=1e-12).sqrt()
            if self.norm != "none":
                z = F.normalize(z, dim=-1)
            z = first(z)  # (Q, H, W, hidden)
        return torch.sigmoid(last(act(z)).squeeze(-1).float())  # (Q, H, W)

    def classify(self, feats: torch.Tensor, r: torch.Tensor, query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (Q, C), logits (Q, K))``: C applied to the average of r·f over pixels."""
        pooled = (feats[query_image].float() * r[:, None]).mean(dim=(2, 3))  # (Q, C)
        return pooled, self.classifier(pooled)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        feats = self.features(batch["image"])  # (B, C, H, W)
        query_image = batch["query_image"]  # (Q,)
        r = self.attend(feats, self.encode_query(batch), query_image)  # (Q, H, W)
        pooled, logits = self.classify(feats, r, query_image)
        return {"attention": r, "pooled": pooled, "logits": logits}


__all__ = ["LabelQuery", "PhraseQuery", "MCBGrounder"]
