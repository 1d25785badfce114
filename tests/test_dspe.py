"""DSPE: every constraint family of Eq. (1-5) against hand-computed values, top-K selection,
neighbourhoods, text features (tf-idf, mean word vectors, Fisher vectors), phrase localization
parts, the recipes on real tiny shards, and a 2-worker Ray run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from xray_match.config import load_config
from xray_match.losses.structure import StructurePreservingLoss, euclidean, neighbours, topk_hinge
from xray_match.metrics.localization import (
    best_candidates,
    candidate_boxes,
    jitter_boxes,
    phrase_accuracy,
    sliding_windows,
)
from xray_match.text.features import (
    FisherFeaturizer,
    MeanWordVecFeaturizer,
    TfidfFeaturizer,
    featurizer_from_state,
    fisher_vector,
)

# ----------------------------------------------------------------------------- the objective

# A 1-D toy minibatch (distance = |a - b|): three images, three sentences; sentence y2 describes
# both x1 and x2, so N(x1) = {x2}, N(x2) = {x1}; y0 and y1 both describe x0, so N(y0) = {y1}.
X = torch.tensor([[0.0], [1.0], [0.7]])
Y = torch.tensor([[0.05], [0.6], [0.5]])
POS = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
M = 0.5


def test_topk_hinge_hand_value_and_k_most_violated():
    # one anchor, candidate 0 positive, 1..4 negatives; m = 0.1
    dist = torch.tensor([[0.2, 0.25, 0.1, 0.28, 1.0]], requires_grad=True)
    pos = torch.tensor([[True, False, False, False, False]])
    neg = ~pos
    # violations 0.1 + 0.2 - d_n: 0.05, 0.2, 0.02, 0 (clipped)
    total, n_viol, n_pairs = topk_hinge(dist, pos, neg, 0.1, k=50)
    assert total.item() == pytest.approx(0.27, abs=1e-6)
    assert n_viol.item() == 3 and n_pairs.item() == 1
    total, _, _ = topk_hinge(dist, pos, neg, 0.1, k=2)  # the two largest: 0.2 + 0.05
    assert total.item() == pytest.approx(0.25, abs=1e-6)
    total.backward()
    # gradient only through the positive and the K most violated negatives
    assert dist.grad.tolist() == [[2.0, -1.0, -1.0, 0.0, 0.0]]
    total, _, _ = topk_hinge(dist.detach(), pos, neg, 0.1, k=1)
    assert total.item() == pytest.approx(0.2, abs=1e-6)


def test_topk_hinge_respects_negative_mask():
    dist = torch.tensor([[0.2, 0.25, 0.1]])
    pos = torch.tensor([[True, False, False]])
    neg = torch.tensor([[False, True, False]])  # candidate 2 is neither positive nor negative
    total, _, _ = topk_hinge(dist, pos, neg, 0.1, k=50)
    assert total.item() == pytest.approx(0.05, abs=1e-6)


def test_neighbourhoods_follow_section_3_2():
    n_x, n_y = neighbours(POS)
    # images described by a same sentence; sentences describing a same image; never oneself
    assert n_x.int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert n_y.int().tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_each_constraint_family_hand_computed():
    d_xy = euclidean(X, Y)
    # Eq. (1): x0: (y0: .5+.05-.5=.05) + (y1: .5+.6-.5=.6); x1: (y2 vs y0: .05) + (y2 vs y1: .6);
    #          x2: (y2 vs y0: .5+.2-.65=.05) + (y2 vs y1: .5+.2-.1=.6)  -> 1.95
    assert topk_hinge(d_xy, POS, ~POS, M, 50)[0].item() == pytest.approx(1.95, abs=1e-5)
    # K = 1 keeps one violation per positive pair: x0 .05 + .6, x1 .6, x2 .6 -> 1.85
    assert topk_hinge(d_xy, POS, ~POS, M, 1)[0].item() == pytest.approx(1.85, abs=1e-5)
    # Eq. (2): y0: 0 (x1: .5+.05-.95<0, x2: .5+.05-.65<0); y1: (x1: .5+.6-.4=.7) + (x2: .5+.6-.1=1.0);
    #          y2: (pos x1 vs x0: .5+.5-.5=.5) + (pos x2 vs x0: .5+.2-.5=.2)  -> 2.4
    assert topk_hinge(d_xy.T, POS.T, ~POS.T, M, 50)[0].item() == pytest.approx(2.4, abs=1e-5)
    n_x, n_y = neighbours(POS)
    eye = torch.eye(3, dtype=torch.bool)
    # Eq. (3): x1: .5+.3-1.0<0; x2: .5+.3-.7=.1  -> 0.1
    assert topk_hinge(euclidean(X, X), n_x, ~n_x & ~eye, M, 50)[0].item() == pytest.approx(0.1, abs=1e-5)
    # Eq. (4): y0: .5+.55-.45=.6; y1: .5+.55-.1=.95  -> 1.55
    assert topk_hinge(euclidean(Y, Y), n_y, ~n_y & ~eye, M, 50)[0].item() == pytest.approx(1.55, abs=1e-5)


def test_eq5_weights_and_normalization():
    loss = StructurePreservingLoss(margin=M, lambda_1=2.0, lambda_2=0.5, lambda_3=0.2, top_k=50)
    out = loss({"image_emb": X, "text_emb": Y}, {"pos": POS})
    # divided by the 4 ground-truth pairs of the minibatch
    assert out["rank_i2t_loss"].item() == pytest.approx(1.95 / 4, abs=1e-5)
    assert out["rank_t2i_loss"].item() == pytest.approx(2 * 2.4 / 4, abs=1e-5)
    assert out["struct_image_loss"].item() == pytest.approx(0.5 * 0.1 / 4, abs=1e-5)
    assert out["struct_text_loss"].item() == pytest.approx(0.2 * 1.55 / 4, abs=1e-5)
    # lambda = 0 drops a family entirely (stage 2 of phrase localization)
    out = StructurePreservingLoss(M, 2.0, 0.0, 0.0)({"image_emb": X, "text_emb": Y}, {"pos": POS})
    assert sorted(k for k in out if k.endswith("_loss")) == ["rank_i2t_loss", "rank_t2i_loss"]


def _looped_family(dist, pos, neg, m, k):
    total = 0.0
    for a in range(dist.shape[0]):
        for p in range(dist.shape[1]):
            if pos[a, p]:
                v = sorted((max(0.0, m + dist[a, p] - dist[a, n]) for n in range(dist.shape[1]) if neg[a, n]), reverse=True)
                total += sum(v[:k])
    return total


def test_batched_equals_looped_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)
    pos = torch.zeros(6, 9, dtype=torch.bool)
    for j in range(9):
        pos[j % 6, j] = True
    pos[1, 8] = True  # a sentence describing two images
    out = StructurePreservingLoss(0.2, 1.0, 1.0, 1.0, top_k=3)({"image_emb": x, "text_emb": y}, {"pos": pos})
    d_xy, d_xx, d_yy = (euclidean(a, b).double().numpy() for a, b in ((x, y), (x, x), (y, y)))
    n_x, n_y = neighbours(pos)
    norm = pos.sum().item()
    p, n = pos.numpy(), (~pos).numpy()
    assert out["rank_i2t_loss"].item() == pytest.approx(_looped_family(d_xy, p, n, 0.2, 3) / norm, abs=1e-5)
    assert out["rank_t2i_loss"].item() == pytest.approx(_looped_family(d_xy.T, p.T, n.T, 0.2, 3) / norm, abs=1e-5)
    ex, ey = np.eye(6, dtype=bool), np.eye(9, dtype=bool)
    assert out["struct_image_loss"].item() == pytest.approx(
        _looped_family(d_xx, n_x.numpy(), ~n_x.numpy() & ~ex, 0.2, 3) / norm, abs=1e-5)
    assert out["struct_text_loss"].item() == pytest.approx(
        _looped_family(d_yy, n_y.numpy(), ~n_y.numpy() & ~ey, 0.2, 3) / norm, abs=1e-5)


def test_loss_rejects_mismatched_pos():
    with pytest.raises(ValueError, match="batch\\['pos'\\]"):
        StructurePreservingLoss()({"image_emb": X, "text_emb": Y}, {"pos": POS[:2]})


# ----------------------------------------------------------------------------- the network


def test_model_branches_output_unit_vectors():
    from xray_match.models.dspe import DSPE

    m = DSPE(None, image_dim=12, text_dim=7, image_hidden=16, text_hidden=8, embed_dim=5)
    out = m({"image": torch.randn(4, 12), "text": torch.randn(6, 7)})
    assert out["image_emb"].shape == (4, 5) and out["text_emb"].shape == (6, 5)
    assert torch.allclose(out["image_emb"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_emb"].norm(dim=1), torch.ones(6), atol=1e-5)
    assert isinstance(m.text_branch.bn, torch.nn.BatchNorm1d)


# ----------------------------------------------------------------------------- text features


def test_fisher_vector_known_value_tiny_gmm():
    # 1-D GMM: w = (.5, .5), mu = (-1, 1), var = (1, 1); one descriptor x = 1.
    # posteriors: e^-2 / (1 + e^-2) = 0.1192029, 0.8807971; z = (x - mu) / s = (2, 0)
    # G_mu = (0.1192029 * 2 / sqrt(.5), 0) = (0.3371567, 0)
    # G_sigma = (0.1192029 * (4 - 1) / sqrt(1), 0.8807971 * (0 - 1) / sqrt(1)) = (0.3576088, -0.8807971)
    w, mu, var = np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]), np.array([[1.0], [1.0]])
    raw = fisher_vector(np.array([[1.0]]), w, mu, var, power_norm=False, l2_norm=False)
    assert raw == pytest.approx([0.3371567, 0.0, 0.3576088, -0.8807971], abs=1e-6)
    # improved FV: signed sqrt, then L2; sqrt values .5806519, 0, .5980040, -.9385079, norm 1.2552142
    fv = fisher_vector(np.array([[1.0]]), w, mu, var)
    assert fv == pytest.approx([0.462592, 0.0, 0.476416, -0.747687], abs=1e-5)
    assert fisher_vector(np.zeros((0, 1)), w, mu, var).tolist() == [0, 0, 0, 0]


def test_fisher_featurizer_shape_and_pca():
    words = ["red", "blue", "one", "two", "a", "and"]
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    caps = [f"a {c} {d} and a {e} {f}" for c, d, e, f in itertools.product(["red", "blue"], ["one", "two"], ["red", "blue"], ["one", "two"])]
    fz = FisherFeaturizer.fit(caps, words, vectors, n_components=3, pca_dim=0, reg_covar=1e-3)
    assert fz.dim == 2 * 3 * 8 and fz(caps[:2]).shape == (2, 48)
    assert np.linalg.norm(fz.one("a red one")) == pytest.approx(1.0, abs=1e-5)
    # the cached per-word path equals the formula on the sentence's word vectors
    ref = fisher_vector(vectors[[4, 0, 2, 5, 1]], fz.weights, fz.means, fz.variances)
    assert np.allclose(fz.one("a red one and blue"), ref, atol=1e-6)
    assert not fz.one("unknown words").any()
    fz = FisherFeaturizer.fit(caps, words, vectors, n_components=3, pca_dim=10, reg_covar=1e-3)
    assert fz.dim == 10 and fz(["a red one"]).shape == (1, 10)
    again = featurizer_from_state(fz.to_state())
    assert np.allclose(again(caps[:3]), fz(caps[:3]), atol=1e-6)


def test_tfidf_matches_sklearn_and_uses_training_words_only():
    from sklearn.feature_extraction.text import TfidfVectorizer

    from xray_match.text.vocab import tokenize

    train = ["A red seven, left of a blue two", "two digits: a red one and a green four", "a single red seven"]
    fz = TfidfFeaturizer.fit(train, max_features=100)
    ref = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None).fit(train)
    test = ["a magenta seven below a red one"]  # "magenta", "below" never seen in training
    assert np.allclose(fz(test + train), _reorder(ref, fz, test + train), atol=1e-6)
    assert "magenta" not in fz.vocabulary and fz.dim == len(ref.vocabulary_)
    # hand value: one-word sentence -> that word's unit vector
    v = fz.one("seven")
    assert v[fz.vocabulary["seven"]] == pytest.approx(1.0) and v.sum() == pytest.approx(1.0)


def _reorder(ref, fz, texts):
    dense = ref.transform(texts).toarray()
    out = np.zeros((len(texts), fz.dim), np.float32)
    for w, j in ref.vocabulary_.items():
        out[:, fz.vocabulary[w]] = dense[:, j]
    return out


def test_mean_word_vectors_hand_value():
    fz = MeanWordVecFeaturizer(["a", "b"], np.array([[1.0, 0.0], [0.0, 2.0]]))
    assert fz.one("a b, B c") == pytest.approx([1 / 3, 4 / 3])  # "c" is unknown
    assert fz.one("c").tolist() == [0.0, 0.0]


def test_minilm_word_vectors_average_wordpieces():
    from transformers import AutoModel, AutoTokenizer

    from xray_match.models.encoders.text import default_text_model
    from xray_match.text.features import minilm_word_vectors

    vec = minilm_word_vectors(["magenta", "seven"])
    assert vec.shape == (2, 384)
    path = default_text_model()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    table = AutoModel.from_pretrained(path, local_files_only=True).get_input_embeddings().weight
    ids = tok("magenta", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # mage + ##nta
    assert torch.allclose(vec[0], table[ids].mean(0), atol=1e-6)


def test_featurizer_state_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown kind"):
        featurizer_from_state({"kind": "glove"})
    with pytest.raises(ValueError, match="missing key 'idf'"):
        featurizer_from_state({"kind": "tfidf", "vocabulary": {}})


# ----------------------------------------------------------------------------- phrase localization


def test_candidate_boxes_and_sliding_windows():
    rng = np.random.default_rng(0)
    gt = [[10.0, 10.0, 30.0, 30.0], [40.0, 5.0, 60.0, 25.0]]
    win = sliding_windows((64, 64), [0.5])  # side 32, stride 16: x, y in {0, 16, 32}
    assert win.shape == (9, 4) and win[-1].tolist() == [32, 32, 64, 64]
    c = candidate_boxes(gt, (64, 64), 3, [0.5], rng)
    assert c.shape == (2 + 6 + 9, 4) and c[:2].tolist() == gt
    assert (c[:, 0] >= 0).all() and (c[:, 2] <= 64).all() and (c[:, 2] > c[:, 0]).all()
    j = jitter_boxes([0, 0, 4, 4], 50, (64, 64), rng)
    assert (j[:, 2] - j[:, 0] >= 2 - 1e-6).all() and (j >= 0).all()


def test_phrase_accuracy_hand_value():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 40, 40], [30, 30, 41, 41.0]])
    gt = torch.tensor([[0, 0, 10, 10], [30, 30, 40, 40.0]])
    # phrase 0 (image 0: candidates 0, 1) is nearest to candidate 1: IoU 100/400 = .25 -> miss
    # phrase 1 (image 1: candidates 2, 3) is nearest to candidate 3: IoU 100/121 = .83 -> hit
    dist = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.5, 0.4]])
    valid = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert best_candidates(dist, valid).tolist() == [1, 3]
    assert phrase_accuracy(dist, valid, boxes, gt) == pytest.approx(0.5)


def test_phrase_collate_hard_negatives_are_negatives_of_their_phrase_only():
    from xray_match.recipes.dspe_phrase import collate_phrase_train, phrase_key

    assert phrase_key("A red seven") == phrase_key("red seven") == "red seven"
    items = [{"regions": torch.zeros(3, 3, 8, 8), "region_keys": [{"red seven", "seven"}, {"blue two"}, set()],
              "neg_for": ["", "", "red seven"], "text": torch.zeros(2, 4), "text_keys": ["red seven", "blue two"]},
             {"regions": torch.zeros(1, 3, 8, 8), "region_keys": [{"seven", "green seven"}], "neg_for": [""],
              "text": torch.zeros(1, 4), "text_keys": ["seven"]}]
    b = collate_phrase_train(items)
    assert b["pos"].int().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert b["neg"].int().tolist() == [[0, 1, 0], [1, 0, 1], [1, 0, 0], [1, 1, 0]]


# ----------------------------------------------------------------------------- presets and recipes


@pytest.mark.parametrize("preset", ["dspe_cpu", "dspe_paper", "dspe_paper_wordvec", "dspe_phrase_cpu", "dspe_phrase_paper"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.model.name in ("dspe", "dspe_phrase")


def test_retrieval_recipe_on_tiny_shards(tiny_scenes):
    from xray_match.data.reader import make_loader
    from xray_match.recipes.dspe import DSPERecipe, sentence_key
    from xray_match.train.recipe import DataInfo, EvalContext

    cfg = load_config("dspe_cpu", {"data.path": tiny_scenes, "dspe.text_features": "tfidf", "dspe.image_hidden": 32,
                                   "dspe.text_hidden": 32, "dspe.embed_dim": 16, "data.batch_size": 8})
    prepared = DSPERecipe.prepare(cfg, tiny_scenes)
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240, "val": 60, "test": 60}, prepared)
    recipe = DSPERecipe(cfg, info)
    model, loss = recipe.build_model(), recipe.build_loss()
    batch = next(iter(make_loader(tiny_scenes, "train", recipe.transform(True), recipe.collate, batch_size=8,
                                  train=True, num_workers=0)))
    # one sampled pair + one more distinct positive sentence per image
    assert batch["text"].shape[0] == 16 and batch["pos"].shape == (8, 16)
    assert batch["pos"][batch["caption_image"], torch.arange(16)].all()
    out = loss(recipe.forward(model, batch), batch)
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    assert torch.isfinite(total) and "struct_text_loss" in out
    model.eval()
    val = make_loader(tiny_scenes, "val", recipe.transform(False), recipe.collate, batch_size=32, train=False, num_workers=0)
    metrics = recipe.evaluate(model, val, EvalContext())
    assert metrics["images"] == 60 and metrics["captions"] == 300 and 0 <= metrics["rsum"] <= 600
    assert sentence_key("Two digits: a red one") == "two digits a red one"
    # the registry's inference object: rank texts for an image with the training preprocessing
    from xray_match.data.reader import decode_sample, iter_raw, shard_urls

    sample = decode_sample(next(iter_raw(shard_urls(tiny_scenes, "test")[0])))
    ranked = recipe.inference(model).rank_texts(sample["image"], sample["meta"]["captions"] + ["a cyan nine"])
    assert sorted(i for i, _ in ranked) == list(range(6))


def test_phrase_recipe_and_mining_on_tiny_shards(tiny_scenes, tmp_path):
    from torchvision.ops import box_iou

    from xray_match.data.reader import make_loader
    from xray_match.recipes.dspe_phrase import DSPEPhraseRecipe, load_hard_negatives
    from xray_match.studies.dspe_localize import mine_hard_negatives
    from xray_match.train.recipe import DataInfo, EvalContext

    cfg = load_config("dspe_phrase_cpu", {"data.path": tiny_scenes, "dspe.text_features": "tfidf",
                                          "dspe.image_hidden": 32, "dspe.text_hidden": 32, "dspe.embed_dim": 16,
                                          "data.eval_batch_size": 10, "data.num_workers": 0, "dspe.crop_size": 16,
                                          "dspe.window_scales": [0.6], "dspe.jitter_per_box": 1})
    prepared = DSPEPhraseRecipe.prepare(cfg, tiny_scenes)
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240, "val": 60, "test": 60}, prepared)
    recipe = DSPEPhraseRecipe(cfg, info)
    model = recipe.build_model().eval()
    path = str(tmp_path / "hard.json")
    mined = mine_hard_negatives(model, cfg, info, path, max_images=6)
    assert mined["stats"]["images"] == 6 and load_hard_negatives(path) == mined["boxes"]
    # every mined box misses all ground-truth boxes of its phrase in its image
    from xray_match.data.reader import iter_meta
    from xray_match.recipes.dspe_phrase import object_phrases, phrase_key

    metas = dict(iter_meta(tiny_scenes, "train", limit=6))
    for img, per in mined["boxes"].items():
        meta = metas[img]
        for k, boxes in per.items():
            gts = [meta["objects"][o]["box"] for o, ts in object_phrases(meta).items() if k in {phrase_key(t) for t in ts}]
            assert box_iou(torch.tensor(boxes), torch.tensor(gts)).max() < 0.5
            assert len(boxes) <= cfg.dspe.hard_negatives_per_phrase
    # stage 2: the mined boxes join training batches as negatives of their phrase
    cfg2 = cfg.with_overrides({"dspe.hard_negatives": path, "dspe.lambda_2": 0.0, "dspe.lambda_3": 0.0})
    info2 = DataInfo(tiny_scenes, "digit-scenes", info.counts, DSPEPhraseRecipe.prepare(cfg2, tiny_scenes))
    r2 = DSPEPhraseRecipe(cfg2, info2)
    tr = make_loader(tiny_scenes, "train", r2.transform(True), r2.collate, batch_size=12, train=True, num_workers=0)
    batch = next(iter(tr))
    assert batch["pos"].shape == batch["neg"].shape == (batch["image"].shape[0], batch["text"].shape[0])
    assert not (batch["pos"] & batch["neg"]).any()
    val = make_loader(tiny_scenes, "val", r2.transform(False), r2.collate, batch_size=10, train=False, num_workers=0)
    metrics = r2.evaluate(model, val, EvalContext())
    assert 0.0 <= metrics["phrase_acc"] <= 1.0 and metrics["phrases"] > 60
    from xray_match.data.reader import decode_sample, iter_raw, shard_urls

    sample = decode_sample(next(iter_raw(shard_urls(tiny_scenes, "test")[0])))
    boxes = [o["box"] for o in sample["meta"]["objects"]]
    picked = r2.inference(model).localize(sample["image"], ["a red seven", "a two"], boxes)
    assert len(picked) == 2 and all(b in boxes for b in picked)


def test_hard_negative_file_errors(tmp_path):
    from xray_match.configfile import ConfigError
    from xray_match.recipes.dspe_phrase import load_hard_negatives

    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"boxes": {"train-0000001": {"red seven": [[1, 2, 3]]}}}))
    with pytest.raises(ConfigError, match="boxes\\['train-0000001'\\]\\['red seven'\\]"):
        load_hard_negatives(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_hard_negatives(str(tmp_path / "missing.json"))


def test_missing_init_checkpoint_is_refused_before_training(tiny_scenes, tmp_path):
    from xray_match.configfile import ConfigError
    from xray_match.recipes.dspe_phrase import DSPEPhraseRecipe

    cfg = load_config("dspe_phrase_cpu", {"data.path": tiny_scenes, "dspe.init_checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="dspe.init_checkpoint"):
        DSPEPhraseRecipe.prepare(cfg, tiny_scenes)


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_worker_ray_run(tiny_scenes, ray_cluster, mlflow_uri, tmp_path):
    from xray_match.driver.worker import run_training

    cfg = load_config("dspe_cpu", {
        "data.path": tiny_scenes, "ray.storage_path": str(tmp_path / "runs"), "tracking.tracking_uri": mlflow_uri,
        "ray.num_workers": 2, "train.epochs": 1, "data.steps_per_epoch": 2, "data.batch_size": 8,
        "dspe.text_features": "tfidf", "dspe.image_hidden": 64, "dspe.text_hidden": 64, "dspe.embed_dim": 32,
    })
    out = run_training(cfg)
    m = out["metrics"]
    assert m["val/images"] == 60 and m["val/captions"] == 300
    assert math.isfinite(m["train/loss"]) and "train/struct_text_loss" in m
    assert out["checkpoint"] and out.get("model_version") is not None


@pytest.mark.parametrize("space", ["dspe", "dspe_grid"])
def test_search_spaces_are_valid_config_keys(space):
    from xray_match.driver.tuner import check_space
    from xray_match.registry import SPACES

    cfg = load_config("dspe_cpu")
    domains = SPACES.get(space)(cfg)
    assert {"dspe.margin", "dspe.lambda_1", "dspe.top_k", "optim.lr"} <= set(domains) or space == "dspe_grid"
    check_space(cfg, domains)
