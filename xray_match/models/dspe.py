"""DSPE two-branch embedding network (Wang, Li, Lazebnik, CVPR 2016, §3.1 and Fig. 1).

Each view (X: images or regions, Y: sentences or phrases) has its own branch of two fully connected
layers with a ReLU between them; the output is batch-normalized and L2-normalized ("feature
normalization (L2 and batch normalization) before the embedding loss layer"). The paper's sizes:

==========================  ==================  =================
input                        layer outputs       preset
==========================  ==================  =================
VGG 4096 / FV 6000 / tf-idf  [2048, 512]         dspe_paper
word2vec mean 300            [1024, 256]         dspe_paper_wordvec
phrase localization          [8192, 4096]        dspe_phrase_paper
==========================  ==================  =================

The two branches do not share weights (their inputs differ in size; the slides' "two branches
share weights" can only mean they share the design). Image features come from a CNN trained
jointly from scratch (a torchvision ResNet's pooled features; no ImageNet weights ship offline)
or are precomputed (``regions.npy`` of a shard sample, mean-pooled by the recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Branch(nn.Module):
    """``Linear(in, hidden) -> ReLU -> [Dropout] -> Linear(hidden, out) -> BatchNorm1d -> L2``.

    Fig. 1: W1/V1 then W2/V2 with a ReLU between them. Batch norm before the L2 normalization makes
    every embedding coordinate start at unit scale whatever the input features' scale (tf-idf
    entries are ~0.3, pooled CNN features ~1), so the margin m means the same on both sides.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.fc1(x)))  # (B, hidden)
        return F.normalize(self.bn(self.fc2(h)), dim=-1)  # (B, out)


class DSPE(nn.Module):
    """``forward(batch) -> {"image_emb": (n_x, D), "text_emb": (n_y, D)}``.

    ``batch["image"]`` is either pixels (n_x, 3, H, W), encoded by ``image_encoder`` (pooled CNN
    features), or precomputed features (n_x, image_dim) when ``image_encoder`` is None;
    ``batch["text"]`` holds fixed text features (n_y, text_dim) (tf-idf, mean word vectors or FV).
    """

    def __init__(self, image_encoder: nn.Module | None, image_dim: int, text_dim: int, image_hidden: int,
                 text_hidden: int, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_branch = Branch(image_dim, image_hidden, embed_dim, dropout)
        self.text_branch = Branch(text_dim, text_hidden, embed_dim, dropout)
        self.embed_dim = embed_dim

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.image_encoder(image) if self.image_encoder is not None else image  # (n_x, image_dim)
        return self.image_branch(feats.flatten(1).float())

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_branch(text.float())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image_emb": self.encode_image(batch["image"]), "text_emb": self.encode_text(batch["text"])}
