"""All-pairs scoring for cross-attention models (RDAN, SCAN-like): every image against every caption.

A cross-attention model has no embeddings to compare with one matmul: F(I, T) needs both inputs
(COCO 5K: 5,000 x 25,000 = 125M pairs). Reference code loops in Python over captions and scores one
caption against a shard of images at a time. Here a ``pair_scores(v, e, lengths)`` callable scores a
whole block of B_i images x B_c captions in batched tensor code, and :func:`score_all_pairs` tiles
the (N_img, N_cap) matrix into such blocks:

* captions are grouped by length, so a block holds captions of one length and needs no padding
  (captions of 8-20 words padded to 20 would waste ~40% of the work);
* block sizes follow a budget of (pair, region, word) cells, so memory stays bounded whatever N is;
* everything runs under ``torch.no_grad`` (and the caller's autocast, if any);
* with several ranks, :func:`rank_rows` gives each rank a contiguous band of image rows and
  :func:`score_all_pairs_distributed` gathers the bands in rank order.

:func:`score_pairs` scores a sparse set of given (image, caption) pairs (a two-stage shortlist)
the same way, with a ``paired_scores(v, e, lengths)`` callable that scores pair p = (v[p], e[p]).
"""

from __future__ import annotations

from typing import Callable

import torch

PairScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``paired_scores(v (P, k, D), e (P, n, D), lengths (P,)) -> (P,)``: image p with caption p
PairedScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rank_rows(n: int, rank: int, world_size: int) -> slice:
    """Contiguous band of ``n`` rows for ``rank`` (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def caption_blocks(lengths: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Caption indices grouped by exact length, each group cut into blocks of at most ``block``.

    A block then needs no padding at all (no wasted work, and the model can skip its masks); a
    small group costs nothing extra because the image side of the tile grows to fill the budget.
    """
    lengths = lengths.cpu()
    order = torch.argsort(lengths, stable=True)
    out: list[torch.Tensor] = []
    for group in torch.unique_consecutive(lengths[order], return_counts=True)[1].tolist():
        idx, order = order[:group], order[group:]
        out.extend(idx.split(block))
    return out


def _check_inputs(images: torch.Tensor, captions: torch.Tensor,
                  lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of images (N_img, k, D) and padded (N_cap, n, D) or packed (W, D) captions checked
    against ``lengths`` -> lengths (N_cap,) as long on the CPU, and each packed caption's first word."""
    packed = captions.dim() == 2
    if images.dim() != 3 or captions.dim() not in (2, 3):
        raise ValueError(f"images must be (N, k, D) and captions (N, n, D) or packed (W, D); "
                         f"got {tuple(images.shape)}, {tuple(captions.shape)}")
    lengths = lengths.cpu().long()
    n_cap = lengths.shape[0]
    if lengths.dim() != 1 or (not packed and n_cap != captions.shape[0]):
        raise ValueError(f"lengths must be ({captions.shape[0]},), got {tuple(lengths.shape)}")
    if n_cap and lengths.min() < 1:
        raise ValueError("lengths must be >= 1 (every caption has a word)")
    if packed and int(lengths.sum()) != captions.shape[0]:
        raise ValueError(f"packed captions hold {captions.shape[0]} words, lengths sum to {int(lengths.sum())}")
    if not packed and n_cap and lengths.max() > captions.shape[1]:
        raise ValueError(f"lengths must lie in [1, {captions.shape[1]}]")
    return lengths, torch.cumsum(lengths, 0) - lengths


def _caption_words(captions: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor, ln: torch.Tensor,
                   n_max: int) -> torch.Tensor:
    """Captions ``idx`` (with lengths ``ln``) as (len(idx), n_max, D), zero beyond each length, from
    padded captions or packed words (``offsets``: each caption's first word), on the captions' device.

    Rows are copied with ``index_select`` (several times faster than advanced indexing on the CPU),
    and the padding is zeroed only where there is some: a shortlist's pairs gather one row per pair.
    """
    if captions.dim() == 3:
        return captions.index_select(0, idx.to(captions.device))[:, :n_max]
    pos = torch.arange(n_max).view(1, -1)
    valid = pos < ln.view(-1, 1)
    word = (offsets[idx].view(-1, 1) + pos).clamp_max(captions.shape[0] - 1)
    e = captions.index_select(0, word.view(-1).to(captions.device)).view(len(idx), n_max, captions.shape[1])
    return e if bool(valid.all()) else e * valid.to(captions.device).unsqueeze(-1).to(captions.dtype)


@torch.no_grad()
def score_all_pairs(
    pair_scores: PairScorer,
    images: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    *,
    rows: slice | None = None,
    caption_block: int = 256,
    cell_budget: int = 1 << 20,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Scores (len(rows), N_cap) of images[rows] (N_img, k, D) against captions (N_cap, n, D).

    ``captions`` may also be *packed*: (W, D), the words of all captions back to back (W = sum of
    lengths), which stores no padding at all (COCO 5K: 25,000 captions of up to ~50 words).
    ``lengths`` (N_cap,) are the captions' word counts (padding beyond them is ignored);
    ``pair_scores(v (b_i, k, D), e (b_c, n, D), lengths (b_c,)) -> (b_i, b_c)``. Each call scores at
    most ``cell_budget`` (pair x region x word) cells: peak memory ~ cell_budget x (model's channels)
    x 4 bytes x a few live activations. Inputs may live on the CPU; blocks are moved to ``device``.
    The result is float32 on ``device`` (default: the images' device).
    """
    lengths, offsets = _check_inputs(images, captions, lengths)
    device = torch.device(device) if device is not None else images.device
    rows = rows if rows is not None else slice(0, images.shape[0])
    imgs = images[rows]
    n_img, k, n_cap = imgs.shape[0], imgs.shape[1], lengths.shape[0]
    out = torch.empty(n_img, n_cap, dtype=torch.float32, device=device)
    if n_img == 0 or n_cap == 0:
        return out
    for idx in caption_blocks(lengths, caption_block):
        ln_cpu = lengths[idx]
        n_max = int(ln_cpu.max())
        e = _caption_words(captions, offsets, idx, ln_cpu, n_max).to(device, non_blocking=True)  # (b_c, n_max, D)
        ln = ln_cpu.to(device)
        b_i = max(1, cell_budget // (len(idx) * k * n_max))
        cols = idx.to(device)
        for start in range(0, n_img, b_i):
            v = imgs[start : start + b_i].to(device, non_blocking=True)  # (b_i, k, D)
            out[start : start + v.shape[0], cols] = pair_scores(v, e, ln).float()
    return out


@torch.no_grad()
def score_all_pairs_distributed(
    pair_scores: PairScorer,
    images: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **kw,
) -> torch.Tensor:
    """The full (N_img, N_cap) matrix: this rank scores its band of image rows, ``gather``
    (e.g. ``EvalContext.gather``) concatenates the bands in rank order. Every rank must hold the
    same ``images``/``captions`` (gather the features first)."""
    band = score_all_pairs(pair_scores, images, captions, lengths, rows=rank_rows(images.shape[0], rank, world_size), **kw)
    if world_size == 1:
        return band
    if gather is None:
        raise ValueError("score_all_pairs_distributed: world_size > 1 needs a gather function")
    return gather(band)


@torch.no_grad()
def score_pairs(
    paired_scores: PairedScorer,
    images: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    image_idx: torch.Tensor,
    caption_idx: torch.Tensor,
    *,
    cell_budget: int = 1 << 20,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Scores (P,) of the given pairs: images[image_idx[p]] against captions[caption_idx[p]].

    Inputs as in :func:`score_all_pairs` (captions padded or packed). A sparse set of pairs - a
    two-stage shortlist - costs what its pairs cost in all-pairs scoring, not a call per image: pairs
    are grouped by caption length (no padding, no masks) and each ``paired_scores`` call takes as many
    pairs as ``cell_budget`` (pair x region x word) cells allow. float32 on ``device`` (default: the
    images' device).
    """
    lengths, offsets = _check_inputs(images, captions, lengths)
    device = torch.device(device) if device is not None else images.device
    image_idx, caption_idx = image_idx.cpu().long(), caption_idx.cpu().long()
    if image_idx.shape != caption_idx.shape or image_idx.dim() != 1:
        raise ValueError(f"image_idx and caption_idx must be (P,) alike, got {tuple(image_idx.shape)}, "
                         f"{tuple(caption_idx.shape)}")
    out = torch.empty(len(image_idx), dtype=torch.float32, device=device)
    k = images.shape[1]
    for group in caption_blocks(lengths[caption_idx], len(image_idx) or 1):  # pair indices, one length each
        n = int(lengths[caption_idx[group[0]]])
        for block in group.split(max(1, cell_budget // (k * n))):
            c = caption_idx[block]
            v = images.index_select(0, image_idx[block].to(images.device)).to(device, non_blocking=True)  # (b, k, D)
            e = _caption_words(captions, offsets, c, lengths[c], n).to(device, non_blocking=True)  # (b, n, D)
            out[block.to(device)] = paired_scores(v, e, lengths[c].to(device)).float()
    return out
