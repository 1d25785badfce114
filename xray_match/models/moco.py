"""Intermodal contrastive model (paper: intermodal-contrastive-gaze, §2.2, Fig. 2).

Student nets: a ResNet vision net (2048-d for ResNet-50) and a text net (pretrained transformer
token embeddings + 1-layer LSTM, 768-d). Teacher nets: one fully connected encoder per modality
(Linear, LeakyReLU, Dropout) into a shared space (100-d). Embeddings are L2-normalised so the
dot product of Eq. (1) is a cosine similarity (as in MoCo; the paper says "dot product").

``feature_norm`` puts a BatchNorm without affine parameters between each student and its teacher.
Not in the paper; it is what makes two random towers start learning from scratch: a ResNet's pooled
ReLU features and an LSTM's states share a large common component (mean pairwise cosine 0.99 at
initialisation), and the teachers then see almost no difference between samples. Standardising
each feature over the batch removes it (measurements in docs/moco.md).

For queue/rerank sampling a momentum copy of each branch produces keys (MoCo). The frozen
transformer is shared by both text branches: it never changes, so its EMA copy would equal it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xray_match.models.encoders.text import TokenFeatures


class Teacher(nn.Module):
    """Fully connected encoder: [Linear -> LeakyReLU -> Dropout]* -> Linear (no bias).

    The last layer has no bias: before L2 normalisation a shared bias is a direction every
    embedding can move to at once, the collapsed solution (loss ln B) that we saw training fall
    into from scratch."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, dropout: float = 0.1, slope: float = 0.01):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LeakyReLU(slope), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, out_dim, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Branch(nn.Module):
    """student -> [BatchNorm, no affine] -> teacher -> L2 normalisation."""

    def __init__(self, student: nn.Module, teacher: Teacher, norm: nn.Module | None = None):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.norm = norm or nn.Identity()

    def forward(self, *args: Any) -> torch.Tensor:
        return F.normalize(self.teacher(self.norm(self.student(*args).float())), dim=-1)


class IntermodalModel(nn.Module):
    def __init__(self, vision: nn.Module, vision_dim: int, tokens: TokenFeatures, text_head: nn.Module,
                 teacher_hidden: list[int], embed_dim: int, dropout: float, momentum_keys: bool,
                 feature_norm: bool = True):
        super().__init__()
        self.tokens = tokens
        norm = lambda d: nn.BatchNorm1d(d, affine=False) if feature_norm else None  # noqa: E731
        self.image = Branch(vision, Teacher(vision_dim, teacher_hidden, embed_dim, dropout), norm(vision_dim))
        self.text = Branch(text_head, Teacher(text_head.dim, teacher_hidden, embed_dim, dropout), norm(text_head.dim))
        self.image_key = self.text_key = None
        if momentum_keys:
            self.image_key = copy.deepcopy(self.image).requires_grad_(False)
            self.text_key = copy.deepcopy(self.text).requires_grad_(False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image(image)  # (B, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(self.tokens(input_ids, attention_mask), attention_mask)  # (B, D)

    def forward(self, batch: dict[str, torch.Tensor], keys: bool = True) -> dict[str, torch.Tensor]:
        """Embeddings, and with ``keys`` (and momentum encoders) the momentum keys too."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tok = self.tokens(ids, mask)
        out = {"image_emb": self.image(batch["image"]), "text_emb": self.text(tok, mask)}
        return out | self.momentum_keys(batch, tok) if keys else out

    @torch.no_grad()
    def momentum_keys(self, batch: dict[str, torch.Tensor], tok: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"image_key", "text_key"}`` (B, D) from the momentum encoders; empty without them."""
        if self.image_key is None:
            return {}
        mask = batch["attention_mask"]
        tok = self.tokens(batch["input_ids"], mask) if tok is None else tok
        return {"image_key": self.image_key(batch["image"]), "text_key": self.text_key(tok.detach(), mask)}

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """MoCo: key <- m * key + (1 - m) * query, parameters and buffers (BN statistics copied)."""
        for q, k in ((self.image, self.image_key), (self.text, self.text_key)):
            if k is None:
                continue
            for pq, pk in zip(q.parameters(), k.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)
            for bq, bk in zip(q.buffers(), k.buffers()):
                bk.copy_(bq)

    def train(self, mode: bool = True) -> "IntermodalModel":
        super().train(mode)
        for k in (self.image_key, self.text_key):
            if k is not None:
                k.train(mode)  # BN batch statistics for keys too, as MoCo (no shuffle-BN here)
        return self
