"""SCAN baseline (Lee et al., ECCV 2018; xray_match.models.scan): each equation against hand-computed
values on tiny tensors, AVG vs LSE, masking of padded words, batched = per-pair scoring, the recipe on
real shards (shared with RDAN's) and a few training steps of the plain loop (the Ray path is the
recipe RDAN shares with it: tests/test_rdan.py runs it on 2 workers)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as Fn

from xray_match.config import RDANConfig, SCANConfig, load_config
from xray_match.models.rdan import RegionEncoder, WordEncoder, attend_regions, attend_words, cosine_all_pairs
from xray_match.models.scan import SCAN, build_scan, clipped_l2norm, pool_avg, pool_lse

# ----------------------------------------------------------------------------- hand example
# Unit vectors, so SCAN's feature normalisation changes nothing:
#   v_1 = (1, 0), v_2 = (0.6, 0.8);  e_1 = (1, 0), e_2 = (0, 1), e_3 = (-0.6, 0.8)
#   s_ij = cos(v_i, e_j):  S = [[1, 0, -0.6], [0.6, 0.8, 0.28]]
V_HAND = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # (1, k=2, D=2)
E_HAND = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]])  # (1, n=3, D=2)
S_HAND = torch.tensor([[1.0, 0.0, -0.6], [0.6, 0.8, 0.28]])
# clipped: [[1, 0, 0], [0.6, 0.8, 0.28]]
# s-bar (i-t, over regions): column norms sqrt(1 + 0.36) = 1.166190, 0.8, 0.28
#   -> [[0.857493, 0, 0], [0.514496, 1, 1]]
SBAR_HAND = torch.tensor([[0.857493, 0.0, 0.0], [0.514496, 1.0, 1.0]])
# s' (t-i, over words): row norms 1, sqrt(0.36 + 0.64 + 0.0784) = 1.038460
#   -> [[1, 0, 0], [0.577778, 0.770371, 0.269630]]
SPRIME_HAND = torch.tensor([[1.0, 0.0, 0.0], [0.577778, 0.770371, 0.269630]])
#
# i-t, lambda_1 = 4: alpha_1 = softmax(3.429972, 0, 0) = (0.939165, 0.030418, 0.030418)
#                    a_1 = 0.939165 e_1 + 0.030418 e_2 + 0.030418 e_3 = (0.920914, 0.054752)
#                    R(v_1, a_1) = 0.920914 / |a_1| = 0.998237
#                    alpha_2 = softmax(2.057983, 4, 4) = (0.066909, 0.466545, 0.466545)
#                    a_2 = (0.066909 - 0.6 * 0.466545, 0.466545 + 0.8 * 0.466545) = (-0.213018, 0.839782)
#                    R(v_2, a_2) = (0.6 * -0.213018 + 0.8 * 0.839782) / |a_2| = 0.627919
#   S_AVG = (0.998237 + 0.627919) / 2 = 0.813078
#   S_LSE (lambda_2 = 6) = log(exp(5.989422) + exp(3.767514)) / 6 = 1.015390
IT_R = torch.tensor([0.998237, 0.627919])
IT_AVG, IT_LSE = 0.813078, 1.015390
# t-i, lambda_1 = 9: alpha'_.1 = softmax over regions (9, 5.2) = (0.978119, 0.021881)
#                    a_1^v = (0.978119 + 0.6 * 0.021881, 0.8 * 0.021881) = (0.991247, 0.017505); R = 0.999844
#                    alpha'_.2 = softmax(0, 6.933341) = (0.000974, 0.999026); a_2^v = (0.600390, 0.799221); R = 0.799532
#                    alpha'_.3 = softmax(0, 2.426669) = (0.081162, 0.918838); a_3^v = (0.632465, 0.735071)
#                    R(e_3, a_3^v) = (-0.6 * 0.632465 + 0.8 * 0.735071) / |a_3^v| = 0.215093
#   S_AVG = (0.999844 + 0.799532 + 0.215093) / 3 = 0.671490
#   S_LSE (lambda_2 = 6) = log(exp(5.999064) + exp(4.797192) + exp(1.290558)) / 6 = 1.044804
TI_R = torch.tensor([0.999844, 0.799532, 0.215093])
TI_AVG, TI_LSE = 0.671490, 1.044804


def _defaults(fn) -> dict:
    """``fn``'s keyword-only arguments at SCANConfig's defaults (their one home; each must be a field)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: getattr(SCANConfig(), p.name) for p in params if p.kind is p.KEYWORD_ONLY}


def scan(**kw) -> SCAN:
    """A SCAN with tiny encoders (unused by the equation tests) at SCANConfig's defaults for the rest."""
    return SCAN(RegionEncoder(2, 2), WordEncoder(5, 2, 2, 1), **(_defaults(SCAN) | kw))


def test_defaults_are_the_papers():
    """SCAN's Flickr30K t-i AVG (lambda_1 = 9), lambda_2 = 6 for LSE, margin 0.2, hardest negatives."""
    c = SCANConfig()
    assert (c.direction, c.pooling, c.lambda_1, c.lambda_2) == ("t-i", "avg", 9.0, 6.0)
    assert (c.margin, c.hardest, c.loss_reduction) == (0.2, True, "sum")
    assert (c.embed_dim, c.word_dim, c.gru_layers, c.feature_norm) == (1024, 300, 1, True)


# ----------------------------------------------------------------------------- the equations


def test_cosine_similarity_by_hand():
    """s_ij = v_i.e_j / (|v_i| |e_j|): RDAN's Eq. (5), the same function."""
    torch.testing.assert_close(cosine_all_pairs(V_HAND, E_HAND)[0, 0], S_HAND)


def test_clipped_l2_normalisation_by_hand():
    """s-bar_ij = [s_ij]_+ / sqrt(sum_i [s_ij]_+^2) (i-t, over regions); s'_ij = [s_ij]_+ / sqrt(sum_j
    [s_ij]_+^2) (t-i, over words). A column without a positive entry stays 0."""
    torch.testing.assert_close(clipped_l2norm(S_HAND, dim=0), SBAR_HAND, rtol=0, atol=1e-6)
    torch.testing.assert_close(clipped_l2norm(S_HAND, dim=1), SPRIME_HAND, rtol=0, atol=1e-6)
    assert clipped_l2norm(torch.tensor([[-1.0], [-0.5]]), dim=0).abs().max() == 0


def test_image_text_attention_and_relevance_by_hand():
    """i-t: alpha_ij = softmax_j(lambda_1 s-bar_ij), a_i^t = sum_j alpha_ij e_j, R(v_i, a_i^t) = cos."""
    s = S_HAND[None, None]  # (A=1, B=1, k, n)
    mask = torch.ones(1, 1, 3, dtype=torch.bool)
    r = attend_words(4.0 * SBAR_HAND[None, None], s, E_HAND[None], E_HAND.norm(dim=-1)[None], mask)
    torch.testing.assert_close(r[0, 0], IT_R, rtol=0, atol=1e-5)


def test_text_image_attention_and_relevance_by_hand():
    """t-i: alpha'_ij = softmax_i(lambda_1 s'_ij), a_j^v = sum_i alpha'_ij v_i, R(e_j, a_j^v) = cos."""
    s = S_HAND[None, None]
    mask = torch.ones(1, 1, 3, dtype=torch.bool)
    r = attend_regions(9.0 * SPRIME_HAND[None, None], s, V_HAND[None], V_HAND.norm(dim=-1)[None], mask)
    torch.testing.assert_close(r[0, 0], TI_R, rtol=0, atol=1e-5)


def test_avg_and_lse_pooling_by_hand():
    """S_AVG = mean_m R_m; S_LSE = (1/lambda_2) log sum_m exp(lambda_2 R_m); masked entries left out."""
    r = torch.tensor([0.5, 0.9])
    assert pool_avg(r).item() == pytest.approx(0.7)
    # log(e^3 + e^5.4) / 6 = 0.914473: above the max 0.9 (a log-sum, not a log-mean)
    assert pool_lse(r, 6.0).item() == pytest.approx(0.914473, abs=1e-6)
    padded, mask = torch.tensor([0.5, 0.9, 7.0]), torch.tensor([True, True, False])
    assert pool_avg(padded, mask).item() == pytest.approx(0.7)
    assert pool_lse(padded, 6.0, mask).item() == pytest.approx(0.914473, abs=1e-6)
    # lambda_2 -> large: LSE -> max; LSE >= max always
    assert pool_lse(r, 500.0).item() == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize("direction, pooling, lambda_1, expected", [
    ("i-t", "avg", 4.0, IT_AVG), ("i-t", "lse", 4.0, IT_LSE), ("t-i", "avg", 9.0, TI_AVG), ("t-i", "lse", 9.0, TI_LSE),
])
def test_image_text_score_by_hand(direction, pooling, lambda_1, expected):
    """S(I, T) of the four SCAN models end to end (``pair_scores`` = ``paired_scores``)."""
    model = scan(direction=direction, pooling=pooling, lambda_1=lambda_1, lambda_2=6.0)
    f = model.pair_scores(V_HAND, E_HAND, torch.tensor([3]))
    assert f.shape == (1, 1) and f.item() == pytest.approx(expected, abs=1e-5)
    assert model.paired_scores(V_HAND, E_HAND, torch.tensor([3])).item() == pytest.approx(expected, abs=1e-5)


def test_padded_words_get_no_attention_and_no_pooling_weight():
    """A caption padded with zeros - or with garbage, which the word mask must keep out - scores like
    the caption alone, in both formulations and both poolings."""
    torch.manual_seed(0)
    garbage = torch.randn(1, 2, 2)
    for direction, pooling in (("i-t", "avg"), ("i-t", "lse"), ("t-i", "avg"), ("t-i", "lse")):
        model = scan(direction=direction, pooling=pooling)
        alone = model.pair_scores(V_HAND, E_HAND, torch.tensor([3]))
        for pad in (torch.zeros(1, 2, 2), garbage):
            padded = model.pair_scores(V_HAND, torch.cat([E_HAND, pad], 1), torch.tensor([3]))
            torch.testing.assert_close(padded, alone, rtol=1e-6, atol=1e-6)
    # t-i over the first two words only: s' renormalised over 2 words, rows [1, 0], [0.6, 0.8];
    # R = (0.999769, 0.799642), S_AVG = 0.899705 (the third word is gone, not averaged in as 0)
    f = scan(direction="t-i", pooling="avg", lambda_1=9.0).pair_scores(V_HAND, E_HAND, torch.tensor([2]))
    assert f.item() == pytest.approx(0.899705, abs=1e-5)


def test_lambda_1_sharpens_the_attention():
    """lambda_1 -> large: each region attends to its best word only. i-t: region 1 -> e_1 (R = 1),
    region 2 -> ties e_2, e_3 (s-bar = 1 both): a_2 = (e_2 + e_3) / 2 = (-0.3, 0.9),
    R = (0.6 * -0.3 + 0.8 * 0.9) / 0.948683 = 0.569210; S_AVG = (1 + 0.569210) / 2 = 0.784605."""
    f = scan(direction="i-t", pooling="avg", lambda_1=500.0).pair_scores(V_HAND, E_HAND, torch.tensor([3]))
    assert f.item() == pytest.approx((1 + 0.54 / math.sqrt(0.09 + 0.81)) / 2, abs=1e-5)


def test_feature_norm_normalises_the_encoders_outputs():
    model = scan(feature_norm=True)
    v = model.encode_images(torch.randn(3, 4, 2))
    e = model.encode_texts(torch.tensor([[2, 3, 0], [4, 0, 0]]), torch.tensor([2, 1]))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(e.norm(dim=-1), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # padding stays 0


# ----------------------------------------------------------------------------- batched = per pair


def reference_pair(model: SCAN, v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """S(I, T) for ONE image (k, D) and ONE unpadded caption (n, D), written as in the paper: the
    attended vectors materialised, library cosines."""
    s = Fn.normalize(v, dim=-1) @ Fn.normalize(e, dim=-1).t()  # (k, n)
    c = s.clamp_min(0)
    if model.direction == "i-t":
        s_bar = c / c.pow(2).sum(0, keepdim=True).sqrt().clamp_min(1e-8)
        a = torch.softmax(model.lambda_1 * s_bar, dim=1) @ e  # (k, D) a_i^t
        r = Fn.cosine_similarity(v, a, dim=-1)  # (k,)
    else:
        s_bar = c / c.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-8)
        a = torch.softmax(model.lambda_1 * s_bar, dim=0).t() @ v  # (n, D) a_j^v
        r = Fn.cosine_similarity(e, a, dim=-1)  # (n,)
    if model.pooling == "avg":
        return r.mean()
    return torch.log(torch.exp(model.lambda_2 * r).sum()) / model.lambda_2


VARIANTS = [("t-i", "avg"), ("t-i", "lse"), ("i-t", "avg"), ("i-t", "lse")]


@pytest.mark.parametrize("direction, pooling", VARIANTS)
def test_batched_scores_equal_per_pair_loop_with_padding(direction, pooling):
    """The score matrix of a batch (one matmul, no attended vectors) = a per-pair loop; so do the
    given-pairs scorer and the chunked, length-grouped all-pairs scorer of evaluation."""
    from xray_match.metrics.xattn import score_all_pairs

    torch.manual_seed(0)
    model = scan(direction=direction, pooling=pooling, lambda_1=4.0, feature_norm=False)
    v = torch.randn(3, 5, 16)
    lengths = torch.tensor([1, 4, 6, 2])
    e = torch.randn(4, 6, 16) * (torch.arange(6).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    loop = torch.tensor([[reference_pair(model, v[i], e[c, : lengths[c]]).item() for c in range(4)] for i in range(3)])
    torch.testing.assert_close(model.pair_scores(v, e, lengths).detach(), loop, rtol=1e-5, atol=1e-5)
    img, cap = torch.tensor([0, 2, 1, 2]), torch.tensor([3, 0, 1, 2])
    torch.testing.assert_close(model.paired_scores(v[img], e[cap], lengths[cap]).detach(), loop[img, cap],
                               rtol=1e-5, atol=1e-5)
    out = score_all_pairs(model.pair_scores, v, e, lengths, caption_block=2, cell_budget=60)
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_part():
    from xray_match.losses.ranking import HingeRankingLoss

    torch.manual_seed(0)
    args = _defaults(build_scan) | dict(embed_dim=16, word_dim=8, backbone_width=4)
    model = build_scan(12, **args)
    batch = {"images": torch.randn(3, 3, 32, 32), "tokens": torch.tensor([[2, 3, 4], [5, 6, 0], [7, 0, 0]]),
             "lengths": torch.tensor([3, 2, 1])}
    out = model(batch)
    assert out["scores"].shape == (3, 3)
    HingeRankingLoss(0.2)(out, batch)["rank_loss"].backward()
    for name, p in model.named_parameters():  # finite too: padded words are all-zero slices of S
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for direction in ("i-t", "t-i"):  # both normalisation axes, with an all-negative region and padding
        model = scan(direction=direction)
        v = torch.tensor([[[1.0, 0.0], [-1.0, -1.0]]], requires_grad=True)
        e = torch.tensor([[[1.0, 0.5], [0.0, 1.0], [0.0, 0.0]]], requires_grad=True)
        model.pair_scores(v, e, torch.tensor([2])).sum().backward()
        assert torch.isfinite(v.grad).all() and torch.isfinite(e.grad).all(), direction


# ----------------------------------------------------------------------------- loss and recipe


def tiny_cfg(tiny_scenes, *extra):
    return load_config("scan_cpu", [f"data.path={tiny_scenes}", "scan.embed_dim=32", "scan.word_dim=16",
                                    "scan.backbone_width=4", "data.batch_size=8", "data.eval_batch_size=20",
                                    "data.num_workers=0", *extra])


def test_hardest_negative_loss_by_hand(tiny_scenes):
    """The recipe's loss is the hinge triplet loss with the hardest negatives (VSE++ max of hinges),
    margin alpha = 0.2, summed over the batch. Scores [[0.9, 0.8], [0.3, 0.5]], positives on the diagonal:
    pair 1 (0.9): hardest caption 0.8 -> [0.2 - 0.9 + 0.8]_+ = 0.1, hardest image 0.3 -> 0;
    pair 2 (0.5): hardest caption 0.3 -> 0, hardest image 0.8 -> 0.5; total 0.6.
    With hardest=False (all negatives, one each here) the same; the warm-up counts steps."""
    from xray_match.recipes.scan import SCANRecipe
    from xray_match.train.recipe import DataInfo

    cfg = tiny_cfg(tiny_scenes, "scan.hardest_warmup_steps=0")
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240}, SCANRecipe.prepare(cfg, tiny_scenes))
    loss = SCANRecipe(cfg, info).build_loss()
    out = loss({"scores": torch.tensor([[0.9, 0.8], [0.3, 0.5]])}, {})
    assert out["rank_loss"].item() == pytest.approx(0.6)
    assert out["rank_caption_neg"].item() == pytest.approx(0.1) and out["rank_image_neg"].item() == pytest.approx(0.5)
    three = torch.tensor([[0.8, 0.5, 0.1], [0.7, 0.4, 0.3], [0.2, 0.65, 0.9]])  # tests/test_rdan.py L_HAND
    assert loss({"scores": three}, {})["rank_loss"].item() == pytest.approx(1.05)  # hardest: 0.5 + 0.55
    assert SCANRecipe(cfg.with_overrides({"scan.hardest": False}), info).build_loss()(
        {"scores": three}, {})["rank_loss"].item() == pytest.approx(1.45)  # all negatives: 0.6 + 0.85


def test_recipe_step_and_evaluate_on_shards(tiny_scenes, tmp_path):
    from PIL import Image

    from xray_match.data.reader import make_loader
    from xray_match.models.scan import SCAN as SCANModel
    from xray_match.recipes.scan import SCANRecipe
    from xray_match.train.recipe import DataInfo, EvalContext

    cfg = tiny_cfg(tiny_scenes, "train.max_eval_samples=0", "scan.direction=i-t", "scan.pooling=lse")
    info = DataInfo(tiny_scenes, "digit-scenes", {"train": 240}, SCANRecipe.prepare(cfg, tiny_scenes))
    recipe = SCANRecipe(cfg, info)
    assert recipe.pixels_field(cfg) == "scan.region_source"
    model, loss_fn = recipe.build_model(), recipe.build_loss()
    assert isinstance(model, SCANModel) and (model.direction, model.pooling, model.lambda_2) == ("i-t", "lse", 6.0)
    train = make_loader(tiny_scenes, "train", recipe.transform(True), recipe.collate, batch_size=8, train=True)
    batch = next(iter(train))
    assert batch["images"].shape == (8, 3, 64, 64) and batch["ignore_pairs"].shape == (8, 8)
    losses = loss_fn(recipe.forward(model, batch), batch)
    assert losses["rank_loss"].requires_grad and math.isfinite(losses["rank_loss"].item())
    losses["rank_loss"].backward()

    model.eval()
    val = make_loader(tiny_scenes, "val", recipe.transform(False), recipe.collate, batch_size=20, train=False)
    ctx = EvalContext(out_dir=str(tmp_path))
    metrics = recipe.evaluate(model, val, ctx)
    assert metrics["images"] == 60 and metrics["captions"] == 300 and metrics["pairs_scored"] == 60 * 300
    assert {"i2t_r1", "t2i_r10", "rsum", "rank_loss"} <= set(metrics) and 0 <= metrics["rsum"] <= 600
    assert ctx.artifacts and ctx.artifacts[0].endswith(".png")
    # the evaluation's matrix is the model's own all-pairs scores (RDAN's path, SCAN's similarity)
    scores = recipe.inference(model).score([Image.new("RGB", (64, 64), "red")] * 2, ["a red seven", "two digits"])
    assert scores.shape == (2, 2)


def test_preset_matches_rdan_cpu_budget_and_spaces_load():
    from ray.tune.search.sample import Domain

    from xray_match.driver.tuner import check_space, is_grid
    from xray_match.registry import SPACES

    scan_cfg, rdan_cfg = load_config("scan_cpu"), load_config("rdan_cpu")
    assert scan_cfg.model.name == "scan"
    shared_inputs = ("region_source", "backbone", "backbone_width", "grid", "region_dim", "embed_dim", "word_dim",
                     "gru_layers", "min_word_count", "margin", "loss_reduction", "hardest_warmup_steps",
                     "ignore_duplicates", "eval_folds", "eval_caption_block", "eval_cell_budget")
    for name in shared_inputs:  # the same features, vocabulary, loss schedule and evaluation
        assert getattr(scan_cfg.scan, name) == getattr(rdan_cfg.rdan, name), name
    assert {n for n in RDANConfig.__dataclass_fields__} >= set(shared_inputs)
    for section in ("optim", "train", "data", "ray"):  # the same budget
        assert getattr(scan_cfg, section) == getattr(rdan_cfg, section), section
    space = SPACES.get("scan")(scan_cfg)
    assert all(isinstance(d, Domain) for d in space.values())
    check_space(scan_cfg, space)
    grid = SPACES.get("scan_variants")(scan_cfg)
    assert is_grid(grid)
    check_space(scan_cfg, grid)
    flat = scan_cfg.flat(method="scan")  # a SCAN run logs its own section, not RDAN's
    assert "scan.lambda_1" in flat and not any(k.startswith("rdan.") for k in flat)


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_few_training_steps_of_the_plain_loop(tiny_scenes):
    """3 steps of the shared loop (no Ray) on digit scenes, then the validation evaluation."""
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import run

    cfg = tiny_cfg(tiny_scenes, "train.epochs=1", "data.steps_per_epoch=3", "tracking.enabled=false",
                   "ray.num_workers=1", "train.max_eval_samples=20", "scan.hardest_warmup_steps=2")
    trainer = run(cfg, prepare_info(cfg, progress=False), log=lambda s: None)
    m = trainer.state.history[-1]
    assert trainer.state.step == 3 and int(trainer.loss_fn.steps) == 3
    assert math.isfinite(m["train/rank_loss"]) and 0 <= m["val/rsum"] <= 600 and m["val/images"] == 20
