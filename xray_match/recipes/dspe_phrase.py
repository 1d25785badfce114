"""DSPE phrase localization (Wang, Li, Lazebnik, CVPR 2016, §4.3): the ``dspe_phrase`` recipe.

The X view holds image regions (crops of boxes through the CNN), the Y view phrases. A region's
positives are the phrases linked to its object; each phrase gets ``regions_per_phrase`` positive
regions (its ground-truth box and jittered boxes with IoU >= ``pos_iou``), each region ``1 +
extra_positives`` phrases. Stage 2 (``dspe.hard_negatives`` set): mined hard-negative boxes
(:func:`xray_match.studies.dspe_localize.mine_hard_negatives`) join the batch as negatives of the
phrase they were mined for, and only the ranking terms Eq. (1-2) train (set lambda_2 = lambda_3 =
0). The two stages together: :mod:`xray_match.studies.dspe_localize`.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config
from xray_match.configfile import ConfigError
from xray_match.data.format import box_iou
from xray_match.data.reader import iter_meta
from xray_match.data.transforms import image_to_tensor, normalize, stable_id
from xray_match.metrics.localization import best_candidates, candidate_boxes, jitter_boxes, localization_hits
from xray_match.models.dspe import DSPE
from xray_match.recipes.dspe import DSPEBase, Featurize, fit_text, positive_matrix
from xray_match.registry import RECIPES
from xray_match.text.vocab import tokenize
from xray_match.train.recipe import EvalContext, unwrap

_ARTICLES = ("a", "an", "the")


def phrase_key(text: str) -> str:
    """Identity of a phrase: its words without a leading article ("a red seven" = "red seven")."""
    words = tokenize(text)
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


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


# ----------------------------------------------------------------------------- regions and phrases


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
        self.featurize = Featurize(text_state)

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
                     if box_iou(b, gt) >= self.pos_iou][: self.per_phrase - 1]
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
class DSPEPhraseRecipe(DSPEBase):
    """Region-phrase embedding; ``val/phrase_acc`` = share of phrases whose nearest candidate box
    has IoU >= 0.5 with the phrase's ground-truth box."""

    metric = "val/phrase_acc"
    item_fields = caption_fields = ()  # regions and phrases carry no item index to chunk a batch by
    no_grad_cache = "its batches hold regions and phrases with no item index to chunk them by (docs/big_batches.md)"
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
    """``{image key: {phrase key: [[x0, y0, x1, y1], ...]}}`` written by
    :func:`xray_match.studies.dspe_localize.mine_hard_negatives`."""
    from xray_match.data.io import open_url

    try:
        with open_url(path, "r") as fh:
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
