"""DSPE recipes (Wang, Li, Lazebnik, CVPR 2016): image-sentence retrieval (``dspe``) and phrase
localization with hard-negative mining (``dspe_phrase``).

Minibatches (§3.3): every image of a batch comes with one sampled sentence plus
``dspe.extra_positives`` more distinct positive sentences, so that the sentence-side structure term
Eq. (4) has neighbours (other sentences of the same image) in the batch. Sentences are identified by
their normalized words, so a caption text that describes several images (frequent on the digit
scenes: "an image of a one") is a positive of each of them, and the image-side neighbourhood
N(x_i) of Eq. (3) (images described by the same sentence) is not empty. The shards stream each
image once per pass, so unlike the paper's pair sampling an image never appears twice in a batch:
the batch holds exactly ``B`` images and ``B (1 + extra_positives)`` sentences.

Phrase localization (§4.3): the X view holds image regions (crops of boxes through the CNN), the Y
view phrases. A region's positives are the phrases linked to its object; each phrase gets
``regions_per_phrase`` positive regions (its ground-truth box and jittered boxes with IoU >=
``pos_iou``), each region ``1 + extra_positives`` phrases. Stage 2 (``dspe.hard_negatives`` set):
mined hard-negative boxes (:func:`mine_hard_negatives`) join the batch as negatives of the phrase
they were mined for, and only the ranking terms Eq. (1-2) train (set lambda_2 = lambda_3 = 0).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config, ConfigError
from xray_match.data.reader import iter_meta
from xray_match.data.transforms import image_to_tensor, normalize, stable_id
from xray_match.losses.structure import StructurePreservingLoss
from xray_match.metrics.localization import IOU_HIT, best_candidates, candidate_boxes, jitter_boxes, localization_hits
from xray_match.metrics.retrieval import chunked_ranks, summarize
from xray_match.models.dspe import DSPE
from xray_match.registry import RECIPES, SPACES
from xray_match.text.features import featurizer_from_state, fit_featurizer
from xray_match.text.vocab import sentence_key, tokenize
from xray_match.train.recipe import DataInfo, EvalContext, Recipe, unwrap

_ARTICLES = ("a", "an", "the")


def phrase_key(text: str) -> str:
    """Identity of a phrase: its words without a leading article ("a red seven" = "red seven")."""
    words = tokenize(text)
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def positive_matrix(x_keys: list[set[str]], y_keys: list[str]) -> torch.Tensor:
    """(n_x, n_y) bool: sentence j describes image i (its key is one of image i's keys)."""
    return torch.tensor([[k in ks for k in y_keys] for ks in x_keys], dtype=torch.bool).reshape(len(x_keys), len(y_keys))


# ----------------------------------------------------------------------------- shard metadata


def object_phrases(meta: dict[str, Any], where: str = "sample") -> dict[int, list[str]]:
    """Object index -> the distinct phrase texts linked to it (all captions), in caption order."""
    phrases = meta.get("phrases")
    if not phrases:
        raise ValueError(f"{where}: json has no 'phrases' (phrase localization needs phrase->object links)")
    out: dict[int, list[str]] = defaultdict(list)
    for plist in phrases:
        for p in plist:
            if p["text"] not in out[p["object"]]:
                out[p["object"]].append(p["text"])
    return dict(out)


def fit_text(cfg: Config, texts: list[str]) -> dict[str, Any]:
    d = cfg.dspe
    fz = fit_featurizer(d.text_features, texts, tfidf_max_features=d.tfidf_max_features,
                        tfidf_ngram_max=d.tfidf_ngram_max, word_model=d.word_model, fv_components=d.fv_components,
                        fv_pca_dim=d.fv_pca_dim, fv_pca_samples=d.fv_pca_samples, fv_reg_covar=d.fv_reg_covar,
                        seed=cfg.train.seed)
    return fz.to_state()


def _reachable(path: str) -> bool:
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        return bool(fs.exists(p))
    except Exception:
        return False


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint written by the training loop: ``checkpoint.pt`` or the folder holding it."""
    import fsspec

    from xray_match.data.format import join
    from xray_match.train.worker import CKPT_FILE

    fs, p = fsspec.core.url_to_fs(path)
    if fs.isdir(p):
        path, p = join(path, CKPT_FILE), join(p, CKPT_FILE)
    if not fs.isfile(p):
        raise ConfigError(f"dspe.init_checkpoint: {path!r} is not a checkpoint file or a folder holding {CKPT_FILE}")
    with fs.open(p, "rb") as fh:
        return torch.load(fh, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- shared parts


class _Featurize:
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


class _DSPEBase(Recipe):
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
            state = load_checkpoint(d.init_checkpoint)
            try:
                model.load_state_dict(state["model"])
            except (RuntimeError, KeyError) as e:
                raise ConfigError(f"dspe.init_checkpoint: {d.init_checkpoint!r} does not fit this model ({e})") from None
        return model

    def build_loss(self) -> nn.Module:
        d = self.cfg.dspe
        return StructurePreservingLoss(d.margin, d.lambda_1, d.lambda_2, d.lambda_3, d.top_k)

    @classmethod
    def _checkpoint_text(cls, cfg: Config) -> dict[str, Any] | None:
        """Stage 2 continues a model: keep the text features it was trained with."""
        if not cfg.dspe.init_checkpoint:
            return None
        prepared = (load_checkpoint(cfg.dspe.init_checkpoint).get("info") or {}).get("prepared") or {}
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
        self.featurize = _Featurize(text_state)

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
class DSPERecipe(_DSPEBase):
    """Image-sentence retrieval: R@1/5/10 both directions on the validation split."""

    name = "dspe"
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

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model({"image": batch["image"], "text": batch["text"]})

    @torch.no_grad()
    def embed_split(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext):
        """``(image_emb (N, D), text_emb (M, D), caption_image (M,))`` over the whole split."""
        net = unwrap(model)
        imgs, txts, counts = [], [], []
        for batch in batches:
            with ctx.autocast():
                imgs.append(net.encode_image(batch["image"].to(ctx.device)).float())
                txts.append(net.encode_text(batch["text"].to(ctx.device)).float())
            counts.append(torch.bincount(batch["caption_image"].cpu(), minlength=batch["image"].shape[0]))
        dim = net.embed_dim
        img = ctx.gather(torch.cat(imgs) if imgs else torch.zeros(0, dim, device=ctx.device))
        txt = ctx.gather(torch.cat(txts) if txts else torch.zeros(0, dim, device=ctx.device))
        cnt = ctx.gather((torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)).to(ctx.device))
        return img.cpu(), txt.cpu(), torch.repeat_interleave(torch.arange(len(cnt)), cnt.cpu())

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        img, txt, caption_image = self.embed_split(model, batches, ctx)
        # unit vectors: ranking by -Euclidean distance = ranking by dot product
        r_i2t, r_t2i = chunked_ranks(lambda rows: img[rows] @ txt.T, img.shape[0], caption_image)
        out = summarize(r_i2t, r_t2i)
        out["images"], out["captions"] = float(img.shape[0]), float(txt.shape[0])
        if ctx.is_main and ctx.out_dir:
            from xray_match.metrics.plots import save_recall_curve

            ctx.artifacts.append(save_recall_curve(r_i2t, r_t2i, os.path.join(ctx.out_dir, "recall_curve.png"),
                                                   title=f"dspe ({self.cfg.dspe.text_features})"))
        return out

    def inference(self, model: nn.Module) -> "DSPEInference":
        return DSPEInference(unwrap(model), self.cfg, self.text_state())


class DSPEInference:
    """A loaded retrieval model with its preprocessing: embed images / texts, rank one by the other."""

    def __init__(self, model: DSPE, cfg: Config, text_state: dict[str, Any]):
        self.model = model.eval()
        self.transform = RetrievalTransform(cfg, text_state, train=False)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        x = torch.stack([self.transform.image({"image": im.convert("RGB")}) for im in images]).to(self.device)
        return self.model.encode_image(x).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.transform.featurize(list(texts)).to(self.device)).float().cpu()

    def rank_images(self, text: str, images: list) -> list[tuple[int, float]]:
        s = (self.encode_images(images) @ self.encode_texts([text]).T).squeeze(1)
        return [(int(i), float(s[i])) for i in s.argsort(descending=True)]

    def rank_texts(self, image, texts: list[str]) -> list[tuple[int, float]]:
        s = (self.encode_texts(texts) @ self.encode_images([image]).T).squeeze(1)
        return [(int(i), float(s[i])) for i in s.argsort(descending=True)]


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


# ----------------------------------------------------------------------------- phrase localization


def crop_regions(image: torch.Tensor, boxes: np.ndarray, src_size: tuple[float, float], crop: int) -> torch.Tensor:
    """(R, 3, crop, crop) bilinear crops of ``boxes`` (R, 4) given in ``src_size`` = (W, H) pixels
    out of ``image`` (3, h, w) (the resized tensor)."""
    from torchvision.ops import roi_align

    _, h, w = image.shape
    b = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4).clone()
    b[:, [0, 2]] *= w / src_size[0]
    b[:, [1, 3]] *= h / src_size[1]
    return roi_align(image[None], [b], output_size=(crop, crop), spatial_scale=1.0, sampling_ratio=2, aligned=True)


class PhraseTransform:
    """Decoded sample -> regions and phrases of one image (train) or its candidates (eval)."""

    def __init__(self, cfg: Config, text_state: dict[str, Any], train: bool, hard_negatives: dict | None = None):
        d = cfg.dspe
        self.train = train
        self.parts = frozenset()  # pixels, boxes and phrase links only: no saliency / regions.npy
        self.extra, self.per_phrase, self.pos_iou = d.extra_positives, d.regions_per_phrase, d.pos_iou
        self.crop, self.n_jitter, self.scales = d.crop_size, d.jitter_per_box, list(d.window_scales)
        self.n_hard = d.hard_negatives_in_batch
        self.hard = hard_negatives or {}
        self.to_tensor = image_to_tensor(cfg.data.image_size)
        self.norm = normalize()
        self.featurize = _Featurize(text_state)

    def _pixels(self, sample: dict[str, Any]) -> tuple[torch.Tensor, tuple[float, float]]:
        meta = sample["meta"]
        size = (float(meta.get("width") or sample["image"].width), float(meta.get("height") or sample["image"].height))
        return self.to_tensor(sample["image"]), size

    def crops(self, img: torch.Tensor, boxes: np.ndarray, size: tuple[float, float]) -> torch.Tensor:
        return self.norm(crop_regions(img, boxes, size, self.crop))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{sample.get('url', '?')}: key {sample.get('key', '?')!r}"
        meta = sample["meta"]
        links = object_phrases(meta, where)
        img, size = self._pixels(sample)
        objects = meta["objects"]
        return self._train_item(sample, img, size, objects, links) if self.train else \
            self._eval_item(sample, img, size, objects)

    def _train_item(self, sample, img, size, objects, links) -> dict[str, Any]:
        boxes, region_keys, neg_for, texts = [], [], [], []
        rng = np.random.default_rng(random.getrandbits(32))
        for obj, phrases in links.items():
            gt = objects[obj]["box"]
            keys = {phrase_key(p) for p in phrases}
            extra = [b for b in jitter_boxes(gt, 8 * self.per_phrase, size, rng, shift=0.15, scale=0.15)
                     if _iou(b, gt) >= self.pos_iou][: self.per_phrase - 1]
            for b in [gt, *extra]:
                boxes.append(list(map(float, b)))
                region_keys.append(keys)
                neg_for.append("")
            chosen, seen = [], set()
            for p in random.sample(phrases, len(phrases)):
                if phrase_key(p) not in seen:
                    chosen.append(p)
                    seen.add(phrase_key(p))
                if len(chosen) == 1 + self.extra:
                    break
            texts += chosen
        mined = self.hard.get(sample["key"], {})
        if mined and self.n_hard:
            for k in dict.fromkeys(phrase_key(t) for t in texts):
                for b in random.sample(mined.get(k, []), min(self.n_hard, len(mined.get(k, [])))):
                    boxes.append(list(map(float, b)))
                    region_keys.append(set())
                    neg_for.append(k)
        return {"regions": self.crops(img, np.asarray(boxes), size), "region_keys": region_keys, "neg_for": neg_for,
                "text": self.featurize(texts), "text_keys": [phrase_key(t) for t in texts]}

    def _eval_item(self, sample, img, size, objects) -> dict[str, Any]:
        rng = np.random.default_rng(stable_id(sample["meta"]["image_id"]) % (2**32))
        cands = candidate_boxes([o["box"] for o in objects], size, self.n_jitter, self.scales, rng)
        texts, gts = [], []
        for plist in sample["meta"]["phrases"]:
            for p in plist:
                texts.append(p["text"])
                gts.append(objects[p["object"]]["box"])
        return {"regions": self.crops(img, cands, size), "boxes": torch.from_numpy(cands),
                "text": self.featurize(texts), "gt": torch.tensor(gts, dtype=torch.float32).reshape(-1, 4),
                "text_keys": [phrase_key(t) for t in texts], "key": sample["key"]}


def collate_phrase_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Regions (n_x, 3, c, c), phrases (n_y, F), ``pos`` (n_x, n_y) by phrase identity across the
    whole batch, and ``neg``: the complement of ``pos`` except that a mined hard-negative region is
    a negative only of the phrase it was mined for."""
    region_keys = [k for it in items for k in it["region_keys"]]
    neg_for = [n for it in items for n in it["neg_for"]]
    text_keys = [k for it in items for k in it["text_keys"]]
    pos = positive_matrix(region_keys, text_keys)
    neg = ~pos
    for r, key in enumerate(neg_for):
        if key:
            neg[r] = torch.tensor([k == key for k in text_keys], dtype=torch.bool)
    return {"image": torch.cat([it["regions"] for it in items]), "text": torch.cat([it["text"] for it in items]).float(),
            "pos": pos, "neg": neg}


def collate_phrase_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Candidates and phrases of every item with ``cand_image`` / ``phrase_image`` item indices."""
    return {
        "image": torch.cat([it["regions"] for it in items]),
        "boxes": torch.cat([it["boxes"] for it in items]),
        "cand_image": torch.tensor([i for i, it in enumerate(items) for _ in range(len(it["boxes"]))], dtype=torch.long),
        "text": torch.cat([it["text"] for it in items]).float(),
        "gt": torch.cat([it["gt"] for it in items]),
        "phrase_image": torch.tensor([i for i, it in enumerate(items) for _ in it["text_keys"]], dtype=torch.long),
        "text_keys": [k for it in items for k in it["text_keys"]],
        "keys": [it["key"] for it in items],
    }


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def _encode_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([fn(x[s : s + chunk].to(device)).float() for s in range(0, x.shape[0], chunk)]) \
        if x.shape[0] else torch.zeros(0)


@torch.no_grad()
def localize_batch(net: DSPE, batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    """Embed a phrase-eval batch: each phrase's distances to its own image's candidates, the
    chosen box and whether it hits (IoU >= 0.5)."""
    regions = _encode_chunks(net.encode_image, batch["image"], device).cpu()  # (C, D)
    phrases = _encode_chunks(net.encode_text, batch["text"], device).cpu()  # (P, D)
    dist = torch.cdist(phrases, regions)  # (P, C)
    valid = batch["phrase_image"].view(-1, 1) == batch["cand_image"].view(1, -1)  # (P, C)
    chosen = best_candidates(dist, valid)
    hits = localization_hits(batch["boxes"][chosen], batch["gt"])
    return {"dist": dist, "valid": valid, "chosen": chosen, "hits": hits, "regions": regions, "phrases": phrases}


@RECIPES.register("dspe_phrase")
class DSPEPhraseRecipe(_DSPEBase):
    """Region-phrase embedding; ``val/phrase_acc`` = share of phrases whose nearest candidate box
    has IoU >= 0.5 with the phrase's ground-truth box."""

    name = "dspe_phrase"
    metric = "val/phrase_acc"
    mode = "max"

    @classmethod
    def prepare(cls, cfg: Config, root: str) -> dict[str, Any]:
        if cfg.dspe.image_source != "cnn":
            raise ConfigError("dspe.image_source: phrase localization crops regions from pixels; use 'cnn'")
        phrases = []
        for key, meta in iter_meta(root, cfg.data.train_split):
            phrases += [t for ts in object_phrases(meta, f"{root}: {cfg.data.train_split} key {key!r}").values() for t in ts]
        prepared: dict[str, Any] = {"text": cls._checkpoint_text(cfg) or fit_text(cfg, phrases),
                                    "text_source": cfg.data.train_split}
        if cfg.dspe.hard_negatives:
            prepared["hard_negatives"] = load_hard_negatives(cfg.dspe.hard_negatives)
        return prepared

    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return PhraseTransform(self.cfg, self.text_state(), train, self.info.prepared.get("hard_negatives"))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_phrase_train(items) if "region_keys" in items[0] else collate_phrase_eval(items)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model({"image": batch["image"], "text": batch["text"]})

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        net = unwrap(model)
        hits, n_phr, n_cand, n_img = 0, 0, 0, 0
        for batch in batches:
            with ctx.autocast():
                r = localize_batch(net, batch, ctx.device)
            hits += int(r["hits"].sum())
            n_phr += int(r["hits"].numel())
            n_cand += int(batch["boxes"].shape[0])
            n_img += len(batch["keys"])
        tot = ctx.gather(torch.tensor([[hits, n_phr, n_cand, n_img]], dtype=torch.float64, device=ctx.device)).sum(0).cpu()
        return {"phrase_acc": float(tot[0] / tot[1]) if tot[1] else float("nan"), "phrases": float(tot[1]),
                "candidates_per_image": float(tot[2] / tot[3]) if tot[3] else 0.0}

    def inference(self, model: nn.Module) -> "PhraseInference":
        return PhraseInference(unwrap(model), self.cfg, self.text_state())


class PhraseInference:
    """A loaded region-phrase model: embed phrases / regions and pick a phrase's box in an image."""

    def __init__(self, model: DSPE, cfg: Config, text_state: dict[str, Any]):
        self.model = model.eval()
        self.transform = PhraseTransform(cfg, text_state, train=False)
        self.scales = list(cfg.dspe.window_scales)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.transform.featurize(list(texts)).to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_regions(self, image, boxes) -> torch.Tensor:
        """(R, D) embeddings of ``boxes`` (R, 4) [x0, y0, x1, y1] in ``image``'s pixels (PIL)."""
        img = self.transform.to_tensor(image.convert("RGB"))
        crops = self.transform.crops(img, np.asarray(boxes, np.float32), (float(image.width), float(image.height)))
        return self.model.encode_image(crops.to(self.device)).float().cpu()

    def localize(self, image, phrases: list[str], boxes=None) -> list[list[float]]:
        """The nearest box to each phrase among ``boxes`` (default: sliding windows)."""
        from xray_match.metrics.localization import sliding_windows

        if boxes is None:
            boxes = sliding_windows((float(image.width), float(image.height)), self.scales, stride=0.25)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        dist = torch.cdist(self.encode_texts(phrases), self.encode_regions(image, boxes))  # (P, R)
        return [boxes[i].tolist() for i in dist.argmin(1).tolist()]


def load_hard_negatives(path: str) -> dict[str, dict[str, list[list[float]]]]:
    """``{image key: {phrase key: [[x0, y0, x1, y1], ...]}}`` written by :func:`mine_hard_negatives`."""
    import fsspec

    try:
        with fsspec.open(path, "r") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"dspe.hard_negatives: {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"dspe.hard_negatives: {path!r} is not valid JSON ({e})") from None
    boxes = d.get("boxes") if isinstance(d, dict) else None
    if not isinstance(boxes, dict):
        raise ConfigError(f"dspe.hard_negatives: {path!r} has no 'boxes' mapping")
    for img, per in boxes.items():
        for k, bs in per.items():
            if not all(isinstance(b, list) and len(b) == 4 for b in bs):
                raise ConfigError(f"dspe.hard_negatives: {path!r}: boxes[{img!r}][{k!r}] is not a list of [x0, y0, x1, y1]")
    return boxes


@torch.no_grad()
def mine_hard_negatives(model: DSPE, cfg: Config, info: DataInfo, out_path: str, *, max_images: int | None = None,
                        device: torch.device | None = None, seed: int = 0) -> dict[str, Any]:
    """§4.3 negative mining with a stage-1 model, on the TRAINING split.

    For each unique phrase (by :func:`phrase_key`) and each training image it is linked in, the
    candidate boxes of that image that do not overlap any of the phrase's ground-truth boxes (IoU <
    0.5) and lie closer to the phrase than its nearest ground-truth box are hard negatives. At most
    ``dspe.hard_negatives_per_phrase`` of them are kept per unique phrase, sampled uniformly
    (seeded). Writes ``{"boxes": {image key: {phrase key: [box, ...]}}, "stats": {...}}`` to
    ``out_path`` and returns it.
    """
    from torchvision.ops import box_iou

    from xray_match.data.reader import make_loader

    d = cfg.dspe
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    max_images = d.mine_max_images if max_images is None else max_images
    recipe = DSPEPhraseRecipe(cfg, info)
    loader = make_loader(info.root, cfg.data.train_split, PhraseTransform(cfg, recipe.text_state(), train=False),
                         collate_phrase_eval, batch_size=cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers)
    found: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
    n_img = n_occ = 0
    for batch in loader:
        r = localize_batch(model, batch, device)
        keys = batch["text_keys"]
        for img_i, img_key in enumerate(batch["keys"]):
            cand = (batch["cand_image"] == img_i).nonzero().squeeze(1)  # this image's candidates
            phr = (batch["phrase_image"] == img_i).nonzero().squeeze(1)
            by_key: dict[str, list[int]] = defaultdict(list)
            for p in phr.tolist():
                by_key[keys[p]].append(p)
            boxes = batch["boxes"][cand]  # (C_i, 4)
            for k, ps in by_key.items():
                gt = batch["gt"][ps].unique(dim=0)  # the phrase's ground-truth boxes in this image
                overlap = box_iou(boxes, gt).max(1).values >= IOU_HIT  # (C_i,)
                # one row per wording of the phrase in this image ("a red seven", "red seven")
                dist = r["dist"][ps][:, cand]  # (n_ps, C_i)
                d_gt = dist[:, overlap].min(1, keepdim=True).values if bool(overlap.any()) \
                    else torch.full((len(ps), 1), float("inf"))
                hard = (~overlap) & (dist < d_gt).any(0)  # (C_i,)
                found[k] += [(img_key, boxes[j].tolist()) for j in hard.nonzero().squeeze(1).tolist()]
                n_occ += 1
            n_img += 1
            if max_images and n_img >= max_images:
                break
        if max_images and n_img >= max_images:
            break
    rng = random.Random(seed)
    out: dict[str, dict[str, list[list[float]]]] = defaultdict(dict)
    kept = 0
    for k, lst in sorted(found.items()):
        if len(lst) > d.hard_negatives_per_phrase:
            lst = rng.sample(lst, d.hard_negatives_per_phrase)
        for img_key, box in lst:
            out[img_key].setdefault(k, []).append([round(v, 2) for v in box])
            kept += 1
    result = {"boxes": dict(out), "stats": {"images": n_img, "phrase_occurrences": n_occ, "unique_phrases": len(found),
                                            "found": sum(len(v) for v in found.values()), "kept": kept}}
    from xray_match.data.io import atomic_write_bytes

    atomic_write_bytes(out_path, json.dumps(result).encode())
    return result


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


# ----------------------------------------------------------------------------- two-stage driver


def mine_from_checkpoint(checkpoint: str, out_path: str, max_images: int | None = None) -> dict[str, Any]:
    """Rebuild a stage-1 ``dspe_phrase`` model from its checkpoint and mine its hard negatives."""
    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    info = DataInfo(**state["info"])
    model = DSPEPhraseRecipe(cfg.with_overrides({"dspe.init_checkpoint": ""}), info).build_model()
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return mine_hard_negatives(model, cfg, info, out_path, max_images=max_images, device=device, seed=cfg.train.seed)


def localize_two_stage(cfg: Config, *, stage2_epochs: int, stage2_lr_mult: float = 0.1,
                       test_eval: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """§4.3: train the region-phrase embedding (stage 1), mine at most
    ``dspe.hard_negatives_per_phrase`` hard-negative boxes per unique training phrase with it, then
    continue training from it on the augmented set with the ranking terms only (stage 2:
    lambda_2 = lambda_3 = 0). Each stage is a ``run_training`` run (Ray Train, MLflow); stage 2 is
    the one registered. Returns both runs and, with ``test_eval``, test accuracy before and after."""
    import time

    from xray_match.data.format import join
    from xray_match.launch import evaluate_test
    from xray_match.train.worker import run_training

    if cfg.model.name != "dspe_phrase":
        raise ConfigError(f"model.name: two-stage localization needs 'dspe_phrase', got {cfg.model.name!r}")
    name = cfg.ray.name or f"dspe-phrase-{time.strftime('%Y%m%d-%H%M%S')}"
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    s1 = cfg.with_overrides({"ray.name": f"{name}-stage1", "dspe.hard_negatives": ""})
    out["stage1"] = run_training(s1, register=False)
    out["stage1"]["wall_s"] = time.perf_counter() - t0
    ckpt1 = out["stage1"]["checkpoint"]
    if not ckpt1:
        raise RuntimeError("stage 1 produced no checkpoint")
    if test_eval:
        out["test_before"] = evaluate_test(s1, ckpt1)
        log(f"stage 1 test: {out['test_before']}")
    t1 = time.perf_counter()
    hard_path = join(out["stage1"]["storage"], f"{name}-hard-negatives.json")
    mined = mine_from_checkpoint(ckpt1, hard_path, max_images=cfg.dspe.mine_max_images)
    out["mining"] = mined["stats"] | {"path": hard_path, "wall_s": time.perf_counter() - t1}
    log(f"mined hard negatives: {out['mining']}")
    t2 = time.perf_counter()
    s2 = cfg.with_overrides({"ray.name": f"{name}-stage2", "dspe.hard_negatives": hard_path, "dspe.init_checkpoint": ckpt1,
                             "dspe.lambda_2": 0.0, "dspe.lambda_3": 0.0, "train.epochs": stage2_epochs,
                             "optim.lr": cfg.optim.lr * stage2_lr_mult})
    out["stage2"] = run_training(s2)
    out["stage2"]["wall_s"] = time.perf_counter() - t2
    if test_eval and out["stage2"]["checkpoint"]:
        out["test_after"] = evaluate_test(s2, out["stage2"]["checkpoint"])
        log(f"stage 2 test: {out['test_after']}")
        _log_metrics(cfg, out["stage2"].get("run_id"), {f"test/before_{k.split('/')[-1]}": v for k, v in out["test_before"].items()}
                     | out["test_after"])
    return out


def _log_metrics(cfg: Config, run_id: str | None, metrics: dict[str, float]) -> None:
    if not run_id or not cfg.tracking.enabled:
        return
    from mlflow import MlflowClient

    from xray_match.tracking.runs import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(cfg))
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
