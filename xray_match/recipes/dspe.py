"""DSPE image-sentence retrieval (Wang, Li, Lazebnik, CVPR 2016): the ``dspe`` recipe, and the parts
it shares with phrase localization (:mod:`xray_match.recipes.dspe_phrase`): text features, the
two-branch model built from the ``dspe`` section, the structure-preserving loss and stage 2's start
from a checkpoint (``dspe.init_checkpoint``).

Minibatches (§3.3): every image of a batch comes with one sampled sentence plus
``dspe.extra_positives`` more distinct positive sentences, so that the sentence-side structure term
Eq. (4) has neighbours (other sentences of the same image) in the batch. Sentences are identified by
their normalized words, so a caption text that describes several images (frequent on the digit
scenes: "an image of a one") is a positive of each of them, and the image-side neighbourhood
N(x_i) of Eq. (3) (images described by the same sentence) is not empty. The shards stream each
image once per pass, so unlike the paper's pair sampling an image never appears twice in a batch:
the batch holds exactly ``B`` images and ``B (1 + extra_positives)`` sentences.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config
from xray_match.configfile import ConfigError
from xray_match.data.reader import iter_meta
from xray_match.data.transforms import image_to_tensor, normalize
from xray_match.losses.structure import StructurePreservingLoss
from xray_match.models.dspe import DSPE
from xray_match.registry import RECIPES, SPACES
from xray_match.text.features import featurizer_from_state, fit_featurizer
from xray_match.text.vocab import sentence_key
from xray_match.train.recipe import EvalContext, Recipe, RetrievalInference, unwrap
from xray_match.train.retrieval import embed_split, retrieval_metrics


def positive_matrix(x_keys: list[set[str]], y_keys: list[str]) -> torch.Tensor:
    """(n_x, n_y) bool: sentence j describes image i (its key is one of image i's keys)."""
    return torch.tensor([[k in ks for k in y_keys] for ks in x_keys], dtype=torch.bool).reshape(len(x_keys), len(y_keys))



def fit_text(cfg: Config, texts: list[str]) -> dict[str, Any]:
    d = cfg.dspe
    fz = fit_featurizer(d.text_features, texts, tfidf_max_features=d.tfidf_max_features,
                        tfidf_ngram_max=d.tfidf_ngram_max, word_model=d.word_model, fv_components=d.fv_components,
                        fv_pca_dim=d.fv_pca_dim, fv_pca_samples=d.fv_pca_samples, fv_reg_covar=d.fv_reg_covar,
                        seed=cfg.train.seed)
    return fz.to_state()


def _reachable(path: str) -> bool:
    from xray_match.data.io import filesystem

    try:
        fs, p = filesystem(path)
        return bool(fs.exists(p))
    except Exception:
        return False


def init_state(cfg: Config) -> dict[str, Any]:
    """The checkpoint ``dspe.init_checkpoint`` names (stage 2 starts from its model)."""
    from xray_match.train.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(cfg.dspe.init_checkpoint)
    except CheckpointError as e:
        raise ConfigError(f"dspe.init_checkpoint: {e}") from None


# ----------------------------------------------------------------------------- shared parts


class Featurize:
    """Text -> features with a per-process cache (captions and phrases repeat a lot)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self._fz = None
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._fz is None:
            self._fz = featurizer_from_state(self.state)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh = dict(zip(missing, self._fz(missing))) if missing else {}  # one batched call
        if len(self._cache) < max(1000, 50_000_000 // max(1, self._fz.dim)):  # at most ~200 MB of float32
            self._cache.update(fresh)
        rows = [self._cache[t] if t in self._cache else fresh[t] for t in texts]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self._fz.dim)

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state, "_fz": None, "_cache": {}}


class DSPEBase(Recipe):
    """What both DSPE recipes share: the ``dspe`` section, text features fitted by ``prepare``, the
    two-branch model (from ``dspe.init_checkpoint`` when set) and the loss of Eq. (5)."""

    section = "dspe"
    item_fields, caption_fields = ("image",), ("text",)
    fits_train_split = True  # tf-idf / Fisher vectors / phrase vocabulary

    @classmethod
    def pixels_field(cls, cfg: Config) -> str | None:
        return "dspe.image_source" if cfg.dspe.image_source == "cnn" else None

    def text_state(self) -> dict[str, Any]:
        st = self.info.prepared.get("text")
        if st is None:
            raise ConfigError("DataInfo.prepared has no 'text' features: run Recipe.prepare on the train split first")
        return st

    def build_model(self) -> nn.Module:
        d = self.cfg.dspe
        text_dim = featurizer_from_state(self.text_state()).dim
        if d.image_source == "cnn":
            from xray_match.models.encoders.image import build_resnet

            encoder, image_dim = build_resnet(d.backbone, pretrained=False)
        else:
            encoder, image_dim = None, int(self.info.prepared.get("image_dim", 0))
            if not image_dim:
                raise ConfigError("dspe.image_source=regions: prepare found no regions.npy to size the image branch")
        model = DSPE(encoder, image_dim, text_dim, d.image_hidden, d.text_hidden, d.embed_dim, d.dropout)
        if d.init_checkpoint:
            # prepare() (driver) has already refused an unreachable init_checkpoint before training.
            # A loader rebuilding a finished stage-2 model (registry, test evaluation) on a machine
            # without the stage-1 file overwrites these weights anyway, so there it is skipped.
            if not _reachable(d.init_checkpoint):
                import warnings

                warnings.warn(f"dspe.init_checkpoint {d.init_checkpoint!r} is not reachable here; "
                              "building the model without it (a checkpoint's weights must follow)", stacklevel=2)
                return model
            state = init_state(self.cfg)
            try:
                model.load_state_dict(state["model"])
            except (RuntimeError, KeyError) as e:
                raise ConfigError(f"dspe.init_checkpoint: {d.init_checkpoint!r} does not fit this model ({e})") from None
        return model

    def build_loss(self) -> nn.Module:
        d = self.cfg.dspe
        return StructurePreservingLoss(d.margin, d.lambda_1, d.lambda_2, d.lambda_3, d.top_k)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model({"image": batch["image"], "text": batch["text"]})

    @classmethod
    def _checkpoint_text(cls, cfg: Config) -> dict[str, Any] | None:
        """Stage 2 continues a model: keep the text features it was trained with."""
        if not cfg.dspe.init_checkpoint:
            return None
        prepared = (init_state(cfg).get("info") or {}).get("prepared") or {}
        return prepared.get("text")


# ----------------------------------------------------------------------------- retrieval


class RetrievalTransform:
    """Decoded sample -> ``{"image", "text", "text_keys", "image_keys"}``. Picklable."""

    def __init__(self, cfg: Config, text_state: dict[str, Any], train: bool):
        self.train = train
        self.source = cfg.dspe.image_source
        self.parts = frozenset({"regions"}) if self.source == "regions" else frozenset()  # optional parts it reads
        self.extra = cfg.dspe.extra_positives
        self.to_tensor = image_to_tensor(cfg.data.image_size, hflip=cfg.data.hflip and train)
        self.norm = normalize()
        self.featurize = Featurize(text_state)

    def image(self, sample: dict[str, Any]) -> torch.Tensor:
        if self.source == "regions":
            if sample.get("regions") is None:
                raise ValueError(f"{sample.get('url', '?')}: key {sample.get('key', '?')!r}: dspe.image_source=regions "
                                 "but the sample has no regions.npy")
            return torch.as_tensor(np.asarray(sample["regions"], np.float32).reshape(len(sample["regions"]), -1).mean(0))
        return self.norm(self.to_tensor(sample["image"]))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        caps = sample["meta"]["captions"]
        if self.train:
            # one sampled pair + `extra` more positive sentences with different text when possible
            order = random.sample(caps, len(caps))
            texts, seen = [], set()
            for c in order:
                if sentence_key(c) not in seen:
                    texts.append(c)
                    seen.add(sentence_key(c))
                if len(texts) == 1 + self.extra:
                    break
        else:
            texts = list(caps)
        return {"image": self.image(sample), "text": self.featurize(texts), "text_keys": [sentence_key(t) for t in texts],
                "image_keys": {sentence_key(c) for c in caps}}


def collate_retrieval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked (n_x, ...); sentences concatenated (n_y, F); ``caption_image`` (n_y,) maps a
    sentence row to its item; ``pos`` (n_x, n_y) from sentence identity (a caption shared by two
    images is a positive of both)."""
    text_keys = [k for it in items for k in it["text_keys"]]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "text": torch.cat([it["text"] for it in items]).float(),
        "caption_image": torch.tensor([i for i, it in enumerate(items) for _ in it["text_keys"]], dtype=torch.long),
        "pos": positive_matrix([it["image_keys"] for it in items], text_keys),
    }


@RECIPES.register("dspe")
class DSPERecipe(DSPEBase):
    """Image-sentence retrieval: R@1/5/10 both directions on the validation split."""

    metric = "val/rsum"
    mode = "max"

    @classmethod
    def prepare(cls, cfg: Config, root: str) -> dict[str, Any]:
        prepared: dict[str, Any] = {}
        captions, image_dim = [], 0
        for key, meta in iter_meta(root, cfg.data.train_split):
            captions.extend(meta.get("captions") or [])
        if cfg.dspe.image_source == "regions":
            image_dim = _regions_dim(root, cfg.data.train_split)
            prepared["image_dim"] = image_dim
        if not captions:
            raise ConfigError(f"data.train_split: {cfg.data.train_split!r} in {root} has no captions")
        prepared["text"] = cls._checkpoint_text(cfg) or fit_text(cfg, captions)
        prepared["text_source"] = cfg.data.train_split
        return prepared

    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return RetrievalTransform(self.cfg, self.text_state(), train)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_retrieval(items)

    @staticmethod
    def encode(net: DSPE, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """An evaluation batch's image and caption embeddings (:data:`xray_match.train.retrieval.Encode`)."""
        return net.encode_image(batch["image"].to(device)), net.encode_text(batch["text"].to(device))

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        img, txt, caption_image = embed_split(model, batches, ctx, self.encode, unwrap(model).embed_dim)
        # unit vectors: ranking by -Euclidean distance = ranking by dot product
        return retrieval_metrics(img, txt, caption_image, ctx, title=f"dspe ({self.cfg.dspe.text_features})")

    def inference(self, model: nn.Module) -> "DSPEInference":
        return DSPEInference(unwrap(model), self.cfg, self.text_state())


class DSPEInference(RetrievalInference):
    """A loaded retrieval model with its preprocessing: embed images / texts, rank one by the other."""

    def __init__(self, model: DSPE, cfg: Config, text_state: dict[str, Any]):
        self.model = model.eval()
        self.transform = RetrievalTransform(cfg, text_state, train=False)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.transform.featurize(list(texts)).to(self.device)).float().cpu()


def _regions_dim(root: str, split: str) -> int:
    import io

    from xray_match.data.format import ShardFormatError, sample_where
    from xray_match.data.reader import iter_raw, shard_urls

    for url in shard_urls(root, split):
        for raw in iter_raw(url):
            if "regions.npy" not in raw:
                raise ShardFormatError(f"{sample_where(raw)}: dspe.image_source=regions but no regions.npy")
            arr = np.load(io.BytesIO(raw["regions.npy"]), allow_pickle=False)
            return int(np.prod(arr.shape[1:]))
    raise ShardFormatError(f"{root}: split {split!r} is empty")

# ----------------------------------------------------------------------------- search spaces


@SPACES.register("dspe")
def dspe_space(cfg: Config) -> dict[str, Any]:
    """Margin m, the weights of Eq. (2-4), K and the learning rate."""
    from ray import tune

    return {
        "dspe.margin": tune.uniform(0.05, 0.3),
        "dspe.lambda_1": tune.uniform(0.5, 3.0),
        "dspe.lambda_2": tune.uniform(0.0, 0.5),
        "dspe.lambda_3": tune.uniform(0.0, 0.5),
        "dspe.top_k": tune.choice([5, 10, 50]),
        "optim.lr": tune.loguniform(cfg.optim.lr / 10, cfg.optim.lr * 10),
    }


@SPACES.register("dspe_grid")
def dspe_grid(cfg: Config) -> dict[str, Any]:
    """The paper's ablation as a grid: with and without the structure terms, K = 5 / 50."""
    from ray import tune

    return {"dspe.lambda_3": tune.grid_search([0.0, 0.1]), "dspe.top_k": tune.grid_search([5, 50])}
