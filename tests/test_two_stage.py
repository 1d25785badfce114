"""Two-stage retrieval for RDAN: pooled-feature shortlist, exact rerank. Equivalence with exact
all-pairs scoring when the shortlist holds every pair; the auxiliary embedding loss."""

from __future__ import annotations

import pytest
import torch

from xray_match.metrics.two_stage import pooled_embeddings, shortlist, two_stage_scores
from xray_match.metrics.xattn import score_all_pairs, score_pairs
from xray_match.models.rdan import RDAN, RegionEncoder, WordEncoder


def _inputs(n_img=12, n_cap=30, k=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RDAN(RegionEncoder(d, d), WordEncoder(10, 8, d, 1), relation_channels=4, lambda_=4.0, mu=0.3, one_path=False,
                 use_cnn=True, use_residual=True).eval()
    v = torch.randn(n_img, k, d, generator=g)
    lengths = torch.randint(2, 7, (n_cap,), generator=g)
    words = torch.randn(int(lengths.sum()), d, generator=g)
    return model, v, words, lengths


def _padded(words, lengths):
    """Packed (W, D) words -> (N_c, n_max, D), zero beyond each caption's length."""
    mask = torch.arange(int(lengths.max())).view(1, -1) < lengths.view(-1, 1)
    out = words.new_zeros(*mask.shape, words.shape[1])
    out[mask] = words
    return out


@pytest.mark.parametrize("mu", [0.0, 0.3, 1.0])
def test_paired_scores_equal_the_selected_entries_of_pair_scores(mu):
    model, v, words, lengths = _inputs()
    model.mu = mu
    e = _padded(words, lengths)
    with torch.no_grad():
        full = model.pair_scores(v, e, lengths)  # (12, 30), captions padded to the longest
        g = torch.Generator().manual_seed(1)
        i, c = torch.randint(0, 12, (40,), generator=g), torch.randint(0, 30, (40,), generator=g)
        torch.testing.assert_close(model.paired_scores(v[i], e[c], lengths[c]), full[i, c], rtol=1e-5, atol=1e-5)
        # the diagonal: pair p = (image p, caption p)
        torch.testing.assert_close(model.paired_scores(v, e[:12], lengths[:12]), full[:, :12].diagonal(),
                                   rtol=1e-5, atol=1e-5)


def test_score_pairs_packed_or_padded_in_blocks_equals_all_pairs():
    model, v, words, lengths = _inputs()
    exact = score_all_pairs(model.pair_scores, v, words, lengths)
    g = torch.Generator().manual_seed(2)
    i, c = torch.randint(0, 12, (50,), generator=g), torch.randint(0, 30, (50,), generator=g)
    # budget 35 cells = 1-3 pairs a call (k = 5 regions, 2-6 words)
    for captions, budget in ((words, 1 << 20), (words, 5 * 7), (_padded(words, lengths), 200)):
        torch.testing.assert_close(score_pairs(model.paired_scores, v, captions, lengths, i, c, cell_budget=budget),
                                   exact[i, c], rtol=1e-5, atol=1e-5)
    assert score_pairs(model.paired_scores, v, words, lengths, i[:0], c[:0]).shape == (0,)


def test_with_every_pair_shortlisted_two_stage_equals_exact_scoring():
    model, v, words, lengths = _inputs()
    exact = score_all_pairs(model.pair_scores, v, words, lengths)
    img, txt = pooled_embeddings(v, words, lengths)
    scores, pairs = two_stage_scores(model.paired_scores, v, words, lengths, img, txt, top_k=10_000, cell_budget=500)
    assert pairs == exact.numel()
    torch.testing.assert_close(scores, exact, rtol=1e-5, atol=1e-5)


def test_shortlist_holds_each_side_top_k_and_the_rest_ranks_below_by_similarity():
    model, v, words, lengths = _inputs()
    img, txt = pooled_embeddings(v, words, lengths)
    mask = shortlist(img, txt, 3)
    sim = img @ txt.T
    assert (mask.sum(1) >= 3).all() and (mask.sum(0) >= 3).all()
    assert mask.gather(1, sim.topk(3, dim=1).indices).all() and mask.gather(0, sim.topk(3, dim=0).indices).all()
    scores, pairs = two_stage_scores(model.paired_scores, v, words, lengths, img, txt, top_k=3)
    assert pairs == int(mask.sum()) < mask.numel()
    exact = score_all_pairs(model.pair_scores, v, words, lengths)
    torch.testing.assert_close(scores[mask], exact[mask], rtol=1e-5, atol=1e-5)
    assert scores[~mask].max() < scores[mask].min()
    i, rest = 0, (~mask[0]).nonzero().squeeze(1)
    assert torch.equal(scores[i, rest].argsort(), sim[i, rest].argsort())


def test_pooled_features_match_the_models_pooled_scores():
    model, v, words, lengths = _inputs()
    img, txt = pooled_embeddings(v, words, lengths)
    torch.testing.assert_close(model.pooled_scores(v, _padded(words, lengths), lengths), img @ txt.T, rtol=1e-5, atol=1e-6)


def test_auxiliary_embedding_loss_trains_the_pooled_features():
    from xray_match.recipes.rdan import RDANLoss

    model, v, words, lengths = _inputs(n_img=6, n_cap=6)
    batch = {"regions": v, "tokens": torch.randint(1, 10, (6, 5)), "lengths": torch.full((6,), 5)}
    out = model(batch)
    assert set(out) == {"scores", "embed_scores"}
    off = RDANLoss(0.2, True, "sum", embed_weight=0.0)(out, batch)
    assert "embed_loss" not in off
    on = RDANLoss(0.2, True, "sum", embed_weight=0.5)(out, batch)
    assert torch.equal(on["rank_loss"], off["rank_loss"]) and on["embed_loss"] > 0
    on["embed_loss"].backward()
    assert model.words.embed.weight.grad.abs().sum() > 0 and model.regions.fc.weight.grad.abs().sum() > 0


@pytest.mark.timeout(600)
def test_recipe_evaluation_with_a_full_shortlist_equals_exact(tiny_scenes):
    """`rdan.rerank_top_k` on the real evaluation path (tiny shards, an untrained rdan_cpu)."""
    from xray_match.config import load_config
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import Trainer

    cfg = load_config("rdan_cpu", [f"data.path={tiny_scenes}", "data.num_workers=0", "data.eval_batch_size=30",
                                   "tracking.enabled=false", "ray.num_workers=1", "data.batch_size=16"])
    info = prepare_info(cfg, progress=False)
    exact, _ = Trainer(cfg, info, log=lambda s: None).evaluate("test")
    two, _ = Trainer(cfg.with_overrides(["rdan.rerank_top_k=100000"]), info, log=lambda s: None).evaluate("test")
    for key in ("rsum", "i2t_r1", "t2i_r10"):
        k = next(x for x in exact if x.endswith(key))
        assert two[k] == pytest.approx(exact[k], abs=1e-6), k
    assert two[next(x for x in two if x.endswith("pairs_scored"))] == 60 * 300


# ----------------------------------------------------------------------------- a shortlist from another model


@pytest.fixture(scope="module")
def moco_checkpoint(tiny_scenes, tmp_path_factory):
    """A tiny contrastive model (3 real training steps) as a checkpoint folder: the other model."""
    from serve_helpers import train_checkpoint

    return train_checkpoint(tiny_scenes, str(tmp_path_factory.mktemp("moco")), steps=3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_another_models_vectors_come_in_the_evaluations_order(tiny_scenes, moco_checkpoint):
    """embed_samples gives the other model's own vectors of each key's image and captions, in the
    order asked, whatever the shard order; a missing key or a caption count that differs is named."""
    from PIL import Image

    from xray_match.data.format import ShardFormatError
    from xray_match.data.reader import iter_meta
    from xray_match.train.checkpoint import load_inference
    from xray_match.train.shortlist import embed_samples

    meta = dict(iter_meta(tiny_scenes, "test"))
    keys = sorted(meta)[::-7][:5]  # some keys, in an order no shard has
    counts = [len(meta[k]["captions"]) for k in keys]
    img, txt = embed_samples(moco_checkpoint, tiny_scenes, "test", keys, counts, batch_size=2)
    assert img.shape[0] == 5 and txt.shape[0] == sum(counts) and img.shape[1] == txt.shape[1]
    assert torch.allclose(img.norm(dim=1), torch.ones(5)) and torch.allclose(txt.norm(dim=1), torch.ones(len(txt)))
    model = load_inference(moco_checkpoint)
    caps = [c for k in keys for c in meta[k]["captions"]]
    assert torch.allclose(txt, torch.nn.functional.normalize(model.encode_texts(caps), dim=-1), atol=1e-5)
    from xray_match.data.reader import decode_sample, iter_raw, shard_urls

    images = {r["__key__"]: decode_sample(r, parts=frozenset())["image"]
              for u in shard_urls(tiny_scenes, "test") for r in iter_raw(u) if r["__key__"] in keys}
    want = torch.nn.functional.normalize(model.encode_images([images[k] for k in keys]), dim=-1)
    assert torch.allclose(img, want, atol=1e-5) and isinstance(images[keys[0]], Image.Image)
    with pytest.raises(ShardFormatError, match="no sample 'nope'"):
        embed_samples(moco_checkpoint, tiny_scenes, "test", ["nope"], [5])
    with pytest.raises(ShardFormatError, match=f"{keys[0]!r} has {counts[0]} captions"):
        embed_samples(moco_checkpoint, tiny_scenes, "test", keys[:1], [counts[0] + 1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recipe_evaluation_shortlisted_by_another_model(tiny_scenes, moco_checkpoint):
    """`rdan.shortlist_model` on the real evaluation path: with every pair shortlisted it equals exact
    scoring; with K = 2 it scores only the union of the other model's top-2 lists."""
    from xray_match.config import ConfigError, load_config
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.checkpoint import load_inference
    from xray_match.train.loop import Trainer

    cfg = load_config("rdan_cpu", [f"data.path={tiny_scenes}", "data.num_workers=0", "data.eval_batch_size=30",
                                   "tracking.enabled=false", "ray.num_workers=1", "data.batch_size=16"])
    info = prepare_info(cfg, progress=False)
    exact, _ = Trainer(cfg, info, log=lambda s: None).evaluate("test")
    other = [f"rdan.shortlist_model={moco_checkpoint}"]
    full, _ = Trainer(cfg.with_overrides(["rdan.rerank_top_k=100000", *other]), info, log=lambda s: None).evaluate("test")
    for key in ("test/rsum", "test/i2t_r1", "test/t2i_r10"):
        assert full[key] == pytest.approx(exact[key], abs=1e-6), key
    two, _ = Trainer(cfg.with_overrides(["rdan.rerank_top_k=2", *other]), info, log=lambda s: None).evaluate("test")
    # the pairs the other model shortlists: its vectors of the 60 test images and 300 captions
    from xray_match.data.reader import iter_meta
    from xray_match.train.shortlist import embed_samples

    meta = dict(iter_meta(tiny_scenes, "test"))
    keys = sorted(meta)
    img, txt = embed_samples(moco_checkpoint, tiny_scenes, "test", keys, [len(meta[k]["captions"]) for k in keys])
    assert two["test/pairs_scored"] == int(shortlist(img, txt, 2).sum()) < 60 * 300
    with pytest.raises(ConfigError, match="rdan.shortlist_model: shortlists only with rdan.rerank_top_k"):
        prepare_info(cfg.with_overrides(other), progress=False)
