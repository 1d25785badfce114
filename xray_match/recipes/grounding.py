"""Weakly supervised attention grounding with MCB (paper: grounding-mcb-attention; docs/grounding.md).

Training sees an image and the label of a digit in it (never a box): the model must put its
attention where the features classify as that digit (Eq. (1)). Evaluation turns the attention map
into boxes (threshold + connected components) and scores them against the digit's boxes.

Stage 1 (:func:`xray_match.studies.grounding_stage1.pretrain_backbone`, ``jobs/pretrain_mnist.py``)
trains the stride-1 ResNet-18 on single MNIST digits and saves it; stage 2 (this recipe) fine-tunes
it with the new parts at ``optim.lr`` and the backbone at ``optim.lr * optim.backbone_lr_mult`` (§3:
0.1 and 1/10), or trains everything from scratch (``grounding.init=scratch``, one learning rate for
all). The paper's tables over several runs: :mod:`xray_match.studies.grounding`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config, xray_home
from xray_match.configfile import ConfigError
from xray_match.data.format import ShardFormatError
from xray_match.data.transforms import stable_id
from xray_match.losses.grounding import GroundingLoss
from xray_match.metrics.grounding import (QueryRecord, boxes_from_map, save_attention_overlays, score_query,
                                          scored_boxes_from_map, summarize)
from xray_match.models.backbones import resnet18_stride1
from xray_match.models.grounding import LabelQuery, MCBGrounder
from xray_match.registry import RECIPES, SPACES
from xray_match.train.recipe import EvalContext, Recipe, unwrap

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IN_CHANNELS = 1  # grey digits
CKPT_FORMAT = "xray-match-mnist-backbone/1"


# ----------------------------------------------------------------------------- paths


def default_backbone_path(cfg: Config) -> str:
    return cfg.grounding.backbone_checkpoint or str(
        xray_home() / "grounding" / f"mnist-resnet18-w{cfg.grounding.backbone_width}.pt")


# ----------------------------------------------------------------------------- data


def image_tensor(image: Any) -> torch.Tensor:
    """PIL image -> (1, H, W) float, grey, normalised with MNIST's mean and std."""
    arr = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((arr - MNIST_MEAN) / MNIST_STD)[None]


class GroundingTransform:
    """Decoded sample -> ``image`` + the digits to query. Training: the distinct digits present
    (at most ``queries_per_image``, chosen at random). Evaluation: every digit class, the present
    ones with their boxes first (detection mAP asks each image for each class); ``overlay_absent``
    names the one absent digit the overlay figure shows (chosen from the image id, so the same on
    every run)."""

    def __init__(self, num_classes: int, train: bool, queries_per_image: int = 0, seed: int = 0):
        self.num_classes, self.train = num_classes, train
        self.queries_per_image = queries_per_image
        self.seed = seed

    def objects(self, sample: dict[str, Any]) -> list[tuple[int, list[float]]]:
        out = []
        for i, ob in enumerate(sample["meta"].get("objects", [])):
            k = ob.get("label_id")
            if not isinstance(k, int) or not 0 <= k < self.num_classes:
                raise ShardFormatError(f"{sample.get('url', '?')}: key {sample.get('key', '?')!r}: json.objects[{i}]"
                                       f".label_id {k!r} is not a class id in [0, {self.num_classes}) "
                                       f"(grounding.num_classes)")
            out.append((k, [float(v) for v in ob["box"]]))
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        objs = self.objects(sample)
        present = sorted({k for k, _ in objs})
        item: dict[str, Any] = {"image": image_tensor(sample["image"])}
        if self.train:
            if self.queries_per_image and len(present) > self.queries_per_image:
                present = [int(k) for k in np.random.choice(present, self.queries_per_image, replace=False)]
            item["query"] = present
            return item
        absent = [k for k in range(self.num_classes) if k not in present]
        image_id = stable_id(sample["meta"]["image_id"])
        queries = present + absent
        item["query"] = queries
        item["present"] = [k in present for k in queries]
        item["boxes"] = [[b for k2, b in objs if k2 == k] for k in queries]
        item["image_id"] = image_id
        item["overlay_absent"] = absent[(image_id + self.seed) % len(absent)] if absent else -1
        return item


def collate_queries(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked (B, 1, H, W); every item's queries flattened to ``query`` (Q,) with
    ``query_image`` (Q,) naming the item each one asks about."""
    sizes = {tuple(it["image"].shape) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"grounding batch mixes image sizes {sorted(sizes)}: one split must hold one size")
    out: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "query": torch.tensor([q for it in items for q in it["query"]], dtype=torch.long),
        "query_image": torch.tensor([i for i, it in enumerate(items) for _ in it["query"]], dtype=torch.long),
    }
    if "present" in items[0]:
        out["present"] = torch.tensor([p for it in items for p in it["present"]], dtype=torch.bool)
        out["boxes"] = [b for it in items for b in it["boxes"]]
        out["image_id"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        out["overlay_absent"] = [it.get("overlay_absent", -1) for it in items]
    return out


# ----------------------------------------------------------------------------- recipe


def build_grounder(g: Any, backbone_state: dict[str, torch.Tensor] | None = None,
                   classifier_weight: torch.Tensor | None = None) -> MCBGrounder:
    """The model from the ``grounding`` config section, optionally starting from stage 1: the
    backbone's weights and the weight of its digit classifier as C (the bias is not carried: C has
    none, see :mod:`xray_match.models.grounding`)."""
    backbone = resnet18_stride1(g.backbone_width, IN_CHANNELS)
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    model = MCBGrounder(backbone, backbone.out_channels, LabelQuery(g.num_classes, g.query_dim), g.query_dim,
                        g.num_classes, g.mcb_dim, g.head_hidden, g.mcb_seed, g.mcb_fused,
                        g.mcb_norm)
    if classifier_weight is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(classifier_weight)
    return model


@RECIPES.register("grounding")
class GroundingRecipe(Recipe):
    section = "grounding"
    no_grad_cache = "its loss reads attention maps of each image-query pair, not per-sample embeddings (docs/big_batches.md)"
    metric = "val/avg_iou"
    mode = "max"

    @classmethod
    def prepare(cls, cfg: Config, root: str) -> dict[str, Any]:
        """With ``init=pretrained``: the stage-1 backbone weights, checked against the config.
        They travel in ``prepared`` so every worker, checkpoint and registered model has them."""
        if cfg.grounding.init != "pretrained":
            return {}
        path = default_backbone_path(cfg)
        if not os.path.isfile(path):
            raise ConfigError(
                f"grounding.backbone_checkpoint: {path} does not exist. Run stage 1 first "
                f"(python jobs/pretrain_mnist.py --config <preset>) or set grounding.init=scratch")
        state = load_backbone_checkpoint(path)
        if state["width"] != cfg.grounding.backbone_width:
            raise ConfigError(f"grounding.backbone_width: {cfg.grounding.backbone_width}, but {path} holds a "
                              f"width-{state['width']} backbone")
        if tuple(state["classifier"]["weight"].shape) != (cfg.grounding.num_classes, state["width"] * 8):
            raise ConfigError(f"grounding.num_classes: {cfg.grounding.num_classes}, but {path} classifies "
                              f"{state['classifier']['weight'].shape[0]} digits")
        return {"backbone_state": state["backbone"], "classifier_weight": state["classifier"]["weight"],
                "backbone_source": path, "backbone_test_acc": state.get("test_acc")}

    def build_model(self) -> nn.Module:
        g = self.cfg.grounding
        if g.init == "scratch":  # a Tune grid prepares once for all trials: ignore stage 1 here
            return build_grounder(g)
        weights = self.info.prepared.get("backbone_state")
        if weights is None:
            raise ConfigError("grounding.init: 'pretrained' but the prepared data info holds no stage-1 "
                              "backbone (prepare() ran with init=scratch?)")
        return build_grounder(g, weights, self.info.prepared.get("classifier_weight"))

    def build_loss(self) -> nn.Module:
        g = self.cfg.grounding
        return GroundingLoss(g.lambda_, g.beta, g.pair_margin)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """§3: the new parts at ``optim.lr``; the pretrained model (backbone and its classifier C) at
        ``optim.lr * backbone_lr_mult`` (1/10 in the paper). From scratch nothing is pretrained: one
        rate for all."""
        net = unwrap(model)
        lr = self.cfg.optim.lr
        mult = self.cfg.optim.backbone_lr_mult if self.cfg.grounding.init == "pretrained" else 1.0
        backbone = [p for p in [*net.backbone.parameters(), *net.classifier.parameters()] if p.requires_grad]
        ids = {id(p) for p in backbone}
        rest = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr, "name": "attention"}, {"params": backbone, "lr": lr * mult, "name": "backbone"}]

    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        g = self.cfg.grounding
        return GroundingTransform(g.num_classes, train, g.queries_per_image, self.cfg.train.seed)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_queries(items)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        net = unwrap(model)
        g = self.cfg.grounding
        autocast = ctx.autocast
        records: list[QueryRecord] = []
        overlay: dict[str, Any] | None = None
        for batch in batches:
            with autocast():
                feats = net.features(batch["image"])  # (B, C, H, W): one backbone pass for all queries
                q = net.encode_query(batch)  # (Q, D)
            att, logits = [], []
            for s in range(0, q.shape[0], g.eval_query_chunk):
                qi = batch["query_image"][s : s + g.eval_query_chunk]
                with autocast():
                    r = net.attend(feats, q[s : s + g.eval_query_chunk], qi)  # (q, H, W)
                    _, lg = net.classify(feats, r, qi)
                att.append(r.float().cpu())
                logits.append(lg.float().cpu())
            maps = torch.cat(att).numpy()  # (Q, H, W)
            correct = (torch.cat(logits).argmax(1) == batch["query"].cpu()).numpy()
            present = batch["present"].cpu().numpy()
            for j in range(maps.shape[0]):
                records.append(score_query(maps[j], batch["boxes"][j], g.threshold, bool(present[j]), bool(correct[j]),
                                           int(batch["query"][j])))
            if ctx.is_main and ctx.out_dir and g.overlay_images and overlay is None:
                overlay = self._overlay_rows(batch, maps, g.overlay_images)
        records = ctx.gather_objects(records)
        out = summarize(records)
        if overlay is not None:
            path = os.path.join(ctx.out_dir, "attention_overlays.png")
            ctx.artifacts.append(save_attention_overlays(overlay["images"], overlay["rows"], path, g.threshold,
                                                         title=f"grounding β={g.beta:g} ({g.init})"))
        return out

    def _overlay_rows(self, batch: dict[str, Any], maps: np.ndarray, n: int) -> dict[str, Any]:
        from xray_match.data.multi_mnist import DIGIT_WORDS

        images = (batch["image"][:n, 0].float().cpu().numpy() * MNIST_STD + MNIST_MEAN).clip(0, 1)
        qimg = batch["query_image"].cpu().numpy()
        rows: list[list[dict[str, Any]]] = [[] for _ in range(len(images))]
        for j in np.flatnonzero(qimg < len(images)):
            k = int(batch["query"][j])
            if not batch["present"][j] and k != batch["overlay_absent"][qimg[j]]:
                continue  # present queries and one absent one per image
            rows[qimg[j]].append({"label": DIGIT_WORDS[k] if k < 10 else str(k), "present": bool(batch["present"][j]),
                                  "att": maps[j], "pred": boxes_from_map(maps[j], self.cfg.grounding.threshold),
                                  "gt": np.asarray(batch["boxes"][j]).reshape(-1, 4)})
        return {"images": images, "rows": rows}

    def inference(self, model: nn.Module) -> "GroundingInference":
        return GroundingInference(unwrap(model), self.cfg)


class GroundingInference:
    """A loaded model with its preprocessing: ``ground(image, digit)`` -> attention map, boxes and
    their scores."""

    def __init__(self, model: MCBGrounder, cfg: Config):
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def attention(self, image: Any, labels: list[int]) -> np.ndarray:
        """Attention maps (Q, H, W) in (0, 1) of ``labels`` on one PIL image."""
        x = image_tensor(image)[None].to(self.device)  # (1, 1, H, W)
        q = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        feats = self.model.features(x)
        return self.model.attend(feats, self.model.query(q), torch.zeros_like(q)).float().cpu().numpy()

    def ground(self, image: Any, label: int) -> dict[str, Any]:
        """The map of ``label`` on ``image``, its boxes and each box's score (attention mass)."""
        att = self.attention(image, [label])[0]
        boxes, scores = scored_boxes_from_map(att, self.cfg.grounding.threshold)
        return {"attention": att, "boxes": boxes.tolist(), "scores": scores.tolist()}


# ----------------------------------------------------------------------------- search spaces


@SPACES.register("grounding_table1")
def table1_space(cfg: Config) -> dict[str, Any]:
    """Table 1: β ∈ ``grounding.table1_betas`` (the paper's {0, 0.05, 0.1, 0.2} by default) x
    {fine-tune a stage-1 backbone, train from scratch} (a grid)."""
    from ray import tune

    return {"grounding.beta": tune.grid_search([float(b) for b in cfg.grounding.table1_betas]),
            "grounding.init": tune.grid_search(["pretrained", "scratch"])}


@SPACES.register("grounding")
def grounding_space(cfg: Config) -> dict[str, Any]:
    """λ, β and the pair-loss margin m of Eq. (1)-(2)."""
    from ray import tune

    return {"grounding.lambda_": tune.uniform(0.0, 0.5),
            "grounding.beta": tune.loguniform(0.01, 10.0),  # the best β depends on the preset's feature scale
            "grounding.pair_margin": tune.uniform(0.25, 1.75)}


def load_backbone_checkpoint(path: str) -> dict[str, Any]:
    """A stage-1 file (:func:`xray_match.studies.grounding_stage1.pretrain_backbone`), checked."""
    from xray_match.train.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"grounding.backbone_checkpoint: {path} is not a readable checkpoint ({e})") from None
    if state.get("format") != CKPT_FORMAT:
        raise ConfigError(f"grounding.backbone_checkpoint: {path} is not a stage-1 backbone "
                          f"(format {state.get('format')!r}, expected {CKPT_FORMAT!r})")
    return state
