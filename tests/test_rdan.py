"""RDAN (paper: rdan-relation-dual-attention): every equation against hand-computed values on tiny
tensors, masking of padded words, the Table 3 switches, batched = per-pair scoring, the recipe on
real shards, and a 2-worker Ray training run."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from xray_match.config import RDANConfig, load_config
from xray_match.configfile import ConfigError
from xray_match.losses.ranking import HingeRankingLoss, hinge_all_negatives, hinge_hardest_negatives
from xray_match.models.rdan import RDAN, RegionEncoder, RelationCNN, WordEncoder, build_rdan, cosine_all_pairs
from xray_match.text.vocab import PAD_ID, UNK_ID, Vocab, build_vocab, tokenize

# ----------------------------------------------------------------------------- vocabulary



def _config_defaults(fn) -> dict:
    """``fn``'s keyword-only arguments at RDANConfig's defaults (their one home; each must be a field)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: getattr(RDANConfig(), p.name) for p in params if p.kind is p.KEYWORD_ONLY}


ARGS = _config_defaults(build_rdan)


def rdan(regions: RegionEncoder, words: WordEncoder, **kw) -> RDAN:
    """An RDAN at RDANConfig's defaults for what a test does not set."""
    return RDAN(regions, words, **(_config_defaults(RDAN) | kw))

def test_tokenize_and_vocab_ids():
    assert tokenize("Two digits: a RED one, an orange eight!") == ["two", "digits", "a", "red", "one", "an", "orange", "eight"]
    v = build_vocab(["a red one", "a blue one", "a red two"], min_count=2, source="train")
    # specials first, then by falling count, ties alphabetical: a(3) one(2) red(2)
    assert v.words == ["<pad>", "<unk>", "a", "one", "red"]
    assert v.encode("a blue one") == [2, UNK_ID, 3]
    assert v.encode("!!!") == [UNK_ID]  # never empty
    assert v.encode("a red one a red one", max_len=4) == [2, 4, 3, 2]
    assert Vocab.from_dict(v.to_dict()).words == v.words and PAD_ID == 0


def test_vocab_reads_only_the_train_split(tmp_path):
    """A word that only a test caption has must stay out of the vocabulary (vsepp#29)."""
    import io

    from PIL import Image

    from xray_match.data.writer import write_samples
    from xray_match.recipes.rdan import RDANRecipe

    def sample(split, i, caption):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        return {"__key__": f"{split}-{i}", "png": buf.getvalue(),
                "json": {"image_id": f"{split}-{i}", "split": split, "captions": [caption]}}

    root = str(tmp_path / "ds")
    write_samples(root, "toy", "train", [sample("train", i, "a red seven") for i in range(3)], maxcount=2, progress=False)
    write_samples(root, "toy", "val", [sample("val", 0, "a zebra seven")], progress=False)
    write_samples(root, "toy", "test", [sample("test", 0, "a giraffe seven")], progress=False)
    cfg = load_config(None, ["model.name=rdan", f"data.path={root}"])
    vocab = Vocab.from_dict(RDANRecipe.prepare(cfg, root)["vocab"])
    assert vocab.source == "train" and set(vocab.words[2:]) == {"a", "red", "seven"}
    assert vocab.encode("a giraffe seven") == [vocab.index["a"], UNK_ID, vocab.index["seven"]]
    # features without pixels (converted SCAN data) cannot feed the grid CNN, nor any recipe that
    # decodes images: refused before the data are read further
    from xray_match.driver.prepare import prepare_info

    nopix = str(tmp_path / "nopix")
    write_samples(nopix, "toy", "train", [sample("train", 0, "a red seven")], info={"convert": {"pixels": False}},
                  progress=False)
    for overrides, field in ((["model.name=rdan"], "rdan.region_source='grid'"), (["model.name=moco"], "model.name='moco'"),
                             (["model.name=dspe"], "dspe.image_source='cnn'")):
        with pytest.raises(ConfigError, match=f"^{field.split('=')[0]}: .*nopix.* info.convert.pixels = false.*"
                                              f"{re.escape(field)} reads images"):
            prepare_info(load_config(None, overrides + [f"data.path={nopix}"]), progress=False)
    # with precomputed regions the same data pass this check (and stop at the missing val split)
    with pytest.raises(ConfigError, match="data.val_split"):
        prepare_info(load_config(None, ["model.name=rdan", "rdan.region_source=precomputed", f"data.path={nopix}"]),
                     progress=False)


# ----------------------------------------------------------------------------- Eq. (1-4)


def test_eq1_region_projection_by_hand():
    enc = RegionEncoder(region_dim=2, embed_dim=2)
    with torch.no_grad():
        enc.fc.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        enc.fc.bias.copy_(torch.tensor([0.5, 1.0]))
    r = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # (1, k=2, d_v=2)
    # v = W r + b: [1+2+0.5, -1+1] = [3.5, 0]; [2+0.5, 0+1] = [2.5, 1]
    torch.testing.assert_close(enc(r), torch.tensor([[[3.5, 0.0], [2.5, 1.0]]]))


def scalar_word_encoder() -> WordEncoder:
    """word_dim = D = 1; GRU with only W_in = 1: r = z = sigmoid(0) = 0.5, n = tanh(x),
    h' = 0.5 tanh(x) + 0.5 h. Token 2 embeds to 1, token 3 to 2."""
    enc = WordEncoder(vocab_size=4, word_dim=1, embed_dim=1, num_layers=1)
    with torch.no_grad():
        for p in enc.gru.parameters():
            p.zero_()
        for w in (enc.gru.weight_ih_l0, enc.gru.weight_ih_l0_reverse):
            w[2, 0] = 1.0  # gate order r, z, n: W_in
        enc.embed.weight.copy_(torch.tensor([[0.0], [0.0], [1.0], [2.0]]))
    return enc


def test_eq2_4_bigru_mean_by_hand_and_padding():
    enc = scalar_word_encoder()
    # forward:  h1 = 0.5 tanh 1 = 0.380797, h2 = 0.5 tanh 2 + 0.5 h1 = 0.482014 + 0.190399 = 0.672413
    # backward: g2 = 0.5 tanh 2 = 0.482014, g1 = 0.5 tanh 1 + 0.5 g2 = 0.380797 + 0.241007 = 0.621804
    # Eq. (4): e1 = (0.380797 + 0.621804) / 2 = 0.501301, e2 = (0.672413 + 0.482014) / 2 = 0.577213
    expected = torch.tensor([0.501301, 0.577213])
    e = enc(torch.tensor([[2, 3]]), torch.tensor([2]))
    torch.testing.assert_close(e[0, :, 0], expected, rtol=0, atol=1e-6)
    # the same caption padded: identical words (the backward GRU starts at the last real word), zero padding
    e = enc(torch.tensor([[2, 3, 0, 0], [3, 0, 0, 0]]), torch.tensor([2, 1]))
    torch.testing.assert_close(e[0, :2, 0], expected, rtol=0, atol=1e-6)
    assert e[0, 2:].abs().max() == 0 and e[1, 1:].abs().max() == 0
    # a lone word: both directions see only x = 2 -> 0.5 tanh 2 = 0.482014
    assert e[1, 0, 0].item() == pytest.approx(0.5 * math.tanh(2.0), abs=1e-6)


# ----------------------------------------------------------------------------- Eq. (5-7)


def test_eq5_cosine_matrix_by_hand():
    v = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, k=2, 2)
    e = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])  # (1, n=3, 2), last word is padding
    s = cosine_all_pairs(v, e)[0, 0]
    r = 1 / math.sqrt(2)  # 0.707107
    torch.testing.assert_close(s, torch.tensor([[0.0, 1.0, 0.0], [r, r, 0.0]]))


def hand_relation_cnn(out_maps: int = 2) -> RelationCNN:
    """One channel: 3x1 and 1x3 all-ones (sums of 3 neighbours), 3x3 identity, head maps x1 and x2."""
    cnn = RelationCNN(channels=1, out_maps=out_maps)
    with torch.no_grad():
        for p in cnn.parameters():
            p.zero_()
        cnn.convs[0].weight.fill_(1.0)
        cnn.convs[1].weight.fill_(1.0)
        cnn.convs[2].weight[0, 0, 1, 1] = 1.0
        cnn.head.weight[:, 0, 0, 0] = torch.tensor([1.0, 2.0][:out_maps])
    return cnn


S_HAND = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (k=3, n=2)
# 3x1 (sum over regions i-1..i+1, zero border): [[4, 6], [9, 12], [8, 10]]
# 1x3 (sum over words j-1..j+1):                 [[10, 10], [21, 21], [18, 18]]
# 3x3 identity: unchanged; ReLU: all positive
X_HAND = torch.tensor([[10.0, 10.0], [21.0, 21.0], [18.0, 18.0]])


def test_eq6_relation_cnn_by_hand():
    out = hand_relation_cnn()(S_HAND[None])  # (1, 2, k, n)
    torch.testing.assert_close(out[0, 0], X_HAND)
    torch.testing.assert_close(out[0, 1], 2 * X_HAND)


def test_eq6_relu_after_each_layer():
    cnn = hand_relation_cnn()
    with torch.no_grad():
        cnn.convs[0].bias.fill_(-100.0)  # every 3x1 output negative -> ReLU zeroes everything
    assert cnn(S_HAND[None]).abs().max() == 0


def test_eq7_residual_and_switches():
    model = rdan(RegionEncoder(4, 4), WordEncoder(5, 2, 4, 1), relation_channels=1)
    model.relation = hand_relation_cnn()
    s = torch.stack([S_HAND])  # (P=1, k, n)
    mask = torch.ones(1, 2, dtype=torch.bool)
    s1, s2 = model.relation_maps(s, mask)
    torch.testing.assert_close(s1[0], X_HAND + S_HAND)  # Eq. (7): S^1 (+) S
    torch.testing.assert_close(s2[0], 2 * X_HAND + S_HAND)  # S^2 (+) S
    model.use_residual = False  # no-res
    s1, s2 = model.relation_maps(s, mask)
    torch.testing.assert_close(s1[0], X_HAND)
    model.relation, model.use_residual = None, True  # no-cnn: both maps are S
    s1, s2 = model.relation_maps(s, mask)
    assert torch.equal(s1, s) and torch.equal(s2, s)
    model.relation, model.one_path = hand_relation_cnn(out_maps=1), True  # one-path: one map for both
    s1, s2 = model.relation_maps(s, mask)
    torch.testing.assert_close(s1[0], X_HAND + S_HAND)
    assert torch.equal(s1, s2)


def test_relation_cnn_padding_equals_unpadded():
    """Padded words must not leak through the receptive fields (biases non-zero, random weights)."""
    torch.manual_seed(0)
    cnn = RelationCNN(channels=4)
    with torch.no_grad():
        for conv in cnn.convs:
            conv.bias.uniform_(0.5, 1.0)  # a bias at padded cells would leak without the masks
    s = torch.randn(1, 5, 3)
    padded = torch.cat([s, torch.randn(1, 5, 2)], dim=2)  # garbage in the padding
    mask = torch.tensor([[True, True, True, False, False]])
    out_p, out_u = cnn(padded, mask), cnn(s)
    torch.testing.assert_close(out_p[..., :3], out_u, rtol=1e-6, atol=1e-6)
    assert out_p[..., 3:].abs().max() == 0
    with torch.no_grad():  # the in-place inference path gives the same
        torch.testing.assert_close(cnn(padded, mask), out_p, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- Eq. (8-11)


def hand_model(mu: float, lambda_: float = 1.0) -> RDAN:
    return rdan(RegionEncoder(2, 2), WordEncoder(3, 2, 2, 1), lambda_=lambda_, mu=mu, use_cnn=False)


V_HAND = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, k=2, D=2)
E_HAND = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, n=2, D=2)
# S = [[1, 0.707107], [0, 0.707107]] (no-cnn: S^1 = S^2 = S), lambda = 1
# Eq. (8) rows:    alpha_1 = softmax(1, 0.707107) = (0.572704, 0.427296); a_1 = (1, 0.427296)
#                  alpha_2 = softmax(0, 0.707107) = (0.330238, 0.669762); a_2 = (1, 0.669762)
# Eq. (10) R_r:    cos(v_1, a_1) = 1 / sqrt(1 + 0.427296^2) = 0.919569
#                  cos(v_2, a_2) = 0.669762 / sqrt(1 + 0.669762^2) = 0.556479;  mean 0.738024
# Eq. (9) columns: beta_.1 = softmax(1, 0) = (0.731059, 0.268941); b_1 = (0.731059, 0.268941)
#                  beta_.2 = softmax(0.707107, 0.707107) = (0.5, 0.5); b_2 = (0.5, 0.5)
# Eq. (10) R_w:    cos(e_1, b_1) = 0.731059 / sqrt(0.731059^2 + 0.268941^2) = 0.938508; cos(e_2, b_2) = 1
#                  mean 0.969254
# Eq. (11) mu = 0.25: 0.75 * 0.738024 + 0.25 * 0.969254 = 0.795832


@pytest.mark.parametrize("mu, expected", [(0.25, 0.795832), (0.0, 0.738024), (1.0, 0.969254)])
def test_eq8_11_similarity_by_hand(mu, expected):
    f = hand_model(mu).pair_scores(V_HAND, E_HAND, torch.tensor([2]))
    assert f.shape == (1, 1) and f.item() == pytest.approx(expected, abs=1e-6)


def test_eq8_padded_words_get_no_attention_and_eq11_averages_real_words():
    padded = torch.cat([E_HAND, torch.zeros(1, 3, 2)], dim=1)  # n = 5, 2 real words
    f = hand_model(0.25).pair_scores(V_HAND, padded, torch.tensor([2]))
    assert f.item() == pytest.approx(0.795832, abs=1e-6)


def test_lambda_sharpens_attention():
    # lambda -> large: alpha_1 -> (1, 0), a_1 = e_1, R_r(v_1) -> 1; alpha_2 -> (0, 1), a_2 = e_2 -> 0.707107
    f = hand_model(0.0, lambda_=200.0).pair_scores(V_HAND, E_HAND, torch.tensor([2]))
    assert f.item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-5)


# ----------------------------------------------------------------------------- batched = per pair


def reference_pair(model: RDAN, v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Eq. (5-11) for ONE image (k, D) and ONE unpadded caption (n, D), written as in the paper
    (library convolutions, attended vectors a_i, b_j materialised)."""
    s = Fn.normalize(v, dim=-1) @ Fn.normalize(e, dim=-1).t()  # (k, n)
    if model.relation is None:
        s1 = s2 = s
    else:
        x = s[None, None]
        for conv in model.relation.convs:
            x = Fn.relu(conv(x))
        maps = model.relation.head(x)[0] + (s if model.use_residual else 0)
        s1, s2 = (maps[0], maps[0]) if model.one_path else (maps[0], maps[1])
    a = torch.softmax(model.lambda_ * s2, dim=1) @ e  # (k, D)
    b = torch.softmax(model.lambda_ * s1, dim=0).t() @ v  # (n, D)
    r_r = Fn.cosine_similarity(v, a, dim=-1).mean()
    r_w = Fn.cosine_similarity(e, b, dim=-1).mean()
    return (1 - model.mu) * r_r + model.mu * r_w


VARIANTS = [{}, {"one_path": True}, {"use_cnn": False}, {"use_residual": False}, {"mu": 0.0}, {"mu": 1.0}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "full")
def test_batched_scores_equal_per_pair_loop_with_padding(variant):
    torch.manual_seed(0)
    model = rdan(RegionEncoder(8, 16), WordEncoder(30, 8, 16, 1), relation_channels=4, lambda_=4.0, **({"mu": 0.3} | variant))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.5, 0.5)
    v = torch.randn(3, 5, 16)
    lengths = torch.tensor([1, 4, 6, 2])
    e = torch.randn(4, 6, 16) * (torch.arange(6).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    with torch.no_grad():
        batched = model.pair_scores(v, e, lengths)
        loop = torch.tensor([[reference_pair(model, v[i], e[c, : lengths[c]]).item() for c in range(4)] for i in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)
    # training mode (autograd path, no in-place ops) gives the same numbers
    torch.testing.assert_close(model.pair_scores(v, e, lengths).detach(), loop, rtol=1e-5, atol=1e-5)


def test_chunked_all_pairs_equals_loop():
    from xray_match.metrics.xattn import score_all_pairs

    torch.manual_seed(1)
    model = rdan(RegionEncoder(8, 16), WordEncoder(30, 8, 16, 1), relation_channels=4).eval()
    v, lengths = torch.randn(5, 4, 16), torch.tensor([3, 1, 5, 5, 2, 1])
    e = torch.randn(6, 5, 16) * (torch.arange(5).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    loop = torch.tensor([[reference_pair(model, v[i], e[c, : lengths[c]]).item() for c in range(6)] for i in range(5)])
    out = score_all_pairs(model.pair_scores, v, e, lengths, caption_block=2, cell_budget=80)
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    model = build_rdan(12, **(ARGS | dict(embed_dim=16, word_dim=8, backbone_width=4, relation_channels=4)))
    batch = {"images": torch.randn(3, 3, 32, 32), "tokens": torch.tensor([[2, 3, 4], [5, 6, 0], [7, 0, 0]]),
             "lengths": torch.tensor([3, 2, 1])}
    out = model(batch)
    assert out["scores"].shape == (3, 3)
    loss = HingeRankingLoss(0.2)(out, batch)["rank_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.words.embed.weight.grad[PAD_ID].abs().max() == 0  # padding row never learns


# ----------------------------------------------------------------------------- Eq. (12-13)

# positives on the diagonal; margin 0.2
L_HAND = torch.tensor([[0.8, 0.5, 0.1], [0.7, 0.4, 0.3], [0.2, 0.65, 0.9]])
# Eq. (12): pair 0 (0.8): captions [0.5, 0.1] -> 0, 0; images [0.7, 0.2] -> 0.1, 0
#           pair 1 (0.4): captions [0.7, 0.3] -> 0.5, 0.1; images [0.5, 0.65] -> 0.3, 0.45
#           pair 2 (0.9): captions [0.2, 0.65] -> 0, 0; images [0.1, 0.3] -> 0, 0
#           caption term 0.6, image term 0.85
# Eq. (13): hardest: pair 0 caption 0.5 -> 0, image 0.7 -> 0.1; pair 1 caption 0.7 -> 0.5, image 0.65 -> 0.45;
#           pair 2 caption 0.65 -> 0, image 0.3 -> 0; caption term 0.5, image term 0.55


def test_eq12_all_negatives_by_hand():
    t, i = hinge_all_negatives(L_HAND, 0.2)
    assert t.item() == pytest.approx(0.6) and i.item() == pytest.approx(0.85)
    t, i = hinge_all_negatives(L_HAND, 0.2, reduction="mean")
    assert t.item() == pytest.approx(0.2) and i.item() == pytest.approx(0.85 / 3)


def test_eq13_hardest_negatives_by_hand():
    t, i = hinge_hardest_negatives(L_HAND, 0.2)
    assert t.item() == pytest.approx(0.5) and i.item() == pytest.approx(0.55)
    out = HingeRankingLoss(0.2, hardest=True)({"scores": L_HAND})
    assert out["rank_loss"].item() == pytest.approx(1.05)
    assert HingeRankingLoss(0.2, hardest=False)({"scores": L_HAND})["rank_loss"].item() == pytest.approx(1.45)


def test_ranking_ignore_mask_and_rectangular_batches():
    ignore = torch.zeros(3, 3, dtype=torch.bool)
    ignore[1, 0] = True  # image 1 with caption 0: not a negative (e.g. identical captions)
    # pair 0 images: only 0.2 -> 0; pair 1 captions: only 0.3 -> 0.1; rest as before
    t, i = hinge_hardest_negatives(L_HAND, 0.2, ignore=ignore)
    assert t.item() == pytest.approx(0.1) and i.item() == pytest.approx(0.45)
    # 2 images, 3 captions (image 0 owns c0, c1)
    s = torch.tensor([[0.9, 0.5, 0.6], [0.3, 0.7, 0.8]])
    # c0 (0.9): caption neg c2 0.6 -> 0, image neg 0.3 -> 0; c1 (0.5): c2 0.6 -> 0.3, image 0.7 -> 0.4
    # c2 (0.8): hardest of c0 0.3, c1 0.7 -> 0.1, image 0.6 -> 0
    t, i = hinge_hardest_negatives(s, 0.2, caption_image=torch.tensor([0, 0, 1]))
    assert t.item() == pytest.approx(0.4) and i.item() == pytest.approx(0.4)
    # a batch of one has no negatives: zero loss, no NaN
    t, i = hinge_hardest_negatives(torch.tensor([[0.3]]), 0.2)
    assert t.item() == 0 and i.item() == 0
    with pytest.raises(ValueError, match="give caption_image"):
        hinge_hardest_negatives(s, 0.2)


def test_hardest_warmup_uses_all_negatives_first():
    from xray_match.recipes.rdan import RDANLoss

    loss = RDANLoss(0.2, hardest=True, reduction="sum", warmup_steps=2)
    values = [loss({"scores": L_HAND}, {})["rank_loss"].item() for _ in range(3)]
    assert values == pytest.approx([1.45, 1.45, 1.05])  # Eq. (12) twice, then Eq. (13)
    assert int(loss.state_dict()["steps"]) == 3
    loss.eval()  # evaluation neither counts nor warms up
    assert loss({"scores": L_HAND}, {})["rank_loss"].item() == pytest.approx(1.05) and int(loss.steps) == 3


# ----------------------------------------------------------------------------- Table 3 switches


def test_table3_switches_reach_model_and_loss(tiny_scenes):
    from xray_match.recipes.rdan import ABLATIONS, RDANRecipe, effective
    from xray_match.train.recipe import DataInfo

    base = load_config(None, ["model.name=rdan", f"data.path={tiny_scenes}", "rdan.embed_dim=16", "rdan.word_dim=8",
                              "rdan.relation_channels=4", "rdan.backbone_width=4"])
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240}, RDANRecipe.prepare(base, tiny_scenes))
    built = {}
    for name in ABLATIONS:
        recipe = RDANRecipe(base.with_overrides({"rdan.ablation": name}), info)
        built[name] = (recipe.build_model(), recipe.build_loss())
    assert built["none"][0].mu == 0.1 and built["none"][0].relation.out_maps == 2 and built["none"][1].rank.hardest
    assert built["mu0"][0].mu == 0.0 and built["mu1"][0].mu == 1.0
    assert built["one-path"][0].relation.out_maps == 1
    assert built["no-cnn"][0].relation is None
    assert built["no-res"][0].use_residual is False and built["no-res"][0].relation is not None
    assert built["no-hard"][1].rank.hardest is False
    with pytest.raises(ConfigError, match="no matrix to attend on"):
        effective(base.with_overrides({"rdan.use_cnn": False, "rdan.use_residual": False}))


def test_mu_selects_the_pathway():
    """mu = 0 reads only S^2 (row-wise attention), mu = 1 only S^1 (column-wise)."""
    torch.manual_seed(0)
    v, e, lengths = torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.tensor([5, 3, 2])
    for mu, untouched_map in ((0.0, 0), (1.0, 1)):
        model = rdan(RegionEncoder(8, 8), WordEncoder(5, 4, 8, 1), relation_channels=4, mu=mu)
        before = model.pair_scores(v, e, lengths).detach()
        with torch.no_grad():
            model.relation.head.weight[untouched_map].mul_(-3.0)  # change the map this mu must not read
        torch.testing.assert_close(model.pair_scores(v, e, lengths).detach(), before)
        with torch.no_grad():
            model.relation.head.weight[1 - untouched_map].mul_(-3.0)
        assert not torch.allclose(model.pair_scores(v, e, lengths).detach(), before)


# ----------------------------------------------------------------------------- recipe on real shards


def tiny_cfg(tiny_scenes, *extra):
    return load_config("rdan_cpu", [f"data.path={tiny_scenes}", "rdan.embed_dim=32", "rdan.word_dim=16",
                                    "rdan.relation_channels=4", "rdan.backbone_width=4", "data.batch_size=8",
                                    "data.eval_batch_size=20", "data.num_workers=0", *extra])


def test_recipe_step_and_evaluate_on_shards(tiny_scenes, tmp_path):
    from xray_match.data.reader import make_loader
    from xray_match.recipes.rdan import RDANRecipe
    from xray_match.train.recipe import DataInfo, EvalContext

    cfg = tiny_cfg(tiny_scenes, "train.max_eval_samples=0")
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240}, RDANRecipe.prepare(cfg, tiny_scenes))
    recipe = RDANRecipe(cfg, info)
    model, loss_fn = recipe.build_model(), recipe.build_loss()
    train = make_loader(tiny_scenes, "train", recipe.transform(True), recipe.collate, batch_size=8, train=True)
    batch = next(iter(train))
    assert batch["images"].shape == (8, 3, 64, 64) and batch["tokens"].shape[0] == 8
    assert batch["ignore_pairs"].shape == (8, 8) and not batch["ignore_pairs"].diagonal().any()
    losses = loss_fn(recipe.forward(model, batch), batch)
    assert set(losses) >= {"rank_loss", "pos_score", "neg_score"} and losses["rank_loss"].requires_grad
    losses["rank_loss"].backward()

    model.eval()
    val = make_loader(tiny_scenes, "val", recipe.transform(False), recipe.collate, batch_size=20, train=False)
    ctx = EvalContext(out_dir=str(tmp_path))
    metrics = recipe.evaluate(model, val, ctx)
    assert metrics["images"] == 60 and metrics["captions"] == 300
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "rank_loss"} <= set(metrics)
    assert 0 <= metrics["rsum"] <= 600 and ctx.artifacts and ctx.artifacts[0].endswith(".png")
    # 5-fold protocol on the 60 images: 5 folds of 12, means under their own names
    folded = RDANRecipe(cfg.with_overrides({"rdan.eval_folds": 5}), info).evaluate(model, val, EvalContext())
    assert {"5fold_rsum", "5fold_i2t_r1"} <= set(folded) and folded["rsum"] == pytest.approx(metrics["rsum"])
    # max_eval_samples caps the validation split only
    capped = RDANRecipe(cfg.with_overrides({"train.max_eval_samples": 20}), info).evaluate(model, val, EvalContext())
    assert capped["images"] == 20
    test = make_loader(tiny_scenes, "test", recipe.transform(False), recipe.collate, batch_size=20, train=False)
    assert RDANRecipe(cfg.with_overrides({"train.max_eval_samples": 20}), info).evaluate(model, test, EvalContext())["images"] == 60

    inf = recipe.inference(model)
    from PIL import Image

    scores = inf.score([Image.new("RGB", (64, 64), "red")] * 2, ["a red seven", "two digits: a blue one and a red two"])
    assert scores.shape == (2, 2)
    assert inf.rank_texts(Image.new("RGB", (64, 64)), ["a", "b c"])[0][0] in (0, 1)


def test_presets_and_spaces_load():
    from ray.tune.search.sample import Domain

    from xray_match.driver.tuner import check_space, is_grid
    from xray_match.registry import SPACES

    cpu, gpu = load_config("rdan_cpu"), load_config("rdan_gpu")
    assert cpu.model.name == gpu.model.name == "rdan"
    assert (gpu.rdan.embed_dim, gpu.rdan.word_dim, gpu.rdan.relation_channels, gpu.rdan.grid**2) == (1024, 300, 32, 36)
    assert (gpu.rdan.lambda_, gpu.rdan.mu, gpu.rdan.margin, gpu.rdan.hardest) == (4.0, 0.1, 0.2, True)
    space = SPACES.get("rdan")(cpu)
    assert set(space) == {"rdan.mu", "rdan.lambda_", "rdan.margin", "optim.lr"} and all(isinstance(d, Domain) for d in space.values())
    check_space(cpu, space)
    grid = SPACES.get("rdan_ablation")(cpu)
    assert is_grid(grid) and len(grid["rdan.ablation"]["grid_search"]) == 7
    check_space(cpu, grid)
    with pytest.raises(ConfigError, match="rdan.ablation"):
        load_config("rdan_cpu", ["rdan.ablation=no-such-row"])


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_worker_ray_training_run(ray_cluster, tiny_scenes, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from xray_match.driver.worker import run_training

    cfg = tiny_cfg(tiny_scenes, "train.epochs=1", "data.steps_per_epoch=2", f"ray.storage_path={tmp_path / 'runs'}",
                   f"tracking.tracking_uri={mlflow_uri}", "ray.cpus_per_worker=1", "ray.num_workers=2",
                   "train.max_eval_samples=0")
    out = run_training(cfg)
    m = out["metrics"]
    assert m["epoch"] == 1.0 and m["val/images"] == 60.0 and m["val/captions"] == 300.0
    assert 0 <= m["val/rsum"] <= 600 and math.isfinite(m["train/rank_loss"])
    state = out["checkpoint"].load()
    assert state["loop"]["step"] == 2 and state["info"]["prepared"]["vocab"]["source"] == "train"
    client = MlflowClient(mlflow_uri)
    assert [x.step for x in client.get_metric_history(out["run_id"], "val/rsum")] == [1]
    assert str(client.get_model_version_by_alias("xray-match-rdan", "champion").version) == str(out["model_version"])
