"""Recall@K, rsum and the evaluation protocols on hand-made similarity matrices; the chunked
all-pairs scorer against a full-matrix reference."""

from __future__ import annotations

import pytest
import torch

from xray_match.metrics.retrieval import (
    embedding_recall,
    mean_pairwise_cosine,
    fold_recall,
    folds,
    format_recall,
    protocol_recall,
    ranks_i2t,
    ranks_t2i,
    recall_at_k,
)
from xray_match.metrics.xattn import caption_blocks, rank_rows, score_all_pairs, score_all_pairs_distributed


def hand_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """3 images x 6 captions (2 per image: image i owns captions 2i, 2i+1)."""
    scores = torch.tensor(
        [
            # c0   c1   c2   c3   c4   c5
            [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: own best (c0) ranks first -> i2t rank 0
            [0.5, 0.4, 0.3, 0.6, 0.7, 0.2],  # image 1: own best c3 (0.6) beaten by c4 (0.7) -> rank 1
            [0.2, 0.95, 0.1, 0.1, 0.4, 0.3],  # image 2: own best c4 (0.4) beaten by c1 (0.95) -> rank 1
        ]
    )
    return scores, torch.tensor([0, 0, 1, 1, 2, 2])


def test_ranks_by_hand():
    scores, ci = hand_matrix()
    assert ranks_i2t(scores, ci).tolist() == [0, 1, 1]
    # t2i: column c, rank of its image among the 3 scores in the column
    # c0: img0 0.9 best -> 0; c1: img0 0.1 < 0.4, 0.95 -> 2; c2: img1 0.3 < 0.8 -> 1;
    # c3: img1 0.6 best -> 0; c4: img2 0.4 < 0.7 -> 1; c5: img2 0.3 best -> 0
    assert ranks_t2i(scores, ci).tolist() == [0, 2, 1, 0, 1, 0]


def test_ties_count_against_the_ground_truth():
    """A collapsed model scores every pair alike: it must not look perfect (R@K = 0, below the
    chance level K / N), in the full-matrix and in the chunked path alike."""
    ci = torch.arange(20).repeat_interleave(5)  # 20 images x 5 captions
    const = torch.full((20, 100), 0.3)
    m = recall_at_k(const, ci)
    assert m["rsum"] == 0.0
    assert all(m[f"i2t_r{k}"] <= 100 * 5 * k / 100 and m[f"t2i_r{k}"] <= 100 * k / 20 for k in (1, 5, 10))
    emb = torch.ones(20, 4) / 2  # identical unit embeddings: every score is 1
    assert embedding_recall(emb, torch.ones(100, 4) / 2, ci, chunk=7)["rsum"] == 0.0
    # a single tie: image 0's only caption c0 ties with c1 (another image's) -> rank 1, not 0;
    # caption c1's column: image 1 (0.5) ties with image 0 (0.5) -> rank 1
    s = torch.tensor([[0.5, 0.5], [0.1, 0.5]])
    assert ranks_i2t(s, torch.tensor([0, 1])).tolist() == [1, 0]
    assert ranks_t2i(s, torch.tensor([0, 1])).tolist() == [0, 1]
    # ties among an image's own captions do not count against it
    s = torch.tensor([[0.7, 0.7, 0.2]])
    assert ranks_i2t(torch.cat([s, torch.tensor([[0.0, 0.0, 0.9]])]), torch.tensor([0, 0, 1])).tolist() == [0, 0]


def test_mean_pairwise_cosine_by_hand():
    # rows (1,0), (0,1), (1,1)/sqrt2: pair cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3 = 0.471405
    e = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(e) == pytest.approx(2 ** 0.5 / 3, abs=1e-9)
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)  # collapsed
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_recall_at_k_by_hand():
    scores, ci = hand_matrix()
    m = recall_at_k(scores, ci, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(100 / 3)  # 1 of 3 images at rank 0
    assert m["i2t_r2"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(50.0)  # 3 of 6 captions
    assert m["t2i_r2"] == pytest.approx(500 / 6)  # 5 of 6
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 50 + 500 / 6)


def fold_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """4 images, 1 caption each, 2 folds of 2. Cross-fold entries are huge: a fold protocol must
    not see them, the full-matrix protocol must."""
    s = torch.tensor(
        [
            [0.9, 0.1, 5.0, 5.0],
            [0.8, 0.2, 5.0, 5.0],  # fold 0: image 1's caption c1 (0.2) loses to c0 (0.8)
            [5.0, 5.0, 0.3, 0.1],
            [5.0, 5.0, 0.2, 0.4],  # fold 1: all correct
        ]
    )
    return s, torch.arange(4)


def test_folds_partition_images_and_captions():
    ci = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    fs = folds(4, ci, 2)
    assert [f[0] for f in fs] == [slice(0, 2), slice(2, 4)]
    assert fs[1][1].tolist() == [4, 5, 6, 7] and fs[1][2].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="equal folds"):
        folds(5, torch.arange(5), 2)


def test_fold_recall_by_hand_and_labelled_mean():
    s, ci = fold_matrix()
    res = fold_recall(s, ci, n_folds=2, ks=(1,))
    # fold 0: i2t ranks [0, 1] -> R@1 50; t2i: c0 column (0.9 vs 0.8) rank 0, c1 (0.2 vs 0.1) rank 0 -> 100
    # fold 1: i2t ranks [0, 0] -> 100; t2i: c2 (0.3 vs 0.2) 0, c3 (0.4 vs 0.1) 0 -> 100
    assert res["folds"][0] == {"i2t_r1": 50.0, "t2i_r1": 100.0, "rsum": 150.0}
    assert res["folds"][1] == {"i2t_r1": 100.0, "t2i_r1": 100.0, "rsum": 200.0}
    # the mean of each metric under its own name (SCAN/VSE++ print mean i2t recall x 6 as "rsum")
    assert res["mean"] == {"i2t_r1": 75.0, "t2i_r1": 100.0, "rsum": 175.0}
    # the full-matrix protocol sees the cross-fold 5.0s: nothing is retrieved at rank 0
    full = recall_at_k(s, ci, ks=(1,))
    assert full["i2t_r1"] == 0.0 and full["t2i_r1"] == 0.0


def test_fold_recall_with_a_scorer_scores_only_diagonal_blocks():
    s, ci = fold_matrix()
    seen = []

    def scorer(rows, cols):
        seen.append((rows.start, rows.stop, cols.tolist()))
        return s[rows][:, cols]

    res = fold_recall(scorer, ci, n_folds=2, n_images=4, ks=(1,))
    assert res["mean"]["rsum"] == 175.0
    assert seen == [(0, 2, [0, 1]), (2, 4, [2, 3])]


def test_protocol_recall_labels():
    s, ci = fold_matrix()
    out = protocol_recall(s, ci, "full")
    assert out["rsum"] == recall_at_k(s, ci)["rsum"]
    with pytest.raises(ValueError, match="expects 1000 images"):
        protocol_recall(s, ci, "1k")
    big = torch.randn(10, 10)
    out = protocol_recall(big, torch.arange(10), "5fold1k")
    assert {"i2t_r1", "rsum", "fold0_rsum", "fold4_t2i_r10"} <= set(out)
    assert out["rsum"] == pytest.approx(sum(out[f"fold{f}_rsum"] for f in range(5)) / 5)
    assert "rsum 175.0" in format_recall({"i2t_r1": 75.0, "t2i_r1": 100.0, "rsum": 175.0}, "5-fold")


def test_embedding_recall_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 4, generator=g), torch.randn(21, 4, generator=g)
    ci = torch.arange(7).repeat_interleave(3)
    assert embedding_recall(img, txt, ci, chunk=3) == recall_at_k(img @ txt.T, ci)


# ----------------------------------------------------------------------------- chunked scoring


def toy_scorer(v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A cross-attention-like scorer: per pair, the mean over real words of the max over regions."""
    s = torch.einsum("ikd,cnd->icnk", v, e).amax(-1)  # (b_i, b_c, n)
    mask = torch.arange(e.shape[1]).view(1, 1, -1) < lengths.view(1, -1, 1)
    return (s * mask).sum(-1) / lengths.view(1, -1)


def toy_inputs():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(9, 3, 5, generator=g)
    lengths = torch.tensor([1, 4, 2, 6, 3, 6, 1, 5, 2, 2, 4])
    e = torch.randn(11, 6, 5, generator=g) * (torch.arange(6).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    loop = torch.tensor([[float(toy_scorer(v[i : i + 1], e[c : c + 1, : lengths[c]], lengths[c : c + 1])) for c in range(11)]
                         for i in range(9)])
    return v, e, lengths, loop


def test_score_all_pairs_equals_loop_padded_and_packed():
    v, e, lengths, loop = toy_inputs()
    for block, budget in ((3, 20), (256, 1 << 20), (1, 1)):
        out = score_all_pairs(toy_scorer, v, e, lengths, caption_block=block, cell_budget=budget)
        torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)
    packed = torch.cat([e[c, : lengths[c]] for c in range(11)])  # (W, D)
    torch.testing.assert_close(score_all_pairs(toy_scorer, v, packed, lengths, caption_block=4, cell_budget=50), loop,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed captions hold"):
        score_all_pairs(toy_scorer, v, packed[:-1], lengths)


def test_bucketing_groups_lengths_and_bands_cover_rows():
    lengths = torch.tensor([5, 1, 3, 1, 5, 2, 1])
    blocks = caption_blocks(lengths, 2)
    assert [lengths[b].tolist() for b in blocks] == [[1, 1], [1], [2], [3], [5, 5]]
    assert sorted(torch.cat(blocks).tolist()) == list(range(7))
    bands = [rank_rows(10, r, 3) for r in range(3)]
    assert bands == [slice(0, 4), slice(4, 7), slice(7, 10)]


def test_distributed_bands_gathered_equal_full():
    v, e, lengths, loop = toy_inputs()
    bands = [score_all_pairs_distributed(toy_scorer, v, e, lengths, rank=r, world_size=3, gather=lambda t: t)
             for r in range(3)]
    torch.testing.assert_close(torch.cat(bands), loop, rtol=1e-5, atol=1e-5)
