"""RDAN recipe: relation-wise dual attention network trained with the hinge ranking loss
(paper: rdan-relation-dual-attention; model in :mod:`xray_match.models.rdan`, docs/rdan.md).

Driver side, ``prepare`` builds the word vocabulary from the TRAINING captions only. Training
scores every image of the batch against every caption (B x B) in one batched call and applies
Eq. (13) (or Eq. (12)). Evaluation encodes this rank's images and captions, gathers the features,
scores its band of image rows against all captions (chunked, no_grad) and gathers the bands: every
rank returns the same Recall@K.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from xray_match.config import Config
from xray_match.configfile import ConfigError
from xray_match.data.format import ShardFormatError
from xray_match.data.transforms import image_to_tensor, normalize, stable_id
from xray_match.losses.ranking import HingeRankingLoss
from xray_match.metrics.retrieval import fold_recall, ranks_i2t, ranks_t2i, summarize
from xray_match.metrics.two_stage import pooled_embeddings, two_stage_scores
from xray_match.metrics.xattn import score_all_pairs, score_all_pairs_distributed
from xray_match.models.rdan import RDAN, build_rdan
from xray_match.registry import RECIPES, SPACES
from xray_match.text.vocab import Vocab, build_vocab, split_captions
from xray_match.train.recipe import EvalContext, Recipe, RetrievalInference, unwrap
from xray_match.train.shortlist import embed_samples

#: Table 3 rows by name -> the switches they set
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "mu0": {"mu": 0.0},
    "mu1": {"mu": 1.0},
    "one-path": {"one_path": True},
    "no-cnn": {"use_cnn": False},
    "no-res": {"use_residual": False},
    "no-hard": {"hardest": False},
}


def effective(cfg: Config) -> dict[str, Any]:
    """The model/loss switches after applying ``rdan.ablation`` (a Table 3 row) to the fields."""
    r = cfg.rdan
    out = {"mu": r.mu, "one_path": r.one_path, "use_cnn": r.use_cnn, "use_residual": r.use_residual, "hardest": r.hardest}
    out |= ABLATIONS[r.ablation]
    if not out["use_cnn"] and not out["use_residual"]:
        raise ConfigError("rdan.use_cnn / rdan.use_residual: both off leaves no matrix to attend on")
    return out


class RDANTransform:
    """Decoded sample -> ``{"x": image (3, H, W) or regions (k, d_v), "tokens": [ids per caption], ...}``.

    Training items carry one random caption of the image; evaluation items carry all of them.
    Picklable (runs in DataLoader workers): holds the vocabulary's word list, not a closure.
    ``section`` names the config section with ``region_source`` / ``region_dim`` (rdan, or scan,
    which reads the same inputs).
    """

    def __init__(self, cfg: Config, vocab: Vocab, train: bool, section: str = "rdan"):
        self.train = train
        self.vocab = vocab
        self.size = cfg.data.image_size
        self.max_len = cfg.data.max_text_len
        self.section = section
        self.source = getattr(cfg, section).region_source
        self.region_dim = getattr(cfg, section).region_dim

    def image(self, sample: dict[str, Any]) -> torch.Tensor:
        if self.source == "precomputed":
            r = sample.get("regions")
            where = f"{sample.get('url', '?')}: key {sample.get('key', '?')!r}"
            if r is None:
                raise ShardFormatError(f"{where}: {self.section}.region_source=precomputed but the sample has no regions.npy")
            if r.ndim != 2 or r.shape[1] != self.region_dim:
                raise ShardFormatError(f"{where}: regions.npy is {tuple(r.shape)}, expected (k, {self.region_dim}) ({self.section}.region_dim)")
            return torch.as_tensor(r, dtype=torch.float32)
        return normalize()(image_to_tensor(self.size)(sample["image"]))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.vocab.encode(text, self.max_len), dtype=torch.long)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        caps = sample["meta"]["captions"]
        texts = [random.choice(caps)] if self.train else caps
        return {
            "x": self.image(sample),
            "tokens": [self.encode(t) for t in texts],
            "image_id": stable_id(sample["meta"]["image_id"]),
            "key": str(sample["key"]),
            "split": str(sample["meta"].get("split", "")),
        }


def collate(items: list[dict[str, Any]], source: str = "grid", ignore_duplicates: bool = True) -> dict[str, Any]:
    """Stack images (or region sets), right-pad every item's captions with 0.

    ``caption_image`` (N_cap,) maps caption rows to items. For training batches (one caption per
    item), ``ignore_pairs`` (B, N_cap) marks pairs that are not negatives although not paired: the
    same image twice in a batch, or a caption whose words equal the item's own caption (templated
    data repeats captions across images).
    """
    caps = [t for it in items for t in it["tokens"]]
    lengths = torch.tensor([len(t) for t in caps], dtype=torch.long)
    tokens = torch.zeros(len(caps), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(caps):
        tokens[i, : len(t)] = t
    caption_image = torch.tensor([i for i, it in enumerate(items) for _ in it["tokens"]], dtype=torch.long)
    image_id = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
    if source == "precomputed":
        k = {it["x"].shape[0] for it in items}
        if len(k) != 1:
            raise ShardFormatError(f"regions.npy: items of one batch have different region counts {sorted(k)}")
    batch = {
        "tokens": tokens, "lengths": lengths, "caption_image": caption_image, "image_id": image_id,
        ("regions" if source == "precomputed" else "images"): torch.stack([it["x"] for it in items]),
        "keys": [it["key"] for it in items],
        "split": items[0].get("split", ""),
    }
    if ignore_duplicates and all(len(it["tokens"]) == 1 for it in items):  # training batches only
        same_image = image_id.view(-1, 1) == image_id[caption_image].view(1, -1)  # (B, N_c)
        text = [tuple(t.tolist()) for t in caps]
        own = [set() for _ in items]
        for c, i in enumerate(caption_image.tolist()):
            own[i].add(text[c])
        same_text = torch.tensor([[text[c] in own[i] for c in range(len(caps))] for i in range(len(items))])
        positive = caption_image.view(1, -1) == torch.arange(len(items)).view(-1, 1)
        batch["ignore_pairs"] = (same_image | same_text) & ~positive
    return batch


class _Collate:
    def __init__(self, source: str, ignore_duplicates: bool):
        self.source, self.ignore_duplicates = source, ignore_duplicates

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.source, self.ignore_duplicates)


class RDANLoss(nn.Module):
    """The ranking loss on the model's B x B scores, Eq. (13) or Eq. (12).

    ``warmup_steps`` > 0 (with ``hardest``): the first training steps use Eq. (12), all negatives,
    then Eq. (13). From scratch, the hardest negative of a random model is an arbitrary pair and the
    hinge on it alone gives a weak, noisy signal (VSE++ reports slow starts); summing over all
    negatives first gets the encoders going. The step count is a buffer, so it survives resume.
    """

    def __init__(self, margin: float, hardest: bool, reduction: str, warmup_steps: int = 0, embed_weight: float = 0.0):
        super().__init__()
        self.rank = HingeRankingLoss(margin, hardest, reduction, score_key="scores")
        self.all_negatives = HingeRankingLoss(margin, False, reduction, score_key="scores")
        self.warmup_steps = warmup_steps if hardest else 0
        # auxiliary: the same hinge on the pooled features' cosine, which shortlists for two-stage retrieval
        self.embed_weight = float(embed_weight)
        self.embed = HingeRankingLoss(margin, hardest, reduction, score_key="embed_scores")
        self.embed_all = HingeRankingLoss(margin, False, reduction, score_key="embed_scores")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        warm = self.training and int(self.steps) < self.warmup_steps
        if self.training:
            self.steps += 1
        out = (self.all_negatives if warm else self.rank)(outputs, batch)
        if self.embed_weight > 0 and "embed_scores" in outputs:
            aux = (self.embed_all if warm else self.embed)(outputs, batch)
            out["embed_loss"] = self.embed_weight * aux["rank_loss"]
        return out


@RECIPES.register("rdan")
class RDANRecipe(Recipe):
    """RDAN; also the base of the SCAN baseline (:mod:`xray_match.recipes.scan`), which shares the data
    path, the all-pairs evaluation and the inference object and reads its own section: everything
    here reads the inputs and evaluation settings through :attr:`opts`, the recipe's section."""

    section = "rdan"
    no_grad_cache = ("its cross attention scores every image-caption pair jointly, so the loss is not a function "
                     "of per-sample embeddings (docs/big_batches.md)")
    metric = "val/rsum"
    mode = "max"
    fits_train_split = True  # the vocabulary

    @classmethod
    def pixels_field(cls, cfg: Config) -> str | None:
        return f"{cls.section}.region_source" if getattr(cfg, cls.section).region_source == "grid" else None

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse a config this method cannot run, before any worker starts."""
        effective(cfg)  # an impossible ablation
        if cfg.rdan.shortlist_model and not cfg.rdan.rerank_top_k:
            raise ConfigError("rdan.shortlist_model: shortlists only with rdan.rerank_top_k > 0")

    @classmethod
    def prepare(cls, cfg: Config, root: str) -> dict[str, Any]:
        """The vocabulary, from the train split's captions only (vsepp#29 leaked test words)."""
        cls.check(cfg)
        split = cfg.data.train_split
        vocab = build_vocab(split_captions(root, split), getattr(cfg, cls.section).min_word_count, source=split)
        return {"vocab": vocab.to_dict()}

    @property
    def opts(self) -> Any:
        """This method's config section (``cfg.rdan``; ``cfg.scan`` for SCAN)."""
        return getattr(self.cfg, self.section)

    @property
    def hardest(self) -> bool:
        """Whether the loss takes the hardest negatives (Eq. (13)) after any warm-up."""
        return effective(self.cfg)["hardest"]

    @property
    def rerank_top_k(self) -> int:
        """Two-stage evaluation's shortlist size (0: every pair exactly)."""
        return self.opts.rerank_top_k

    def title(self) -> str:
        """The method as named in figures."""
        return f"rdan ({self.opts.ablation})"

    @property
    def vocab(self) -> Vocab:
        if "vocab" not in self.info.prepared:
            raise ConfigError("rdan: DataInfo.prepared has no 'vocab' (run RDANRecipe.prepare on the train split)")
        return Vocab.from_dict(self.info.prepared["vocab"])

    def build_model(self) -> nn.Module:
        r, sw = self.cfg.rdan, effective(self.cfg)
        return build_rdan(
            len(self.vocab), region_source=r.region_source, backbone=r.backbone, backbone_width=r.backbone_width,
            grid=r.grid, region_dim=r.region_dim, embed_dim=r.embed_dim, word_dim=r.word_dim, gru_layers=r.gru_layers,
            relation_channels=r.relation_channels, lambda_=r.lambda_, mu=sw["mu"], one_path=sw["one_path"],
            use_cnn=sw["use_cnn"], use_residual=sw["use_residual"],
        )

    def build_loss(self) -> nn.Module:
        r = self.cfg.rdan
        return RDANLoss(r.margin, effective(self.cfg)["hardest"], r.loss_reduction, r.hardest_warmup_steps,
                        r.embed_loss_weight)

    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return RDANTransform(self.cfg, self.vocab, train, self.section)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return _Collate(self.opts.region_source, self.opts.ignore_duplicates)(items)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(batch)  # {"scores": (B, N_cap)}, through DDP so gradients sync

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_split(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext):
        """This rank's features, gathered: regions (N_i, k, D), packed words (W, D), lengths (N_c,),
        caption_image (N_c,), in a canonical order (images sorted by key) on every rank."""
        net: RDAN = unwrap(model)
        # train.max_eval_samples caps the validation split only (scoring is quadratic in its size);
        # a test split is always scored whole. The sample's json names its split.
        limit = self.cfg.train.max_eval_samples
        per_rank = -(-limit // ctx.world_size) if limit else 0
        v_all, w_all, len_all, cnt_all, keys = [], [], [], [], []
        autocast = ctx.autocast or _nullcontext
        for batch in batches:
            if per_rank and len(keys) >= per_rank and batch.get("split") == self.cfg.data.val_split:
                continue  # drain the loader (its workers stop cleanly), score what was kept
            x = batch["regions"] if "regions" in batch else batch["images"]
            with autocast():
                v = net.encode_images(x.to(ctx.device)).float()  # (B, k, D)
                e = net.encode_texts(batch["tokens"].to(ctx.device), batch["lengths"].to(ctx.device)).float()
            mask = torch.arange(e.shape[1], device=e.device).view(1, -1) < batch["lengths"].to(e.device).view(-1, 1)
            v_all.append(v)
            w_all.append(e[mask])  # (words, D), caption by caption
            len_all.append(batch["lengths"].to(ctx.device))
            cnt_all.append(torch.bincount(batch["caption_image"], minlength=x.shape[0]).to(ctx.device))
            keys.extend(batch["keys"])
        d = self.opts.embed_dim
        # region count: every rank must gather the same trailing shape, even one without samples
        k = max(ctx.gather_objects([x.shape[1] for x in v_all[:1]]) or [0])

        def cat(xs: list[torch.Tensor], *shape: int, dtype=torch.float32) -> torch.Tensor:
            return torch.cat(xs) if xs else torch.zeros(0, *shape, dtype=dtype, device=ctx.device)

        v = ctx.gather(cat(v_all, k, d)).cpu()
        words = ctx.gather(cat(w_all, d)).cpu()
        lengths = ctx.gather(cat(len_all, dtype=torch.long)).cpu()
        counts = ctx.gather(cat(cnt_all, dtype=torch.long)).cpu()
        keys = ctx.gather_objects(keys)
        if len(keys) != v.shape[0]:
            raise RuntimeError(f"rdan.evaluate: {len(keys)} keys for {v.shape[0]} images after gather")
        # canonical order: images by key (5-fold folds are runs of consecutive images), captions with them
        order = sorted(range(len(keys)), key=keys.__getitem__)
        first_cap = torch.cumsum(counts, 0) - counts
        first_word = torch.cumsum(lengths, 0) - lengths
        cap_idx = torch.cat([torch.arange(first_cap[i], first_cap[i] + counts[i]) for i in order])
        word_idx = torch.cat([torch.arange(first_word[c], first_word[c] + lengths[c]) for c in cap_idx.tolist()])
        caption_image = torch.repeat_interleave(torch.arange(len(order)), counts[order])
        return v[order], words[word_idx], lengths[cap_idx], caption_image, [keys[i] for i in order]

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        net: RDAN = unwrap(model)
        r = self.opts
        v, words, lengths, caption_image, keys = self.encode_split(model, batches, ctx)
        t0 = time.perf_counter()
        autocast = ctx.autocast or _nullcontext
        kw = dict(caption_block=r.eval_caption_block, cell_budget=r.eval_cell_budget, device=ctx.device)
        with autocast():
            if self.rerank_top_k:  # two-stage: a shortlist, exact rerank (every rank alike: it is cheap)
                if r.shortlist_model:  # another model's vectors of the same samples
                    counts = torch.bincount(caption_image, minlength=len(keys)).tolist()
                    img, txt = embed_samples(r.shortlist_model, self.info.root, ctx.split, keys, counts,
                                             device=ctx.device)
                else:  # the model's own pooled features
                    img, txt = pooled_embeddings(v, words, lengths)
                scores, pairs = two_stage_scores(net.paired_scores, v, words, lengths, img, txt, self.rerank_top_k,
                                                 device=ctx.device, cell_budget=r.eval_cell_budget)
            else:
                scores = score_all_pairs_distributed(net.pair_scores, v, words, lengths, rank=ctx.rank,
                                                     world_size=ctx.world_size, gather=ctx.gather, **kw).cpu()
                pairs = scores.numel()
        score_s = time.perf_counter() - t0
        r_i2t, r_t2i = ranks_i2t(scores, caption_image), ranks_t2i(scores, caption_image)
        out = summarize(r_i2t, r_t2i)
        if r.eval_folds > 1 and v.shape[0] % r.eval_folds == 0:
            mean = fold_recall(scores, caption_image, r.eval_folds)["mean"]
            out |= {f"{r.eval_folds}fold_{k}": x for k, x in mean.items()}
        out["rank_loss"] = self._val_loss(scores, caption_image)
        out["images"], out["captions"], out["score_s"] = float(v.shape[0]), float(len(lengths)), score_s
        out["pairs_scored"] = float(pairs)
        if ctx.is_main and ctx.out_dir:
            from xray_match.metrics.plots import save_recall_curve

            ctx.artifacts.append(save_recall_curve(r_i2t, r_t2i, os.path.join(ctx.out_dir, "recall_curve.png"),
                                                   title=self.title()))
        return out

    def _val_loss(self, scores: torch.Tensor, caption_image: torch.Tensor) -> float:
        """The training loss on consecutive blocks of one batch of images with their first captions."""
        n, b = scores.shape[0], self.cfg.data.batch_size
        first = torch.searchsorted(caption_image, torch.arange(n))
        loss = HingeRankingLoss(self.opts.margin, self.hardest, "mean")
        vals = [loss({"scores": scores[s : s + b][:, first[s : s + b]]})["rank_loss"].item() for s in range(0, n - b + 1, b)]
        return sum(vals) / len(vals) if vals else float("nan")

    def inference(self, model: nn.Module) -> "RDANInference":
        return RDANInference(unwrap(model), self.cfg, self.vocab, self.section)


class RDANInference(RetrievalInference):
    """A loaded RDAN (or SCAN) with its preprocessing: score images against texts, rank one by the other."""

    def __init__(self, model: RDAN, cfg: Config, vocab: Vocab, section: str = "rdan"):
        self.model, self.cfg = model.eval(), cfg
        self.transform = RDANTransform(cfg, vocab, train=False, section=section)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images (grid) or (k, d_v) region arrays (precomputed) -> regions V (N, k, D)."""
        if self.transform.source == "precomputed":
            x = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in images])
        else:
            x = torch.stack([self.transform.image({"image": im.convert("RGB")}) for im in images])
        return self.model.encode_images(x.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> word features E (N, n, D), zero beyond each text's length."""
        tokens, lengths = self._tokens(texts)
        return self.model.encode_texts(tokens.to(self.device), lengths.to(self.device)).float().cpu()

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.transform.encode(t) for t in texts]
        lengths = torch.tensor([len(t) for t in ids])
        tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for i, t in enumerate(ids):
            tokens[i, : len(t)] = t
        return tokens, lengths

    @torch.no_grad()
    def score(self, images: list, texts: list[str]) -> torch.Tensor:
        """F(I, T), Eq. (11) (SCAN: S(I, T)), (N_images, N_texts)."""
        v = self.encode_images(images)
        _, lengths = self._tokens(texts)
        e = self.encode_texts(texts)
        return score_all_pairs(self.model.pair_scores, v, e, lengths, device=self.device).cpu()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@SPACES.register("rdan")
def rdan_space(cfg: Config) -> dict[str, Any]:
    """mu (Eq. (11)), lambda (Eq. (8-9)), margin m (Eq. (13)) and the learning rate."""
    from ray import tune

    return {
        "rdan.mu": tune.uniform(0.0, 1.0),
        "rdan.lambda_": tune.loguniform(1.0, 20.0),
        "rdan.margin": tune.uniform(0.05, 0.5),
        "optim.lr": tune.loguniform(cfg.optim.lr / 10, cfg.optim.lr * 10),
    }


@SPACES.register("rdan_ablation")
def rdan_ablation_space(cfg: Config) -> dict[str, Any]:
    """A grid over the full model and the six Table 3 ablations."""
    from ray import tune

    return {"rdan.ablation": tune.grid_search(list(ABLATIONS))}
