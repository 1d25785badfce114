"""SCAN: stacked cross attention (Lee et al., *Stacked Cross Attention for Image-Text Matching*, ECCV
2018), the main baseline of the RDAN paper (docs/rdan.md, "SCAN baseline").

The inputs are RDAN's: regions V (B, k, D) from the same grid CNN or precomputed features, words
E (B, n, D) from the same bi-GRU, and the same cosine matrix s_ij = cos(v_i, e_j) (RDAN Eq. (5)).
What differs is how S becomes a score; two formulations, one per model:

* image-text (``"i-t"``): attend to the words for each region, compare each region with its attended
  sentence vector, pool over the k regions:
      s-bar_ij = [s_ij]_+ / sqrt(sum_i [s_ij]_+^2)                       clipped, l2-normalised over regions
      alpha_ij = exp(lambda_1 s-bar_ij) / sum_j exp(lambda_1 s-bar_ij)  softmax over the real words
      a_i^t = sum_j alpha_ij e_j,  R(v_i, a_i^t) = cos(v_i, a_i^t)
* text-image (``"t-i"``), the mirror: attend to the regions for each word, pool over the n real words:
      s'_ij = [s_ij]_+ / sqrt(sum_j [s_ij]_+^2)                          clipped, l2-normalised over words
      alpha'_ij = exp(lambda_1 s'_ij) / sum_i exp(lambda_1 s'_ij)       softmax over the regions
      a_j^v = sum_i alpha'_ij v_i,  R(e_j, a_j^v) = cos(e_j, a_j^v)
* pooling of the relevances R_1..R_m (m = k regions or n words):
      S_AVG = (1/m) sum R_m            S_LSE = (1/lambda_2) log sum exp(lambda_2 R_m)

In each formulation the normalisation runs over the *query* axis and the softmax over the attended
axis, as in SCAN's paper and its released code. The attention + relevance steps are RDAN's Eq. (8)/(10)
and Eq. (9)/(10) with other logits and are the same functions (:func:`~xray_match.models.rdan.attend_words`,
:func:`~xray_match.models.rdan.attend_regions`); so are the encoders and all-pairs scoring
(:class:`~xray_match.models.rdan.CrossAttention`). Differences from the released code (docs/rdan.md):
it clips with LeakyReLU(0.1) where the paper writes [x]_+ (here: [x]_+).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from xray_match.models.rdan import (
    _EPS,
    CrossAttention,
    RegionEncoder,
    WordEncoder,
    attend_regions,
    attend_words,
    build_encoders,
    word_mask_of,
)

DIRECTIONS = ("t-i", "i-t")
POOLINGS = ("avg", "lse")


def clipped_l2norm(s: torch.Tensor, dim: int) -> torch.Tensor:
    """SCAN's normalised similarity: [s]_+ / sqrt(sum over ``dim`` of [s]_+^2). ``dim`` = the region
    axis for image-text (s-bar), the word axis for text-image (s'). A slice with no positive entry
    stays zero (its attention is then uniform). The squared norm is clamped before the square root:
    sqrt's gradient at 0 is infinite, and 0 x inf would make the gradient NaN (padded words are such
    slices in every batch)."""
    clipped = s.clamp_min(0)
    return clipped / clipped.pow(2).sum(dim, keepdim=True).clamp_min(_EPS**2).sqrt()


def pool_avg(r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """S_AVG = mean of the relevances R (..., m) over the last axis, over ``mask``'s True entries only."""
    if mask is None:
        return r.mean(-1)
    return (r * mask).sum(-1) / mask.sum(-1).clamp_min(1).to(r.dtype)


def pool_lse(r: torch.Tensor, lambda_2: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """S_LSE = (1/lambda_2) log sum exp(lambda_2 R) over the last axis (``mask``'s True entries only):
    a soft maximum of the relevances, the mean's opposite end as lambda_2 grows."""
    x = lambda_2 * r
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(x, dim=-1) / lambda_2


class SCAN(CrossAttention):
    """S(I, T) of SCAN for every image against every caption of a batch (``forward``, ``pair_scores``,
    ``paired_scores`` from :class:`CrossAttention`).

    ``feature_norm``: the regions and words are L2-normalised after the encoders, as SCAN's released
    code does ("normalization in the joint embedding space"); the equations then see unit vectors.
    """

    def __init__(self, regions: RegionEncoder, words: WordEncoder, *, direction: str, pooling: str,
                 lambda_1: float, lambda_2: float, feature_norm: bool):
        super().__init__(regions, words)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if lambda_1 <= 0 or lambda_2 <= 0:
            raise ValueError(f"lambda_1 and lambda_2 must be > 0, got {lambda_1}, {lambda_2}")
        self.direction, self.pooling = direction, pooling
        self.lambda_1, self.lambda_2, self.feature_norm = float(lambda_1), float(lambda_2), bool(feature_norm)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        v = super().encode_images(x)  # (B, k, D)
        return Fn.normalize(v, dim=-1) if self.feature_norm else v

    def encode_texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        e = super().encode_texts(tokens, lengths)  # (B, n, D), zero at padded words (they stay zero)
        return Fn.normalize(e, dim=-1) if self.feature_norm else e

    def _pool(self, r: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return pool_avg(r, mask) if self.pooling == "avg" else pool_lse(r, self.lambda_2, mask)

    def _similarity(self, s: torch.Tensor, v: torch.Tensor, e: torch.Tensor, v_norm: torch.Tensor,
                    e_norm: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """S_AVG or S_LSE for an A x B grid of pairs given their cosines ``s`` (A, B, k, n) -> (A, B)
        (shapes as in :meth:`CrossAttention._similarity`). Padded words are zero in S, get no
        attention and are left out of the pooling, so a padded caption scores like the caption alone."""
        a, b, k, n = s.shape
        word_mask = word_mask_of(lengths, n)  # (1, B, n)
        s = s * word_mask.unsqueeze(2)
        if self.direction == "i-t":
            s_bar = clipped_l2norm(s, dim=2)  # over the regions
            r = attend_words(self.lambda_1 * s_bar, s, e, e_norm, word_mask)  # (A, B, k)  R(v_i, a_i^t)
            return self._pool(r, None)  # over the k regions
        s_bar = clipped_l2norm(s, dim=3)  # over the words (padded ones are zero: no contribution)
        r = attend_regions(self.lambda_1 * s_bar, s, v, v_norm, word_mask)  # (A, B, n)  R(e_j, a_j^v)
        return self._pool(r, word_mask.expand(a, b, n))  # over the real words

    def pair_flops(self, k: int, n: int, d: int) -> int:
        """FLOPs of :meth:`pair_scores` per (image, caption) pair (as ``RDAN.pair_flops``, no relation CNN)."""
        flops = 2 * k * n * d + 8 * k * n  # cosines, clip + normalisation + logits
        return flops + (2 * k * n * n if self.direction == "i-t" else 2 * n * k * k) + 6 * k * n


def build_scan(vocab_size: int, *, region_source: str, backbone: str, backbone_width: int, grid: int,
               region_dim: int, embed_dim: int, word_dim: int, gru_layers: int, direction: str, pooling: str,
               lambda_1: float, lambda_2: float, feature_norm: bool) -> SCAN:
    """Numbers in, module out (the recipe reads the config; the defaults live in SCANConfig). The
    encoders are RDAN's (:func:`~xray_match.models.rdan.build_encoders`)."""
    regions, words = build_encoders(vocab_size, region_source=region_source, backbone=backbone,
                                    backbone_width=backbone_width, grid=grid, region_dim=region_dim,
                                    embed_dim=embed_dim, word_dim=word_dim, gru_layers=gru_layers)
    return SCAN(regions, words, direction=direction, pooling=pooling, lambda_1=lambda_1, lambda_2=lambda_2,
                feature_norm=feature_norm)

