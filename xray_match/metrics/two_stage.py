"""Two-stage retrieval for cross-attention models: a cheap embedding shortlists, the model reranks.

Exact evaluation of a cross-attention model scores every image against every caption (1,000 x
5,000 pairs on the 1K test). Here a cheap embedding of each side (the RDAN's own pooled region and
word features, or any embedding model's vectors) proposes, for every image, its ``top_k`` nearest
captions and, for every caption, its ``top_k`` nearest images; only the union of those pairs is
scored exactly, all together in batched blocks (:func:`~xray_match.metrics.xattn.score_pairs`). A
pair outside the shortlist keeps its shortlist similarity, placed below every exact score, so ranks
beyond the shortlist are still defined (they order by the cheap embedding).

With ``top_k`` >= the number of captions and images, every pair is scored: the result equals
exact all-pairs scoring (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from xray_match.metrics.xattn import PairedScorer, score_pairs


def pooled_embeddings(v: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean region feature per image and mean word feature per caption, L2-normalised.

    v (N_i, k, D); words packed (W, D) with ``lengths`` (N_c,) summing to W -> (N_i, D), (N_c, D).
    """
    img = Fn.normalize(v.mean(1), dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths.cpu())  # (W,) caption of each word
    sums = torch.zeros(len(lengths), words.shape[1], dtype=words.dtype).index_add_(0, owner, words.cpu())
    txt = Fn.normalize(sums / lengths.cpu().clamp_min(1).unsqueeze(1).to(words.dtype), dim=-1)
    return img, txt


def shortlist(img: torch.Tensor, txt: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N_i, N_c) bool: each image's top_k captions and each caption's top_k images by img @ txt.T."""
    sim = img @ txt.T  # (N_i, N_c)
    mask = torch.zeros_like(sim, dtype=torch.bool)
    k_c, k_i = min(top_k, sim.shape[1]), min(top_k, sim.shape[0])
    mask.scatter_(1, sim.topk(k_c, dim=1).indices, True)  # image -> captions
    mask.scatter_(0, sim.topk(k_i, dim=0).indices, True)  # caption -> images
    return mask


@torch.no_grad()
def two_stage_scores(paired_scores: PairedScorer, v: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor,
                     img_emb: torch.Tensor, txt_emb: torch.Tensor, top_k: int, *,
                     device: torch.device | str | None = None, cell_budget: int = 1 << 20) -> tuple[torch.Tensor, int]:
    """Scores (N_i, N_c): exact ``paired_scores`` on the shortlist, the shortlist similarity (below every
    exact score) elsewhere; and the number of pairs scored exactly.

    v (N_i, k, D) regions; words packed (W, D); lengths (N_c,); img_emb (N_i, E), txt_emb (N_c, E).
    The shortlisted pairs are scored together (:func:`~xray_match.metrics.xattn.score_pairs`), in
    blocks of ``cell_budget`` cells, so each costs what it costs in exact all-pairs scoring.
    """
    sim = (img_emb @ txt_emb.T).float().cpu()  # (N_i, N_c)
    mask = shortlist(img_emb, txt_emb, top_k).cpu()
    image_idx, caption_idx = mask.nonzero(as_tuple=True)  # row-major, the order of exact[mask]
    exact = torch.full(sim.shape, float("nan"))
    exact[mask] = score_pairs(paired_scores, v, words, lengths, image_idx, caption_idx, cell_budget=cell_budget,
                              device=device).cpu()
    scored = len(image_idx)
    floor = float(exact[mask].min()) if scored else 0.0
    # outside the shortlist: ordered by the cheap similarity, all below every exact score
    return torch.where(mask, exact, floor - 2.0 - 1e-3 + sim.clamp(-1, 1) * 0.5), scored
