"""Intermodal contrastive recipe: InfoNCE with batch / queue / rerank negatives and gaze
regularisation (paper: intermodal-contrastive-gaze). Also the worked example of a Recipe."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import nn

from xray_match.config import Config
from xray_match.configfile import ConfigError
from xray_match.data.transforms import image_to_tensor, normalize, saliency_to_tensor, stable_id
from xray_match.losses.contrastive import InfoNCELoss
from xray_match.metrics.retrieval import mean_pairwise_cosine
from xray_match.models.encoders.image import build_resnet
from xray_match.models.encoders.text import TokenFeatures, build_text_head, load_tokenizer
from xray_match.models.moco import IntermodalModel
from xray_match.registry import RECIPES, SPACES
from xray_match.samplers.negatives import build_sampler
from xray_match.text.vocab import sentence_key
from xray_match.train.recipe import EvalContext, Recipe, RetrievalInference, unwrap
from xray_match.train.retrieval import embed_split, retrieval_metrics


def gaze(image: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ``g'_c(x) = M(x) * g_c(x)`` for every channel c — (C, H, W) x (1, H, W)."""
    return image * saliency


class MocoTransform:
    """Decoded sample -> tensors. Picklable; the tokenizer loads lazily in each worker."""

    def __init__(self, cfg: Config, train: bool):
        self.train = train
        self.size = cfg.data.image_size
        self.hflip = cfg.data.hflip and train
        self.gaze_prob = cfg.moco.gaze_prob if train else 0.0
        self.text_model = cfg.moco.text_model
        self.max_len = cfg.data.max_text_len
        self._tok = None
        # what the reader must decode beyond image + json
        self.parts = frozenset({"saliency"} if self.gaze_prob > 0 else ())

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.text_model)
        return self._tok

    def image(self, sample: dict[str, Any]) -> torch.Tensor:
        img = image_to_tensor(self.size)(sample["image"])
        if self.gaze_prob > 0 and sample.get("saliency") is not None and random.random() < self.gaze_prob:
            img = gaze(img, saliency_to_tensor(self.size)(sample["saliency"]))
        if self.hflip and random.random() < 0.5:
            img = img.flip(-1)
        return normalize()(img)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        caps = sample["meta"]["captions"]
        texts = [random.choice(caps)] if self.train else caps
        tok = self.tokenizer(texts, truncation=True, max_length=self.max_len)
        return {
            "image": self.image(sample),
            "input_ids": [torch.tensor(t) for t in tok["input_ids"]],
            "image_id": stable_id(sample["meta"]["image_id"]),
            "text_id": [stable_id(sentence_key(t)) for t in texts],
        }


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked; every item's captions flattened and right-padded; ``caption_image`` maps
    each caption row to its item; ``text_id`` (one per caption) identifies its normalised text."""
    ids = [t for it in items for t in it["input_ids"]]
    n = max(len(t) for t in ids)
    input_ids = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return {
        "image": torch.stack([it["image"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
        "caption_image": torch.tensor([i for i, it in enumerate(items) for _ in it["input_ids"]]),
        "image_id": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        "text_id": torch.tensor([i for it in items for i in it["text_id"]], dtype=torch.long),
    }


def resolve_queue_size(cfg: Config, train_count: int) -> int:
    """K for the queue sampler: absolute, or a fraction of the train split (the paper's
    0.3/0.5/0.7/1.0) rounded down to a multiple of the global batch, at least one global batch.
    An absolute K that is not a multiple of the global batch is a config error (validated)."""
    global_batch = cfg.data.batch_size * cfg.ray.num_workers
    if cfg.moco.queue_fraction > 0:
        return max(global_batch, int(cfg.moco.queue_fraction * train_count) // global_batch * global_batch)
    return cfg.moco.queue_size


@RECIPES.register("moco")
class MocoRecipe(Recipe):
    section = "moco"
    metric = "val/rsum"
    mode = "max"
    # the paper's columns (Tables 2-5: accuracy, loss, average similarity on validation and on
    # training), then rsum and the embedding spread
    table_columns = ("val/acc", "val/loss", "val/avg_similarity", "train/acc", "train/nce_loss",
                     "train/avg_similarity", "val/rsum", "val/image_spread", "train/samples_per_s")
    item_fields, caption_fields = ("image",), ("input_ids", "attention_mask")

    @classmethod
    def saliency_field(cls, cfg: Config) -> str | None:
        """Gaze (Eq. (2)) multiplies an image by its saliency map: samples without one go unchanged."""
        return "moco.gaze_prob" if cfg.moco.gaze_prob > 0 else None

    def build_model(self) -> nn.Module:
        m = self.cfg.moco
        vision, vdim = build_resnet(m.vision_backbone, m.vision_pretrained, m.vision_width)
        tokens = TokenFeatures(m.text_model, m.text_embeddings, m.text_freeze)
        head = build_text_head(m.text_head, tokens.dim, m.lstm_hidden, m.text_pooling)
        return IntermodalModel(vision, vdim, tokens, head, m.teacher_hidden, m.embed_dim, m.dropout,
                               momentum_keys=m.sampler != "batch", feature_norm=m.feature_norm)

    def build_loss(self) -> nn.Module:
        m = self.cfg.moco
        k = resolve_queue_size(self.cfg, self.info.counts.get(self.cfg.data.train_split, 0)) if m.sampler != "batch" else 0
        return InfoNCELoss(build_sampler(m.sampler, queue_size=k, dim=m.embed_dim, top_n=m.rerank_top_n), m.temperature)

    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return MocoTransform(self.cfg, train)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_tokens(items)

    def embed(self, model, chunk):
        return model(chunk, keys=False)

    def embed_once(self, model, batch):
        """The momentum keys over the whole batch (BatchNorm statistics of the whole batch, as without caching)."""
        return unwrap(model).momentum_keys(batch)

    def after_step(self, model, loss_module, outputs, batch) -> None:
        if self.cfg.moco.sampler != "batch":
            unwrap(model).momentum_update(self.cfg.moco.momentum)
        loss_module.after_step(outputs, batch)

    @staticmethod
    def encode(net: IntermodalModel, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """An evaluation batch's image and caption embeddings (:data:`xray_match.train.retrieval.Encode`)."""
        return (net.encode_image(batch["image"].to(device)),
                net.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)))

    def evaluate(self, model, batches, ctx: EvalContext) -> dict[str, float]:
        img, txt, caption_image = embed_split(model, batches, ctx, self.encode, self.cfg.moco.embed_dim)
        out = retrieval_metrics(img, txt, caption_image, ctx, title=f"moco ({self.cfg.moco.sampler})")
        # the paper's metrics over the split, in chunks of one global training batch (what a
        # training query is scored against) with the first caption of each image as its positive
        first = torch.searchsorted(caption_image, torch.arange(img.shape[0]))
        b, losses, accs = self.cfg.data.batch_size * self.cfg.ray.num_workers, [], []
        for s in range(0, img.shape[0] - b + 1, b):
            logits = img[s : s + b] @ txt[first[s : s + b]].T / self.cfg.moco.temperature
            target = torch.arange(logits.shape[0])
            losses.append(nn.functional.cross_entropy(logits, target).item())
            accs.append((logits.argmax(1) == target).float().mean().item())
        if losses:
            out["loss"] = sum(losses) / len(losses)
            out["acc"] = sum(accs) / len(accs)
        out["avg_similarity"] = (img * txt[first]).sum(-1).mean().item()
        # embedding spread: a collapse (every embedding alike, cosine near 1) shows in MLflow
        out["image_spread"], out["text_spread"] = mean_pairwise_cosine(img), mean_pairwise_cosine(txt)
        return out

    def inference(self, model: nn.Module) -> "MocoInference":
        return MocoInference(unwrap(model), self.cfg)


class MocoInference(RetrievalInference):
    """A loaded model with its preprocessing: embed images / texts and rank one by the other."""

    def __init__(self, model: IntermodalModel, cfg: Config):
        self.model = model.eval()
        self.cfg = cfg
        self.transform = MocoTransform(cfg, train=False)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.transform.tokenizer(texts, truncation=True, max_length=self.cfg.data.max_text_len, padding=True, return_tensors="pt")
        return self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float().cpu()


@SPACES.register("moco")
def moco_space(cfg: Config) -> dict[str, Any]:
    """Queue size (as a fraction of the data, as in the paper's Table 3), temperature, momentum,
    gaze probability, learning rate, batch size and sampler."""
    from ray import tune

    return {
        "moco.sampler": tune.choice(["batch", "queue", "rerank"]),
        "moco.queue_fraction": tune.choice([0.3, 0.5, 0.7, 1.0]),
        "moco.temperature": tune.loguniform(0.03, 0.3),
        "moco.momentum": tune.uniform(0.9, 0.999),
        "moco.gaze_prob": tune.choice([0.0, 0.3, 0.5, 0.7]),
        "optim.lr": tune.loguniform(2e-4, 3e-3) if cfg.optim.name == "adamw" else tune.loguniform(1e-3, 1e-1),
        "data.batch_size": tune.choice([16, 32, 48, 64]),
    }


# The paper's experiments (§4.1) as grids: one command each, e.g.
#   python jobs/tune_moco.py --space moco_table2
# The paper's batch sizes are global (two GPUs shared each batch); they are split over the Ray
# Train workers here, so a grid row is the same experiment whatever ray.num_workers is.


def per_worker(cfg: Config, global_batch: int) -> int:
    n = cfg.ray.num_workers
    if global_batch % n:
        raise ConfigError(f"ray.num_workers: the paper's global batch {global_batch} does not split over {n} workers")
    return global_batch // n


@SPACES.register("moco_table2")
def moco_table2(cfg: Config) -> dict[str, Any]:
    """Table 2: batch sampling at global batch size 16 / 32 / 48 / 64."""
    from ray import tune

    return {"moco.sampler": "batch", "data.batch_size": tune.grid_search([per_worker(cfg, b) for b in (16, 32, 48, 64)])}


@SPACES.register("moco_big_batch")
def moco_big_batch(cfg: Config) -> dict[str, Any]:
    """Table 2's batch axis further: batch sampling at global batch 64 / 128 / 256 / 512, the encoders
    in chunks of 32 (gradient caching, ``train.micro_batch_size``: every sample sees the whole
    batch's negatives)."""
    from ray import tune

    return {"moco.sampler": "batch", "train.micro_batch_size": 32,
            "data.batch_size": tune.grid_search([per_worker(cfg, b) for b in (64, 128, 256, 512)])}


@SPACES.register("moco_table3")
def moco_table3(cfg: Config) -> dict[str, Any]:
    """Table 3: queue sampling at global batch 64, K = 0.3 / 0.5 / 0.7 / 1.0 of the train split."""
    from ray import tune

    return {"moco.sampler": "queue", "data.batch_size": per_worker(cfg, 64),
            "moco.queue_fraction": tune.grid_search([0.3, 0.5, 0.7, 1.0])}


def gaze_grid(cfg: Config, global_batch: int) -> dict[str, Any]:
    """Tables 4 and 5: gaze probability 0 / 0.3 / 0.5 / 0.7, batch sampling at ``global_batch``."""
    from ray import tune

    return {"moco.sampler": "batch", "data.batch_size": per_worker(cfg, global_batch),
            "moco.gaze_prob": tune.grid_search([0.0, 0.3, 0.5, 0.7])}


@SPACES.register("moco_table4")
def moco_table4(cfg: Config) -> dict[str, Any]:
    """Table 4: gaze at global batch 64."""
    return gaze_grid(cfg, 64)


@SPACES.register("moco_table5")
def moco_table5(cfg: Config) -> dict[str, Any]:
    """Table 5: gaze at global batch 48."""
    return gaze_grid(cfg, 48)


@SPACES.register("moco_samplers")
def moco_samplers(cfg: Config) -> dict[str, Any]:
    """The three samplers at equal steps and batch (the preset's), queue / rerank over K = the
    whole train split."""
    from ray import tune

    return {"moco.sampler": tune.grid_search(["batch", "queue", "rerank"]), "moco.queue_fraction": 1.0}
