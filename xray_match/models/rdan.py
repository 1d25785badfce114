"""RDAN: relation-wise dual attention network (Hu et al., IJCAI 2019; paper: rdan-relation-dual-attention, §3).

Reads top to bottom like §3 of the paper:

* regions  V (B, k, D): precomputed region features ``r_i`` (bottom-up attention, k=36 x 2048) or the
  cells of a CNN's last feature map, mapped to D by one linear layer, Eq. (1);
* words    E (B, n, D): word embedding (300), Eq. (2) -> bidirectional GRU, Eq. (3) -> mean of the two
  directions, Eq. (4);
* relation CNN on the cosine matrix S (k, n) of every (image, caption) pair, Eq. (5-7);
* dual pathway attention, Eq. (8-9), relevances, Eq. (10), similarity F(I, T), Eq. (11).

Readings of the paper's typos and gaps (also in docs/rdan.md):

* Eq. (1): the bias ``b_v`` is a vector in R^D (the paper writes R).
* Eq. (5): s_ij = v_i.e_j / (|v_i| |e_j|) - the paper's denominator has |e_i|, which is not a cosine
  and is undefined for i > n.
* Eq. (9): beta_ij = exp(lambda s^1_ij) / sum_i' exp(lambda s^1_i'j) - a softmax over regions for word
  j; the paper's denominator index (s^1_ii) is a typo. Eq. (10): R_w uses |e_j| |b_j| likewise.
* Eq. (7): the 1x1 layer has no non-linearity (S^1, S^2 may be negative, like the residual S).
* Variable caption lengths: S is zeroed at padded words before the convolutions and again after
  each layer, so every layer sees exactly what the zero padding of an unpadded k x n input would
  give - a padded caption scores exactly like the same caption alone (tested). Padded words get
  no attention in Eq. (8), and Eq. (11) averages R_w over the caption's n real words.
* "one-path" (Table 3): the CNN's last layer gives one map S^1 used by both Eq. (8) and Eq. (9);
  "no-cnn": S^1 = S^2 = S; "no-res": S^1, S^2 without the residual S.

All-pairs scoring is batched: one matmul gives S for a block of B_i images x B_c captions, the
relation CNN runs over the (B_i * B_c) pairs as one conv batch, and Eq. (10) is evaluated without
materialising the attended vectors a_i, b_j (see :meth:`RDAN._similarity`).

The SCAN baseline (:mod:`xray_match.models.scan`) shares the encoders (:func:`build_encoders`), the
cosine matrix (:func:`cosine_all_pairs`), the attention-and-relevance steps (:func:`attend_words`,
:func:`attend_regions`) and the all-pairs scoring (:class:`CrossAttention`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xray_match.models.backbones import RESNET_BLOCKS, GridBackbone

_EPS = 1e-8

# ----------------------------------------------------------------------------- image side

class RegionEncoder(nn.Module):
    """Eq. (1): v_i = W_v r_i + b_v for each region feature r_i (from shards, or from the grid backbone)."""

    def __init__(self, region_dim: int, embed_dim: int, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(region_dim, embed_dim)  # W_v, b_v (b_v in R^D)
        # Xavier init as in SCAN/VSE++ for the region projection
        r = math.sqrt(6.0) / math.sqrt(region_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, 3, H, W) with a backbone, else region features (B, k, d_v) -> V (B, k, D)."""
        regions = self.backbone(x) if self.backbone is not None else x  # (B, k, d_v)
        return self.fc(regions)


# ----------------------------------------------------------------------------- text side


class WordEncoder(nn.Module):
    """Eq. (2-4): one-hot -> 300-d x_i = W_o o_i + b_o -> bi-GRU -> e_i = (h_fwd_i + h_bwd_i) / 2.

    Sequences are packed by length, so the backward GRU starts at each caption's last real word
    and padding never enters a real word's state.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)  # W_o o_i
        self.embed_bias = nn.Parameter(torch.zeros(word_dim))  # b_o
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, n) padded with 0, lengths (B,) >= 1 -> E (B, n, D), zero at padded words."""
        if lengths.min() < 1:
            raise ValueError("WordEncoder: every caption needs at least one word (length >= 1)")
        x = self.embed(tokens) + self.embed_bias  # (B, n, 300)  Eq. (2)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)  # Eq. (3)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # (B, n, 2D)
        return (out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2  # (B, n, D)  Eq. (4)


# ----------------------------------------------------------------------------- relation CNN


class RelationCNN(nn.Module):
    """Eq. (6-7): 3x1 -> 1x3 -> 3x3 convs (``channels`` each, ReLU, size-preserving padding), then a
    1x1 conv to ``out_maps`` maps (2: S^1, S^2; 1 for one-path). Input S (P, k, n) -> (P, out_maps, k, n).

    ``word_mask`` (P, n) marks real words: padded columns are zeroed on the input and after every
    layer, so a padded pair gives exactly the result of its unpadded k x n matrix.
    """

    def __init__(self, channels: int, out_maps: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, channels, (3, 1), padding=(1, 0)),  # tri-gram regions, uni-gram words
                nn.Conv2d(channels, channels, (1, 3), padding=(0, 1)),  # uni-gram regions, tri-gram words
                nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)),  # tri-gram regions and words
            ]
        )
        self.head = nn.Conv2d(channels, out_maps, 1)
        self.channels, self.out_maps = channels, out_maps

    def forward(self, s: torch.Tensor, word_mask: torch.Tensor | None = None) -> torch.Tensor:
        """S (P, k, n), word_mask (P, n) bool or None -> maps (P, out_maps, k, n), zero at padded words.

        Activations are kept channels-last, the layout oneDNN's convolutions run fastest on. Where the
        zeros must be restored: the first layer mixes only regions, so with S zero at padded words its
        output there is just the bias - the bias is masked instead; the second mixes words, so its
        output is masked; the third's output at padded words is never read by a real word's cell (the
        1x1 head is pointwise), so it is masked only on the final 2-channel maps. A mask that is all
        ones (length-bucketed evaluation blocks) is skipped.
        """
        p, k, n = s.shape
        m = None
        if word_mask is not None and not bool(word_mask.all()):
            m = word_mask.to(s.dtype)  # (P, n)
            s = s * m.unsqueeze(1)
        grad = torch.is_grad_enabled()
        relu = Fn.relu if grad else torch.relu_
        conv1, conv2, conv3 = self.convs
        # layer 1 (3x1, one input channel): a 3-tap product per channel; the library conv is slow on
        # one input channel, a contraction over the three shifted copies of S writes (P, k, n, C) directly
        # (the bias rides along as a fourth tap on a column of ones - zeros at padded words)
        sp = Fn.pad(s, (0, 0, 1, 1))  # (P, k+2, n): zero rows above and below, like padding=(1, 0)
        ones = (m[:, None, :] if m is not None else s.new_ones(1, 1, 1)).expand(p, k, n)
        taps = torch.stack([sp[:, 0:k], sp[:, 1 : k + 1], sp[:, 2 : k + 2], ones], dim=-1)  # (P, k, n, 4)
        w1 = torch.cat([conv1.weight.view(self.channels, 3), conv1.bias.view(-1, 1)], dim=1)  # (C, 4)
        x = relu(taps @ w1.t()).permute(0, 3, 1, 2)  # (P, C, k, n), channels-last strides
        x = relu(conv2(x))  # (P, C, k, n)
        if m is not None:
            x = x * m[:, None, None, :] if grad else x.mul_(m[:, None, None, :])
        x = relu(conv3(x))
        # the 1x1 head as a matmul over the channels-last activations (a 1x1 conv there would hand DDP a
        # channels-last weight gradient that does not match its bucket layout)
        out = torch.addmm(self.head.bias, x.permute(0, 2, 3, 1).reshape(-1, self.channels),
                          self.head.weight.view(self.out_maps, self.channels).t())
        out = out.view(p, k, n, self.out_maps).permute(0, 3, 1, 2)  # (P, out_maps, k, n)
        return out * m[:, None, None, :] if m is not None else out

    def flops_per_cell(self) -> int:
        """Multiply-adds x 2 of the four layers per (region, word) cell."""
        c = self.channels
        return 2 * (3 * c + 3 * c * c + 9 * c * c + c * self.out_maps)  # bias, ReLU, mask not counted


# ----------------------------------------------------------------------------- RDAN


def cosine_all_pairs(v: torch.Tensor, e: torch.Tensor, v_norm: torch.Tensor | None = None,
                     e_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (5), s_ij = v_i.e_j / (|v_i| |e_j|), for every image of v (B_i, k, D) and caption of
    e (B_c, n, D) -> (B_i, B_c, k, n), with one (B_i k) x (B_c n) matmul. Zero word vectors (padding)
    give zero columns."""
    b_i, k, d = v.shape
    b_c, n, _ = e.shape
    v_norm = v.norm(dim=-1).clamp_min(_EPS) if v_norm is None else v_norm  # (B_i, k)
    e_norm = e.norm(dim=-1).clamp_min(_EPS) if e_norm is None else e_norm  # (B_c, n)
    v_hat, e_hat = v / v_norm.unsqueeze(-1), e / e_norm.unsqueeze(-1)
    s = (v_hat.reshape(b_i * k, d) @ e_hat.reshape(b_c * n, d).t()).view(b_i, k, b_c, n)
    return s.permute(0, 2, 1, 3)  # (B_i, B_c, k, n)


def attend_words(logits: torch.Tensor, s: torch.Tensor, e: torch.Tensor, e_norm: torch.Tensor,
                 word_mask: torch.Tensor) -> torch.Tensor:
    """Attention over a caption's words for each region, then each region's relevance to its attended
    vector: RDAN Eq. (8) + (10) R_r (logits lambda S^2-hat), SCAN's image-text formulation (logits
    lambda_1 s-bar). Shared by both models.

    alpha_ij = exp(logit_ij) / sum_j' exp(logit_ij') over the real words j' (padded words get none),
    a_i = sum_j alpha_ij e_j, R(v_i, a_i) = cos(v_i, a_i). ``logits`` and the cosines ``s`` (A, B, k, n),
    the words ``e`` (1|A, B, n, D) with norms ``e_norm`` (1|A, B, n), ``word_mask`` (1|A, B, n) ->
    (A, B, k). a_i is never materialised: with P_ij = v_i.e_j = s_ij |v_i| |e_j|, v_i.a_i / |v_i| =
    sum_j alpha_ij s_ij |e_j| and |a_i|^2 = alpha_i^T G alpha_i with the words' Gram matrix G = E E^T.
    """
    alpha = torch.softmax(logits.masked_fill(~word_mask.unsqueeze(2), float("-inf")), dim=-1)  # (A, B, k, n)
    gram = e @ e.transpose(-1, -2)  # (1|A, B, n, n)  G = E E^T
    a_sq = (torch.einsum("abxn,abnm->abxm", alpha, gram) * alpha).sum(-1)  # (A, B, k) |a_i|^2
    va = (alpha * s * e_norm.unsqueeze(2)).sum(-1)  # (A, B, k)  v_i.a_i / |v_i|
    return va / a_sq.clamp_min(0).sqrt().clamp_min(_EPS)


def attend_regions(logits: torch.Tensor, s: torch.Tensor, v: torch.Tensor, v_norm: torch.Tensor,
                   word_mask: torch.Tensor) -> torch.Tensor:
    """Attention over the regions for each word, then each word's relevance to its attended vector:
    RDAN Eq. (9) + (10) R_w (logits lambda S^1-hat), SCAN's text-image formulation (logits lambda_1 s').

    beta_ij = exp(logit_ij) / sum_i' exp(logit_i'j), b_j = sum_i beta_ij v_i, R(e_j, b_j) = cos(e_j, b_j).
    ``logits``, ``s`` (A, B, k, n), regions ``v`` (A|1, B|1, k, D), ``v_norm`` (A|1, B|1, k),
    ``word_mask`` (1|A, B, n) -> (A, B, n), zero at padded words. As in :func:`attend_words`, b_j is not
    materialised: |b_j|^2 = beta_j^T H beta_j with H = V V^T.
    """
    beta = torch.softmax(logits, dim=2)  # (A, B, k, n) over regions
    gram_v = v @ v.transpose(-1, -2)  # (A|1, B|1, k, k)  H = V V^T
    b_sq = (torch.einsum("abxy,abyn->abxn", gram_v, beta) * beta).sum(2)  # (A, B, n) |b_j|^2
    eb = (beta * s * v_norm.unsqueeze(-1)).sum(2)  # (A, B, n)  e_j.b_j / |e_j|
    return eb / b_sq.clamp_min(0).sqrt().clamp_min(_EPS) * word_mask


def word_mask_of(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(1, B) caption lengths -> (1, B, n) bool, True at real words."""
    return torch.arange(n, device=lengths.device).view(1, 1, -1) < lengths.unsqueeze(-1)


class CrossAttention(nn.Module):
    """What every region-word cross-attention matcher shares (RDAN, SCAN): the two encoders, and
    scoring an image-text similarity for all pairs of a block (:meth:`pair_scores`) or for given pairs
    (:meth:`paired_scores`) from the cosine matrix S, Eq. (5). A subclass defines ``_similarity``.

    ``forward(batch)`` -> ``{"scores": (B_img, B_cap), "embed_scores": (B_img, B_cap)}``; the inputs are
    ``batch["images"]`` (B, 3, H, W) or ``batch["regions"]`` (B, k, d_v), and ``batch["tokens"]``
    (B_cap, n), ``batch["lengths"]`` (B_cap,).
    """

    def __init__(self, regions: RegionEncoder, words: WordEncoder):
        super().__init__()
        self.regions, self.words = regions, words

    # ---- encoders ------------------------------------------------------------------------
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) or region features (B, k, d_v) -> V (B, k, D)."""
        return self.regions(x)

    def encode_texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, n), lengths (B,) -> E (B, n, D)."""
        return self.words(tokens, lengths)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["regions"] if "regions" in batch else batch["images"]
        v = self.encode_images(x)  # (B_i, k, D)
        e = self.encode_texts(batch["tokens"], batch["lengths"])  # (B_c, n, D)
        return {"scores": self.pair_scores(v, e, batch["lengths"]),
                "embed_scores": self.pooled_scores(v, e, batch["lengths"])}

    @staticmethod
    def pooled(v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cheap embedding of the two-stage shortlist: mean region (B_i, D) and mean real word
        (B_c, D), L2-normalised (:mod:`xray_match.metrics.two_stage`)."""
        words = e.sum(1) / lengths.to(e.device).clamp_min(1).unsqueeze(1).to(e.dtype)  # padding is zero
        return Fn.normalize(v.mean(1), dim=-1), Fn.normalize(words, dim=-1)

    def pooled_scores(self, v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B_i, B_c) cosine of the pooled features; trained by the auxiliary embedding loss."""
        img, txt = self.pooled(v, e, lengths)
        return img @ txt.t()

    # ---- the similarity for all pairs of a block, or for given pairs ------------------------
    def pair_scores(self, v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The similarity of every image of ``v`` (B_i, k, D) with every caption of ``e`` (B_c, n, D)
        with ``lengths`` (B_c,) -> (B_i, B_c). S for the whole block is one matmul."""
        v_norm = v.norm(dim=-1).clamp_min(_EPS)  # (B_i, k)
        e_norm = e.norm(dim=-1).clamp_min(_EPS)  # (B_c, n)
        s = cosine_all_pairs(v, e, v_norm, e_norm)  # (B_i, B_c, k, n)
        lengths = lengths.to(e.device).view(1, -1)
        return self._similarity(s, v[:, None], e[None], v_norm[:, None], e_norm[None], lengths)

    def paired_scores(self, v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The similarity of P given pairs: image ``v[p]`` (P, k, D) with caption ``e[p]`` (P, n, D),
        ``lengths`` (P,) -> (P,), the diagonal of ``pair_scores(v, e, lengths)`` at 1/P of its cost.

        A sparse set of pairs (a two-stage shortlist, :func:`xray_match.metrics.xattn.score_pairs`)
        is then scored in one batched call per block instead of one image's captions at a time.
        """
        v_norm = v.norm(dim=-1).clamp_min(_EPS)  # (P, k)
        e_norm = e.norm(dim=-1).clamp_min(_EPS)  # (P, n)
        # Eq. (5): the products divided by the norms, (P, k, n) - normalising the per-pair copies of
        # v and e instead would divide P (k + n) D elements, more than the relation CNN's first layer
        s = (v @ e.transpose(1, 2)) / (v_norm.unsqueeze(-1) * e_norm.unsqueeze(1))
        lengths = lengths.to(e.device).view(1, -1)
        return self._similarity(s[None], v[None], e[None], v_norm[None], e_norm[None], lengths)[0]

    def _similarity(self, s: torch.Tensor, v: torch.Tensor, e: torch.Tensor, v_norm: torch.Tensor,
                    e_norm: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The image-text similarity of an A x B grid of pairs given their cosines ``s`` (A, B, k, n)
        -> (A, B). The per-image inputs ``v`` (A|1, B|1, k, D), ``v_norm`` (A|1, B|1, k) and the
        per-caption ``e`` (1, B, n, D), ``e_norm`` (1, B, n), ``lengths`` (1, B) broadcast over the
        grid: all pairs of a block (A = B_i images x B = B_c captions, images on the first axis) and
        P given pairs (A = 1, B = P, both on the second axis) run the same code."""
        raise NotImplementedError


class RDAN(CrossAttention):
    """Image-text similarity F(I, T), Eq. (11), for every image against every caption of a batch
    (encoders, all-pairs and given-pairs scoring from :class:`CrossAttention`)."""

    def __init__(
        self,
        regions: RegionEncoder,
        words: WordEncoder,
        *,
        relation_channels: int,
        lambda_: float,
        mu: float,
        one_path: bool,
        use_cnn: bool,
        use_residual: bool,
    ):
        super().__init__(regions, words)
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu must lie in [0, 1], got {mu}")
        if not use_cnn and not use_residual:
            raise ValueError("use_cnn=False with use_residual=False leaves no matrix to attend on")
        self.relation = RelationCNN(relation_channels, 1 if one_path else 2) if use_cnn else None
        self.lambda_, self.mu = float(lambda_), float(mu)
        self.one_path, self.use_cnn, self.use_residual = one_path, use_cnn, use_residual

    # ---- Eq. (5-11) for all pairs ----------------------------------------------------------
    def relation_maps(self, s: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (6-7): S (P, k, n) -> (S^1-hat, S^2-hat), each (P, k, n)."""
        if self.relation is None:  # no-cnn: attend on the cosine matrix itself
            return s, s
        maps = self.relation(s, word_mask)  # (P, 1 or 2, k, n)
        if self.use_residual:
            maps = maps + s.unsqueeze(1)  # Eq. (7): S^t-hat = S^t (+) S
        if self.one_path:
            return maps[:, 0], maps[:, 0]
        return maps[:, 0], maps[:, 1]

    def _similarity(self, s: torch.Tensor, v: torch.Tensor, e: torch.Tensor, v_norm: torch.Tensor,
                    e_norm: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Eq. (6-11) for an A x B grid of pairs given their cosines ``s`` (A, B, k, n) -> (A, B)
        (shapes as in :meth:`CrossAttention._similarity`). Eq. (8-10) are :func:`attend_words` and
        :func:`attend_regions`, which evaluate Eq. (10) without materialising a_i, b_j: k n^2 + n k^2
        per pair instead of 2 k n D.
        """
        a, b, k, n = s.shape
        word_mask = word_mask_of(lengths, n)  # (1, B, n)
        pair_mask = word_mask.expand(a, b, n).reshape(a * b, n)  # (P, n), pair p = i * B + c
        s = s * word_mask.unsqueeze(2)
        s1, s2 = self.relation_maps(s.reshape(a * b, k, n), pair_mask)  # (P, k, n) each
        scores = s.new_zeros(a, b)
        if self.mu < 1.0:  # region relevance pathway: Eq. (8) over words, R_r of Eq. (10)
            r_r = attend_words((self.lambda_ * s2).view(a, b, k, n), s, e, e_norm, word_mask)  # (A, B, k)
            scores = scores + (1.0 - self.mu) * r_r.mean(-1)  # Eq. (11), mean over the k regions
        if self.mu > 0.0:  # word relevance pathway: Eq. (9) over regions, R_w of Eq. (10)
            r_w = attend_regions((self.lambda_ * s1).view(a, b, k, n), s, v, v_norm, word_mask)  # (A, B, n)
            scores = scores + self.mu * r_w.sum(-1) / lengths.to(r_w.dtype)  # Eq. (11), over n words
        return scores  # (A, B)

    def pair_flops(self, k: int, n: int, d: int) -> int:
        """FLOPs of :meth:`pair_scores` per (image, caption) pair with k regions, n (padded) words:
        the cosine matmul, the relation convs, and the Eq. (8-10) contractions (the per-image and
        per-caption norms and Gram matrices are amortised over the block and left out)."""
        flops = 2 * k * n * d  # Eq. (5)
        if self.relation is not None:
            flops += self.relation.flops_per_cell() * k * n
        if self.mu < 1.0:
            flops += 2 * k * n * n + 6 * k * n
        if self.mu > 0.0:
            flops += 2 * n * k * k + 6 * k * n
        return flops


def build_encoders(vocab_size: int, *, region_source: str, backbone: str, backbone_width: int, grid: int,
                   region_dim: int, embed_dim: int, word_dim: int, gru_layers: int) -> tuple[RegionEncoder, WordEncoder]:
    """Eq. (1) regions (grid cells of a CNN trained from pixels, or precomputed features) and Eq. (2-4)
    words; shared by RDAN and SCAN, whose inputs are the same."""
    if region_source == "grid":
        if backbone not in RESNET_BLOCKS:
            raise ValueError(f"backbone: {backbone!r} is not one of {sorted(RESNET_BLOCKS)}")
        net = GridBackbone(RESNET_BLOCKS[backbone], width=backbone_width, grid=grid)
        regions = RegionEncoder(net.out_dim, embed_dim, backbone=net)
    elif region_source == "precomputed":
        regions = RegionEncoder(region_dim, embed_dim)
    else:
        raise ValueError(f"region_source: {region_source!r} is not 'grid' or 'precomputed'")
    return regions, WordEncoder(vocab_size, word_dim, embed_dim, gru_layers)


def build_rdan(
    vocab_size: int,
    *,
    region_source: str,
    backbone: str,
    backbone_width: int,
    grid: int,
    region_dim: int,
    embed_dim: int,
    word_dim: int,
    gru_layers: int,
    relation_channels: int,
    lambda_: float,
    mu: float,
    one_path: bool,
    use_cnn: bool,
    use_residual: bool,
) -> RDAN:
    """Numbers in, module out (the recipe reads the config; the defaults live in RDANConfig)."""
    regions, words = build_encoders(vocab_size, region_source=region_source, backbone=backbone,
                                    backbone_width=backbone_width, grid=grid, region_dim=region_dim,
                                    embed_dim=embed_dim, word_dim=word_dim, gru_layers=gru_layers)
    return RDAN(regions, words, relation_channels=relation_channels, lambda_=lambda_, mu=mu, one_path=one_path,
                use_cnn=use_cnn, use_residual=use_residual)
