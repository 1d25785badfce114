"""Weakly supervised MCB attention grounding (grounding-mcb-attention): the backbone, Eq. (1)-(3)
on hand-computed values, box extraction and IoU / precision on hand-made maps, the multi-MNIST
generator, the recipe, stage 1, and a 2-worker Ray run with real MLflow."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch

from xray_match.config import load_config
from xray_match.configfile import ConfigError
from xray_match.losses.grounding import GroundingLoss, attention_l2, pair_loss
from xray_match.metrics.grounding import (QueryRecord, average_precision, box_iou, boxes_from_map, class_aps,
                                          detection_map, greedy_hits, match_ious, save_attention_overlays, score_query,
                                          scored_boxes_from_map, summarize)
from xray_match.models.backbones import DigitClassifier, resnet18_stride1


def _cfg(*overrides):
    """A tiny grounding model (width 2, d = 32) for fast tests."""
    return load_config("grounding_cpu", ["grounding.backbone_width=2", "grounding.mcb_dim=32", "grounding.head_hidden=8",
                                         "grounding.query_dim=16", "grounding.init=scratch", *overrides])


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory) -> str:
    """A real multi-MNIST shard set: 64 train / 20 val / 20 test / 10 per grid split, 16-sample shards."""
    from xray_match.data.multi_mnist import build_multi_mnist

    root = str(tmp_path_factory.mktemp("multi_mnist"))
    return build_multi_mnist(root, train=64, val=20, test=20, grid_test=10, maxcount=16, workers=1, progress=False)


# ----------------------------------------------------------------------------- backbone (§2.1, §3)


def test_stride_one_backbone_keeps_resolution():
    net = resnet18_stride1(width=2, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 16, 28, 28)  # 8 x width channels, same H, W
        assert net(torch.randn(1, 1, 37, 45)).shape == (1, 16, 37, 45)  # any size: no pooling, no strides
    assert all(m.stride == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert DigitClassifier(net)(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_full_width_backbone_has_torchvision_resnet18_layout():
    import torchvision

    ours = resnet18_stride1(width=64, in_channels=3).state_dict()
    ref = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


# ----------------------------------------------------------------------------- Eq. (1)-(3)

# three unit features: z1 = (1, 0), z2 = (0, 1), z3 = (1, 0); labels 0, 0, 1
FEATS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1])


def test_pair_loss_hand_computed():
    # pairs (1,2) same: d² = 2; (1,3) different, d = 0: max(0, 1 - 0)² = 1; (2,3) different,
    # d = √2 > m: 0  ->  mean (2 + 1 + 0) / 3 = 1
    assert pair_loss(FEATS, LABELS, margin=1.0).item() == pytest.approx(1.0, abs=1e-6)
    # m = 1.5: (1.5 - 0)² = 2.25 and (1.5 - √2)² = 0.0073593  ->  (2 + 2.25 + 0.0073593) / 3 = 1.4191198
    assert pair_loss(FEATS, LABELS, margin=1.5).item() == pytest.approx(1.4191198, abs=1e-6)
    # features are L2-normalised first: the scale of f' cannot buy a lower loss (the printed
    # Eq. (2) with its -||f_i - f_j||² branch is unbounded below; this reading is not)
    assert pair_loss(7.0 * FEATS, LABELS, margin=1.0).item() == pytest.approx(1.0, abs=1e-6)
    assert pair_loss(FEATS[:1], LABELS[:1], 1.0).item() == 0.0
    assert pair_loss(torch.randn(6, 4) * 1e3, torch.arange(6), 1.0).item() >= 0.0


def test_attention_l2_hand_computed():
    r = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]]])
    # Eq. (3) per map: (0 + 1 + 0.25 + 0.25) / 4 = 0.375 and 4 / 4 = 1 -> mean 0.6875
    assert attention_l2(r).item() == pytest.approx(0.6875)


def test_total_loss_eq1_hand_computed():
    r = torch.stack([torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.ones(2, 2), torch.zeros(2, 2)])  # R = 1.375 / 3
    outputs = {"logits": torch.zeros(3, 2), "pooled": FEATS, "attention": r}
    out = GroundingLoss(lambda_=0.1, beta=0.1, margin=1.0)(outputs, {"query": LABELS})
    assert out["ce_loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # uniform logits over 2 classes
    assert out["pair_loss"].item() == pytest.approx(0.1 * 1.0, abs=1e-6)
    assert out["attention_loss"].item() == pytest.approx(0.1 * 1.375 / 3, abs=1e-6)
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    assert total.item() == pytest.approx(0.693147 + 0.1 + 0.0458333, abs=1e-5)  # Eq. (1) = 0.838980


# ----------------------------------------------------------------------------- boxes, IoU, precision


def _map():
    att = np.zeros((8, 8))
    att[1:3, 1:4] = 0.9  # a 2 x 3 blob
    att[6, 6] = 0.7  # a one-pixel speck
    att[4, 4] = 0.4  # below the threshold
    return att


def test_boxes_from_map_threshold_and_components():
    assert boxes_from_map(_map(), 0.5).tolist() == [[1, 1, 4, 3], [6, 6, 7, 7]]
    assert boxes_from_map(_map(), 0.3).tolist() == [[1, 1, 4, 3], [4, 4, 5, 5], [6, 6, 7, 7]]
    diag = np.eye(3)  # diagonal neighbours are one 8-connected component
    assert boxes_from_map(diag, 0.5).tolist() == [[0, 0, 3, 3]]
    assert boxes_from_map(np.zeros((4, 4)), 0.5).shape == (0, 4)


def test_iou_and_matching_hand_computed():
    iou = box_iou([[1, 1, 4, 3], [6, 6, 7, 7]], [[1, 1, 4, 4], [5, 5, 7, 7]])
    # blob vs gt1: 6 / 9; speck vs gt2: 1 / 4; the others do not overlap
    assert np.allclose(iou, [[6 / 9, 0.0], [0.0, 0.25]])
    assert np.allclose(match_ious([[1, 1, 4, 3], [6, 6, 7, 7]], [[1, 1, 4, 4], [5, 5, 7, 7]]), [6 / 9, 0.25])
    # one prediction, two ground-truth boxes: it goes to the one it overlaps best, the other gets 0
    assert np.allclose(match_ious([[0, 0, 2, 2]], [[0, 0, 2, 4], [0, 0, 2, 2]]), [0.0, 1.0])
    assert match_ious(np.zeros((0, 4)), [[0, 0, 1, 1]]).tolist() == [0.0]


def test_summary_precision_recall_avg_iou_and_absent_queries():
    recs = [
        score_query(_map(), [[1, 1, 4, 4]], 0.5, present=True, correct=True),  # 2 boxes, IoU 0.667
        QueryRecord(present=True, n_pred=1, gt_ious=[0.45], mean_act=0.2, correct=True),
        QueryRecord(present=True, n_pred=0, gt_ious=[0.0], mean_act=0.1, correct=False),  # blank: 1 wrong answer
        QueryRecord(present=False, n_pred=0, mean_act=0.01),
        QueryRecord(present=False, n_pred=1, mean_act=0.05),
    ]
    s = summarize(recs)
    assert s["queries"] == 3
    assert s["avg_iou"] == pytest.approx(100 * (6 / 9 + 0.45 + 0.0) / 3)
    # predictions counted: 2 + 1 + max(0, 1) = 4; IoU >= 0.3: two; >= 0.5: one
    assert s["prec_iou30"] == pytest.approx(50.0) and s["prec_iou40"] == pytest.approx(50.0)
    assert s["prec_iou50"] == pytest.approx(25.0)
    # ranked boxes: the first query's blob (TP, IoU 2/3) then its speck (FP); 3 ground-truth boxes
    assert s["ap_iou30"] == pytest.approx(100 / 3) and s["ap_iou50"] == pytest.approx(100 / 3)
    assert s["map"] == pytest.approx(100 / 3)
    assert s["recall_iou30"] == pytest.approx(200 / 3) and s["recall_iou50"] == pytest.approx(100 / 3)
    assert s["cls_acc"] == pytest.approx(200 / 3)
    present_act = (float(np.mean(_map())) + 0.2 + 0.1) / 3
    assert s["present_act"] == pytest.approx(present_act)
    assert s["absent_act"] == pytest.approx(0.03) and s["absent_blank"] == pytest.approx(50.0)
    assert s["absent_ratio"] == pytest.approx(0.03 / present_act)


def test_box_scores_are_component_attention_mass():
    boxes, scores = scored_boxes_from_map(_map(), 0.5)
    assert boxes.tolist() == [[1, 1, 4, 3], [6, 6, 7, 7]]
    assert scores == pytest.approx([6 * 0.9, 0.7])  # the 3x2 blob at 0.9 and the 0.7 speck
    assert scored_boxes_from_map(np.zeros((4, 4)), 0.5)[1].shape == (0,)


def test_average_precision_hand_computed():
    # ranked TP, FP, TP against 2 ground-truth boxes: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
    # made monotone 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(5 / 6)
    assert average_precision([0.7, 0.9, 0.8], [True, True, False], 2) == pytest.approx(5 / 6)  # order by score
    assert average_precision([0.9], [True], 4) == pytest.approx(0.25)  # recall capped at 1/4
    assert average_precision([], [], 3) == 0.0
    assert average_precision([0.5, 0.9], [True, False], 1) == pytest.approx(0.5)  # FP ranked first
    with pytest.raises(ValueError, match="no ground-truth"):
        average_precision([0.5], [False], 0)


def test_greedy_hits_take_the_best_free_box_in_score_order():
    iou = np.array([[0.6, 0.2], [0.7, 0.1], [0.35, 0.45]])  # 3 predictions x 2 ground-truth boxes
    # box 1 (score 0.9) takes gt 0; box 0 (0.8) finds gt 0 taken, its best free is gt 1 at 0.2
    assert greedy_hits([0.8, 0.9, 0.1], iou, 0.5).tolist() == [False, True, False]
    assert greedy_hits([0.8, 0.9, 0.1], iou, 0.3).tolist() == [False, True, True]
    assert greedy_hits([0.9, 0.8, 0.1], iou, 0.15).tolist() == [True, False, True]  # gt 1 at 0.1 < 0.15
    assert greedy_hits([0.9, 0.8, 0.1], iou, 0.05).tolist() == [True, True, False]  # none left for box 2
    assert greedy_hits([0.5], np.zeros((1, 0)), 0.3).tolist() == [False]  # nothing to find


def test_detection_map_hand_computed():
    att = _map()  # blob [1,1,4,3] scored 5.4, speck [6,6,7,7] scored 0.7
    recs = [score_query(att, [[1, 1, 4, 4]], 0.5, present=True, label=7),  # blob IoU 2/3 -> TP, speck FP
            score_query(att, [], 0.5, present=False, label=7),  # an absent 7 with the same map: 2 FPs
            score_query(att, [[6, 6, 7, 7], [0, 0, 2, 2]], 0.5, present=True, label=3)]  # speck TP, blob FP
    # class 7, ranked: 5.4 TP, 5.4 FP (absent), 0.7 FP, 0.7 FP; 1 gt -> AP 1 (the tie keeps record order)
    # class 3, ranked: 5.4 FP (IoU 1/9 with [0,0,2,2]), 0.7 TP; 2 gt -> precision 1/2 at recall 1/2 -> AP 1/4
    assert detection_map(recs, 0.5) == pytest.approx(100 * (1.0 + 0.25) / 2)
    # at IoU 0.1 the blob also finds [0,0,2,2] (IoU 1/9): class 3 gets TP, TP -> AP 1
    assert detection_map(recs, 0.1) == pytest.approx(100.0)
    assert detection_map(recs[1:2], 0.5) == 0.0  # no class with ground truth
    assert class_aps(recs, 0.5) == pytest.approx({3: 25.0, 7: 100.0})
    assert class_aps(recs[1:2], 0.5) == {}  # an absent-only class has no AP
    s = summarize(recs)
    assert s["ap_iou50"] == pytest.approx(62.5) and s["map"] == pytest.approx((s["ap_iou30"] + s["ap_iou40"] + 62.5) / 3)
    assert (s["ap_iou50_c3"], s["ap_iou50_c7"]) == pytest.approx((25.0, 100.0)) and "ap_iou30_c3" not in s
    assert not any("_c" in k for k in summarize(recs, per_class_t=None))


def test_overlay_png(tmp_path):
    rows = [[{"label": "seven", "present": True, "att": _map(), "pred": boxes_from_map(_map(), 0.5), "gt": [[1, 1, 4, 4]]}],
            []]
    path = save_attention_overlays(np.zeros((2, 8, 8)), rows, str(tmp_path / "o" / "overlay.png"), 0.5, title="t")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- data


def test_multi_mnist_deterministic_valid_and_sourced():
    from xray_match.data.format import check_meta
    from xray_match.data.multi_mnist import MultiMnistSpec, render

    spec = MultiMnistSpec(seed=3)
    a, b = render("train", 5, spec), render("train", 5, spec)
    assert a["png"] == b["png"] and a["json"] == b["json"]
    assert render("train", 5, MultiMnistSpec(seed=4))["png"] != a["png"]
    for split, size, lo, hi in (("train", 56, 0, 54000), ("val", 56, 54000, 60000), ("test", 56, 0, 10000)):
        for i in range(8):
            meta = render(split, i, spec)["json"]
            check_meta(meta, f"{split}/{i}", width=size, height=size)
            assert 1 <= len(meta["objects"]) <= 4 and meta["width"] == size
            assert all(lo <= o["mnist_index"] < hi for o in meta["objects"])
            assert sorted(meta["captions"]) == sorted({o["label"] for o in meta["objects"]})
    for split, g in (("test_2x2", 2), ("test_3x3", 3)):
        meta = render(split, 1, spec)["json"]
        check_meta(meta, split)
        ids = [o["label_id"] for o in meta["objects"]]
        assert meta["width"] == 28 * g and len(ids) == g * g and len(set(ids)) == g * g  # distinct digits


def test_shards_transform_and_collate(tiny_mm):
    from xray_match.data.format import read_manifest
    from xray_match.data.reader import ShardStream, shard_urls
    from xray_match.recipes.grounding import GroundingTransform, collate_queries

    m = read_manifest(tiny_mm)
    assert m.dataset == "multi-mnist"
    assert {s: m.count(s) for s in m.splits} == {"train": 64, "val": 20, "test": 20, "test_2x2": 10, "test_3x3": 10}
    items = list(ShardStream(shard_urls(tiny_mm, "test_2x2"), GroundingTransform(10, train=False), train=False))
    assert len(items) == 10
    it = items[0]
    assert it["image"].shape == (1, 56, 56) and sorted(it["query"]) == list(range(10))  # every digit is asked
    assert it["present"] == [True] * 4 + [False] * 6 and all(len(b) == 1 for b in it["boxes"][:4])
    assert it["boxes"][4:] == [[]] * 6 and it["overlay_absent"] in it["query"][4:]
    batch = collate_queries(items[:3])
    assert batch["image"].shape == (3, 1, 56, 56) and batch["query"].shape == (30,)
    assert batch["query_image"].tolist() == [0] * 10 + [1] * 10 + [2] * 10 and len(batch["boxes"]) == 30
    assert batch["overlay_absent"] == [t["overlay_absent"] for t in items[:3]]
    train_items = list(ShardStream(shard_urls(tiny_mm, "val"), GroundingTransform(10, train=True, queries_per_image=1),
                                   train=False))
    assert all(len(t["query"]) == 1 for t in train_items)


def test_bad_label_is_named():
    from PIL import Image

    from xray_match.data.format import ShardFormatError
    from xray_match.recipes.grounding import GroundingTransform

    sample = {"key": "k1", "url": "s.tar", "image": Image.new("L", (56, 56)),
              "meta": {"image_id": "k1", "objects": [{"box": [0, 0, 5, 5], "label_id": 12}]}}
    with pytest.raises(ShardFormatError, match=r"s.tar: key 'k1': json.objects\[0\].label_id 12"):
        GroundingTransform(10, train=True)(sample)


# ----------------------------------------------------------------------------- model


def _model_and_batch(fused=True):
    from xray_match.recipes.grounding import build_grounder

    torch.manual_seed(0)
    cfg = _cfg(f"grounding.mcb_fused={str(fused).lower()}")
    model = build_grounder(cfg.grounding)
    batch = {"image": torch.randn(2, 1, 20, 24), "query": torch.tensor([3, 7, 3]), "query_image": torch.tensor([0, 0, 1])}
    return model, batch


def test_model_outputs_and_gradients():
    model, batch = _model_and_batch()
    out = model(batch)
    assert out["attention"].shape == (3, 20, 24) and out["pooled"].shape == (3, 16) and out["logits"].shape == (3, 10)
    assert 0 < out["attention"].min() and out["attention"].max() < 1
    loss = sum(v for k, v in GroundingLoss()(out, batch).items() if k.endswith("_loss"))
    loss.backward()
    for name in ("backbone.conv1.weight", "query.fc.weight", "head.0.weight", "head.2.weight", "classifier.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_fused_mcb_equals_literal_mcb_in_the_model():
    fused, batch = _model_and_batch(fused=True)
    literal, _ = _model_and_batch(fused=False)
    literal.load_state_dict(fused.state_dict())  # the same parameters serve both paths
    fused.eval(), literal.eval()
    with torch.no_grad():
        a, b = fused(batch), literal(batch)
    assert torch.allclose(a["attention"], b["attention"], atol=1e-5)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)


def test_shared_backbone_pass_equals_one_image_at_a_time():
    model, batch = _model_and_batch()
    model.eval()
    with torch.no_grad():
        together = model(batch)["attention"]
        alone = model({"image": batch["image"][1:], "query": torch.tensor([3]), "query_image": torch.tensor([0])})["attention"]
    assert torch.allclose(together[2], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------- recipe


def test_param_groups_backbone_lr():
    from xray_match.recipes.grounding import GroundingRecipe, build_grounder
    from xray_match.train.recipe import DataInfo

    for init, mult in (("pretrained", 0.1), ("scratch", 1.0)):
        cfg = _cfg(f"grounding.init={init}", "optim.lr=0.1", "optim.backbone_lr_mult=0.1")
        recipe = GroundingRecipe(cfg, DataInfo("", "multi-mnist", {}))
        model = build_grounder(cfg.grounding)
        groups = {g["name"]: g for g in recipe.param_groups(model)}
        assert groups["attention"]["lr"] == 0.1 and groups["backbone"]["lr"] == pytest.approx(0.1 * mult)
        n = sum(len(g["params"]) for g in groups.values())
        assert n == len(list(model.parameters()))


def test_stage1_checkpoint_flows_into_prepare_and_build_model(tmp_path):
    from xray_match.recipes.grounding import GroundingRecipe
    from xray_match.studies.grounding_stage1 import pretrain_backbone
    from xray_match.train.recipe import DataInfo

    path = str(tmp_path / "w2.pt")
    cfg = _cfg("grounding.init=pretrained", f"grounding.backbone_checkpoint={path}")
    with pytest.raises(ConfigError, match="grounding.backbone_checkpoint: .* does not exist"):
        GroundingRecipe.prepare(cfg, "")
    out = pretrain_backbone(cfg, log=lambda s: None, max_steps=2, eval_limit=50)
    assert out["path"] == path and 0 <= out["test_acc"] <= 100
    prepared = GroundingRecipe.prepare(cfg, "")
    model = GroundingRecipe(cfg, DataInfo("", "multi-mnist", {}, prepared)).build_model()
    saved = torch.load(path, weights_only=True)["backbone"]
    assert torch.equal(model.backbone.conv1.weight, saved["conv1.weight"])
    stage1_c = torch.load(path, weights_only=True)["classifier"]["weight"]
    assert torch.equal(model.classifier.weight, stage1_c)
    # a Tune grid prepares once (init=pretrained) for all trials: a scratch trial must not inherit stage 1
    scratch = GroundingRecipe(cfg.with_overrides({"grounding.init": "scratch"}),
                              DataInfo("", "multi-mnist", {}, prepared)).build_model()
    assert not torch.equal(scratch.backbone.conv1.weight, saved["conv1.weight"])
    assert not torch.equal(scratch.classifier.weight, stage1_c)
    with pytest.raises(ConfigError, match="grounding.backbone_width: 4, but .* width-2 backbone"):
        GroundingRecipe.prepare(cfg.with_overrides({"grounding.backbone_width": 4}), "")
    with open(tmp_path / "junk.pt", "w") as fh:
        fh.write("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt is not a readable checkpoint"):
        GroundingRecipe.prepare(cfg.with_overrides({"grounding.backbone_checkpoint": str(tmp_path / "junk.pt")}), "")


def test_evaluate_world_size_one_writes_overlays(tiny_mm, tmp_path):
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import Trainer

    cfg = _cfg(f"data.path={tiny_mm}", "data.eval_batch_size=8", "data.num_workers=0", "grounding.overlay_images=3",
               "train.precision=fp32")
    trainer = Trainer(cfg, prepare_info(cfg), log=lambda s: None)
    metrics, artifacts = trainer.evaluate(out_dir=str(tmp_path / "figs"))
    assert metrics["val/queries"] == sum(
        len({o["label_id"] for o in json.loads(r["json"])["objects"]}) for r in _raw(tiny_mm, "val"))
    assert {"val/avg_iou", "val/prec_iou30", "val/prec_iou40", "val/prec_iou50", "val/ap_iou30", "val/ap_iou50",
            "val/map", "val/absent_act", "val/present_act"} <= set(metrics)
    assert len(artifacts) == 1 and os.path.getsize(artifacts[0]) > 1000
    grid, _ = trainer.evaluate("test_3x3")
    assert grid["test_3x3/queries"] == 90.0  # 10 images x 9 distinct digits
    # the registry's inference object: one image, one digit -> the map, its boxes and their scores
    from PIL import Image

    raw = _raw(tiny_mm, "test_2x2")[0]
    digit = json.loads(raw["json"])["objects"][0]["label_id"]
    out = trainer.recipe.inference(trainer.model).ground(Image.open(io.BytesIO(raw["png"])), digit)
    assert out["attention"].shape == (56, 56) and len(out["boxes"]) == len(out["scores"])
    boxes, scores = scored_boxes_from_map(out["attention"], cfg.grounding.threshold)
    assert out["boxes"] == boxes.tolist() and out["scores"] == pytest.approx(scores.tolist())


def _raw(root, split):
    from xray_match.data.reader import iter_raw, shard_urls

    return [r for u in shard_urls(root, split) for r in iter_raw(u)]


def test_presets_and_spaces():
    from xray_match.driver.tuner import check_space, is_grid
    from xray_match.registry import RECIPES, SPACES

    for preset in ("grounding_cpu", "grounding_full"):
        cfg = load_config(preset)
        assert cfg.model.name == "grounding" and cfg.grounding.lambda_ == 0.1
        assert cfg.optim.lr == 0.1 and cfg.optim.backbone_lr_mult == 0.1  # §3
    assert load_config("grounding_full").grounding.beta == 0.1  # §3; the CPU preset's β is measured (docs)
    assert load_config("grounding_full").grounding.backbone_width == 64
    assert load_config("grounding_full").grounding.data.train == 500000
    assert RECIPES.get("grounding").metric == "val/avg_iou" and RECIPES.get("grounding").mode == "max"
    cfg = load_config("grounding_cpu")
    table1 = SPACES.get("grounding_table1")(cfg)
    assert is_grid(table1) and len(table1["grounding.beta"]["grid_search"]) * len(table1["grounding.init"]["grid_search"]) == 8
    check_space(cfg, table1)
    assert table1["grounding.beta"]["grid_search"] == [0.0, 0.05, 0.1, 0.2]  # the paper's grid by default
    wide = SPACES.get("grounding_table1")(load_config("grounding_cpu", ["grounding.table1_betas=[0.1, 1, 3]"]))
    assert wide["grounding.beta"]["grid_search"] == [0.1, 1.0, 3.0]
    check_space(cfg, SPACES.get("grounding")(cfg))
    with pytest.raises(ConfigError, match="grounding.pair_margin"):
        load_config("grounding_cpu", ["grounding.pair_margin=3"])
    for bad in ("[]", "[0.1, -1]", "[0.1, 0.1]"):
        with pytest.raises(ConfigError, match="grounding.table1_betas"):
            load_config("grounding_cpu", [f"grounding.table1_betas={bad}"])


def test_table1_markdown_puts_the_papers_values_beside_any_beta():
    from xray_match.studies.grounding import table1_markdown

    rows = [{"config": {"grounding.init": "pretrained", "grounding.beta": 0.1}, "metrics": {"test/avg_iou": 40.5}},
            {"config": {"grounding.init": "pretrained", "grounding.beta": 3.0}, "metrics": {"test/avg_iou": 45.25}}]
    lines = table1_markdown(rows, "test/avg_iou", [0.1, 3.0]).splitlines()
    assert lines[0] == "| model | β@0.1 | β@3 |"
    assert lines[2] == "| Fine-tune backbone (ours) | 40.50 | 45.25 |"
    assert lines[3] == "| Fine-tune backbone (paper) | 67.07 | - |"
    assert lines[4] == "| Train from scratch (ours) | - | - |"


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_worker_ray_run_logs_metrics_and_overlays(ray_cluster, tiny_mm, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from xray_match.driver.worker import run_training

    cfg = _cfg(f"data.path={tiny_mm}", "data.steps_per_epoch=2", "data.batch_size=8", "data.eval_batch_size=10",
               f"ray.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_uri}", "ray.cpus_per_worker=1",
               "train.epochs=1", "ray.name=grounding-smoke")
    out = run_training(cfg, register=False)
    m = out["metrics"]
    assert m["epoch"] == 1.0 and m["val/queries"] > 0 and 0 <= m["val/avg_iou"] <= 100 and "val/map" in m
    state = out["checkpoint"].load()
    assert state["loop"]["step"] == 2 and "mcb.sketch_x.h" in state["model"]  # Ψ saved with the model
    client = MlflowClient(mlflow_uri)
    assert [h.step for h in client.get_metric_history(out["run_id"], "val/avg_iou")] == [1]
    figs = client.list_artifacts(out["run_id"], "figures/epoch001")
    assert [os.path.basename(a.path) for a in figs] == ["attention_overlays.png"]


def test_table2_markdown_rows_hold_map_precision_recall_and_the_paper():
    from xray_match.studies.grounding import table2_markdown

    m = {"ap_iou30": 60.0, "ap_iou40": 50.0, "ap_iou50": 40.0, "map": 50.0, "prec_iou30": 20.0, "prec_iou40": 15.0,
         "prec_iou50": 10.0, "recall_iou30": 70.0, "recall_iou40": 55.0, "recall_iou50": 35.0, "avg_iou": 41.5,
         "absent_act": 0.05, "present_act": 0.125}
    lines = table2_markdown({f"test_2x2/{k}": v for k, v in m.items()}).splitlines()
    assert len(lines) == 4  # header, rule, ours, paper: no 3x3 metrics, no 3x3 rows
    assert lines[2] == ("| 2x2 (ours) | 60.00 | 50.00 | 40.00 | 50.00 | 20.0 / 15.0 / 10.0 | 70.0 / 55.0 / 35.0 | "
                        "41.50 | 0.050 / 0.125 |")
    assert lines[3] == "| 2x2 (paper) | 94.48 | 96.22 | 71.53 | 87.41 | | | | |"
    m |= {"ap_iou50_c1": 5.4, "ap_iou50_c7": 0.0}
    lines = table2_markdown({f"test_2x2/{k}": v for k, v in m.items()}).splitlines()
    assert lines[4:] == ["", "| AP@0.5 per digit | 1 | 7 |", "| --- | --- | --- |", "| 2x2 | 5.4 | 0.0 |"]
