"""Weakly supervised attention grounding with MCB (paper: grounding-mcb-attention; docs/grounding.md).

Training sees an image and the label of a digit in it (never a box): the model must put its
attention where the features classify as that digit (Eq. (1)). Evaluation turns the attention map
into boxes (threshold + connected components) and scores them against the digit's boxes.

Stage 1 (:func:`pretrain_backbone`, ``jobs/pretrain_mnist.py``) trains the stride-1 ResNet-18 on
single MNIST digits and saves it; stage 2 (this recipe) fine-tunes it with the new parts at
``optim.lr`` and the backbone at ``optim.lr * optim.backbone_lr_mult`` (§3: 0.1 and 1/10), or trains
everything from scratch (``grounding.init=scratch``, one learning rate for all).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config, ConfigError, xray_home
from xray_match.data.format import ShardFormatError
from xray_match.data.transforms import stable_id
from xray_match.losses.grounding import GroundingLoss
from xray_match.metrics.grounding import (QueryRecord, boxes_from_map, save_attention_overlays, score_query,
                                          scored_boxes_from_map, summarize)
from xray_match.models.backbones import DigitClassifier, resnet18_stride1
from xray_match.models.grounding import LabelQuery, MCBGrounder
from xray_match.registry import RECIPES, SPACES
from xray_match.train.recipe import EvalContext, Recipe, unwrap

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IN_CHANNELS = 1  # grey digits
CKPT_FORMAT = "xray-match-mnist-backbone/1"
GRID_SPLITS = ("test_2x2", "test_3x3")


# ----------------------------------------------------------------------------- paths


def default_backbone_path(cfg: Config) -> str:
    return cfg.grounding.backbone_checkpoint or str(
        xray_home() / "grounding" / f"mnist-resnet18-w{cfg.grounding.backbone_width}.pt")


def default_data_path(cfg: Config) -> str:
    """Where the multi-MNIST set for ``cfg.grounding.data`` lives: the sizes and a hash of the
    generator settings are in the name, so a different request never reuses another's shards."""
    d = cfg.grounding.data
    digest = hashlib.sha1(json.dumps(asdict(d), sort_keys=True).encode()).hexdigest()[:8]
    return str(xray_home() / "data" / f"multi-mnist-{d.canvas}px-{d.train}-{d.val}-{d.test}-{d.grid_test}-{digest}")


def ensure_data(cfg: Config, root: str | None = None, progress: bool = True, workers: int | None = None) -> str:
    """Build (or finish building: complete shards are kept) the multi-MNIST set; returns its folder."""
    from xray_match.data.multi_mnist import MultiMnistSpec, build_multi_mnist

    d = cfg.grounding.data
    root = root or default_data_path(cfg)
    spec = MultiMnistSpec(canvas=d.canvas, max_overlap=d.max_overlap, noise_std=d.noise_std, seed=d.seed)
    return build_multi_mnist(root, train=d.train, val=d.val, test=d.test, grid_test=d.grid_test, spec=spec,
                             workers=workers, progress=progress)


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
    name = "grounding"
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


# ----------------------------------------------------------------------------- jobs: tables 1 and 2


def job_argv(preset: str, argv: list[str], tune: bool) -> tuple[list[str], Config]:
    """``argv`` with ``--data`` set to the multi-MNIST set the config describes (built on first use,
    resumable) unless the caller passed ``--data``; and the merged config."""
    from xray_match.launch import build_parser, config_from_args

    args = build_parser("grounding", preset, tune).parse_args(argv)
    cfg = config_from_args(args)
    if args.data or args.print_config:
        return list(argv), cfg
    root = ensure_data(cfg)
    return ["--data", root, *argv], cfg.with_overrides({"data.path": root})


def evaluate_checkpoint(checkpoint: str, splits: Iterable[str], storage_path: str = "") -> dict[str, float]:
    """Metrics of a training checkpoint (folder, local or remote) on each split, world size 1."""
    from ray.train import Checkpoint

    from xray_match.launch import evaluate_test

    ckpt = Checkpoint(path=checkpoint)
    if storage_path and "://" in storage_path and "://" not in checkpoint:
        import pyarrow.fs

        ckpt = Checkpoint(path=checkpoint, filesystem=pyarrow.fs.FileSystem.from_uri(storage_path)[0])
    out: dict[str, float] = {}
    with ckpt.as_directory() as d:
        for split in splits:
            out |= evaluate_test(None, d, split)  # type: ignore[arg-type] - the split is explicit
    return out


def study_trials(study_dir: str) -> list[dict[str, Any]]:
    """Each trial of a Tune study folder: its sampled config (dotted keys), last metrics and
    checkpoint path, read from the trials' ``result.json``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(study_dir)
    rows = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*/result.json")):
        with fs.open(path, "r") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        if not lines:
            continue
        last = json.loads(lines[-1])
        rows.append({"trial_id": last.get("trial_id", ""),
                     "config": {k.replace("__", "."): v for k, v in last.get("config", {}).items()},
                     "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                     "checkpoint": last.get("checkpoint_path")})
    return rows


def log_to_run(tracking_uri: str, run_id: str | None, metrics: dict[str, float], files: dict[str, str] | None = None) -> None:
    """Metrics (and text files) onto an existing MLflow run (the job's run, or a study's parent)."""
    if not run_id:
        return
    import tempfile

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])
    with tempfile.TemporaryDirectory() as d:
        for name, text in (files or {}).items():
            with open(os.path.join(d, name), "w") as fh:
                fh.write(text)
            client.log_artifact(run_id, os.path.join(d, name), artifact_path="tables")


def table2_markdown(metrics: dict[str, float]) -> str:
    """Table 2 (detection mAP at IoU 0.3 / 0.4 / 0.5 and their mean on the 3x3 and 2x2 grids)
    beside the paper's, plus the unranked precision and recall at the same IoUs, Avg IoU and the
    absent-query activation."""
    paper = {"test_3x3": (83.40, 82.54, 60.03, 75.23), "test_2x2": (94.48, 96.22, 71.53, 87.41)}
    lines = ["| group | mAP@0.3 | mAP@0.4 | mAP@0.5 | Avg mAP | precision @0.3 / 0.4 / 0.5 | "
             "recall @0.3 / 0.4 / 0.5 | Avg IoU | absent / present activation |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_digit: dict[str, dict[int, float]] = {}  # group -> digit -> AP@0.5
    for split, label in (("test_3x3", "3x3"), ("test_2x2", "2x2")):
        if f"{split}/map" not in metrics:
            continue
        m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(split + "/")}
        p = paper[split]
        lines.append(f"| {label} (ours) | {m['ap_iou30']:.2f} | {m['ap_iou40']:.2f} | {m['ap_iou50']:.2f} | "
                     f"{m['map']:.2f} | {m['prec_iou30']:.1f} / {m['prec_iou40']:.1f} / {m['prec_iou50']:.1f} | "
                     f"{m['recall_iou30']:.1f} / {m['recall_iou40']:.1f} / {m['recall_iou50']:.1f} | "
                     f"{m['avg_iou']:.2f} | {m.get('absent_act', 0):.3f} / {m['present_act']:.3f} |")
        lines.append(f"| {label} (paper) | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {p[3]:.2f} | | | | |")
        per_digit[label] = {int(k.removeprefix("ap_iou50_c")): v for k, v in m.items() if k.startswith("ap_iou50_c")}
    # AP@0.5 per digit: the mean hides whole digits the attention fails on (docs/reproduction.md)
    digits = sorted({k for aps in per_digit.values() for k in aps})
    if digits:
        lines += ["", "| AP@0.5 per digit | " + " | ".join(map(str, digits)) + " |", "| --- |" + " --- |" * len(digits)]
        for label, aps in per_digit.items():
            if aps:
                lines.append(f"| {label} | " + " | ".join(f"{aps[k]:.1f}" if k in aps else "" for k in digits) + " |")
    return "\n".join(lines) + "\n"


#: the paper's Table 1: Avg IoU per training schema and β
PAPER_TABLE1 = {"pretrained": {0.0: 59.74, 0.05: 60.84, 0.1: 67.07, 0.2: 36.37},
                "scratch": {0.0: 57.90, 0.05: 63.39, 0.1: 66.40, 0.2: 41.02}}


def table1_markdown(rows: list[dict[str, Any]], metric: str = "test/avg_iou",
                    betas: Iterable[float] = tuple(PAPER_TABLE1["pretrained"])) -> str:
    """Table 1 (Avg IoU per β and training schema) from :func:`study_trials` rows that carry
    ``metric``, beside the paper's ("-" at a β the paper did not run)."""
    betas = [float(b) for b in betas]
    cell = {(r["config"].get("grounding.init"), float(r["config"].get("grounding.beta", -1))): r["metrics"].get(metric)
            for r in rows}
    lines = ["| model | " + " | ".join(f"β@{b:g}" for b in betas) + " |", "| --- |" + " --- |" * len(betas)]
    for init, label in (("pretrained", "Fine-tune backbone"), ("scratch", "Train from scratch")):
        ours = [cell.get((init, b)) for b in betas]
        lines.append(f"| {label} (ours) | " + " | ".join("-" if v is None else f"{v:.2f}" for v in ours) + " |")
        paper = PAPER_TABLE1[init]
        lines.append(f"| {label} (paper) | " + " | ".join(f"{paper[b]:.2f}" if b in paper else "-" for b in betas) + " |")
    return "\n".join(lines) + "\n"


def report_study(cfg: Config, out: dict[str, Any]) -> str:
    """After ``tune_main``: every trial's final checkpoint on the test split (Table 1), and the
    preset's configuration (its ``grounding.beta``, fine-tuned; else the best trial) on the 2x2 /
    3x3 grids (Table 2). Writes ``tables.md`` / ``tables.json`` into the study folder, logs both to
    the study's parent MLflow run, and returns the markdown."""
    import fsspec

    from xray_match.tracking.runs import resolve_tracking_uri

    rows = [r for r in study_trials(out["storage"]) if r["checkpoint"]]
    for r in rows:
        r["metrics"] |= evaluate_checkpoint(r["checkpoint"], [cfg.data.test_split], cfg.ray.storage_path)
    pick = [r for r in rows if r["config"].get("grounding.init", cfg.grounding.init) == "pretrained"
            and float(r["config"].get("grounding.beta", cfg.grounding.beta)) == cfg.grounding.beta]
    chosen = pick[0] if pick else next((r for r in rows if r["checkpoint"] == out.get("best_checkpoint")), None)
    grids: dict[str, float] = {}
    if chosen is not None:
        grids = evaluate_checkpoint(chosen["checkpoint"], GRID_SPLITS, cfg.ray.storage_path)
    text = ("## Table 1: Avg IoU on the test split\n\n" + table1_markdown(rows, f"{cfg.data.test_split}/avg_iou",
                                                                         cfg.grounding.table1_betas)
            + f"\n## Table 2: trial {chosen['trial_id'] if chosen else '-'} "
              f"({json.dumps(chosen['config']) if chosen else 'none'})\n\n" + table2_markdown(grids))
    results = {"trials": [{k: r[k] for k in ("trial_id", "config", "metrics", "checkpoint")} for r in rows],
               "table2_trial": chosen["trial_id"] if chosen else None, "grids": grids}
    fs, root = fsspec.core.url_to_fs(out["storage"])
    for name, body in (("tables.md", text), ("tables.json", json.dumps(results, indent=1))):
        with fs.open(f"{root}/{name}", "w") as fh:
            fh.write(body)
    if cfg.tracking.enabled:
        flat = {f"table1/{r['config'].get('grounding.init')}/beta{r['config'].get('grounding.beta')}":
                r["metrics"].get(f"{cfg.data.test_split}/avg_iou", 0.0) for r in rows if "grounding.init" in r["config"]}
        log_to_run(resolve_tracking_uri(cfg), out.get("parent_run_id"), flat | grids, {"tables.md": text})
    return text


# ----------------------------------------------------------------------------- stage 1


def load_backbone_checkpoint(path: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"grounding.backbone_checkpoint: {path} is not a readable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ConfigError(f"grounding.backbone_checkpoint: {path} is not a stage-1 backbone "
                          f"(format {state.get('format') if isinstance(state, dict) else None!r}, expected {CKPT_FORMAT!r})")
    return state


def _digit_batches(images: np.ndarray, labels: np.ndarray, batch: int, rng: np.random.Generator | None,
                   noise_std: float) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(images)) if rng is not None else np.arange(len(images))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        x = images[idx].astype(np.float32)
        if rng is not None and noise_std > 0:
            # the multi-MNIST noise, at a random strength per image, so stage 1 sees it too
            std = rng.uniform(0, noise_std, size=(len(idx), 1, 1)).astype(np.float32)
            x = np.clip(x + rng.normal(size=x.shape).astype(np.float32) * std, 0, 255)
        x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
        yield torch.from_numpy(x)[:, None], torch.from_numpy(labels[idx].astype(np.int64))


@torch.no_grad()
def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, autocast: Callable[[], Any],
              device: torch.device) -> float:
    model.eval()
    hits = 0
    for x, y in _digit_batches(images, labels, 500, None, 0.0):
        with autocast():
            hits += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return 100.0 * hits / len(labels)


def pretrain_backbone(cfg: Config, out: str | None = None, log: Callable[[str], None] = print,
                      max_steps: int | None = None, eval_limit: int | None = None) -> dict[str, Any]:
    """Stage 1 (§3): the stride-1 ResNet-18 (``grounding.backbone_width``) + a linear classifier on
    single MNIST digits — MNIST-train 0..53999 to train, 54000..59999 to watch, MNIST-test to report
    (the paper: 99.40%). SGD (Nesterov) under a one-cycle schedule (15% warm-up, then cosine
    annealing; momentum cycled 0.85-0.95); the multi-MNIST Gaussian noise as augmentation. Runs on
    the GPU when there is one (bf16 autocast there with ``train.precision`` auto/bf16). Saves ``{format, backbone, width, in_channels, val_acc, test_acc, ...}`` to ``out``.
    ``max_steps`` / ``eval_limit`` cut the run short (tests)."""
    from xray_match.data.mnist import load_mnist
    from xray_match.train.loop import autocast_for, seed_everything

    g = cfg.grounding
    out = out or default_backbone_path(cfg)
    seed_everything(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    images, labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    tr, va = slice(0, 54000), slice(54000, 60000 if eval_limit is None else 54000 + eval_limit)
    test_images, test_labels = test_images[:eval_limit], test_labels[:eval_limit]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DigitClassifier(resnet18_stride1(g.backbone_width, IN_CHANNELS), g.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=g.pretrain_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = g.pretrain_epochs * math.ceil(54000 / g.pretrain_batch_size)
    steps = min(steps, max_steps) if max_steps else steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=g.pretrain_lr, total_steps=steps, pct_start=0.15)
    autocast = autocast_for(cfg, device)
    t0, step = time.perf_counter(), 0
    for epoch in range(g.pretrain_epochs):
        model.train()
        for x, y in _digit_batches(images[tr], labels[tr], g.pretrain_batch_size, rng, g.data.noise_std):
            if step >= steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"stage 1 epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")
        val_acc = _accuracy(model, images[va], labels[va], autocast, device)
        log(f"stage 1 epoch {epoch + 1}: val acc {val_acc:.2f}%")
    test_acc = _accuracy(model, test_images, test_labels, autocast, device)
    model.cpu()
    result = {"format": CKPT_FORMAT, "backbone": model.backbone.state_dict(), "classifier": model.fc.state_dict(),
              "width": g.backbone_width, "in_channels": IN_CHANNELS, "val_acc": val_acc, "test_acc": test_acc,
              "epochs": g.pretrain_epochs, "seed": cfg.train.seed, "wall_s": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    torch.save(result, tmp)
    os.replace(tmp, out)  # atomic: a killed run never leaves a half-written backbone
    log(f"stage 1: MNIST-test accuracy {test_acc:.2f}% (val {val_acc:.2f}%) in {result['wall_s']:.0f}s -> {out}")
    return {k: v for k, v in result.items() if k not in ("backbone", "classifier")} | {"path": out}


__all__ = ["report_study", "job_argv", "evaluate_checkpoint", "study_trials", "table1_markdown", "table2_markdown",
           "GroundingRecipe", "GroundingTransform", "GroundingInference", "collate_queries", "build_grounder",
           "pretrain_backbone", "load_backbone_checkpoint", "ensure_data", "default_data_path", "default_backbone_path"]
