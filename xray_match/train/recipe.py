"""The contract between a method (moco, rdan, grounding, dspe) and the shared training loop.

A method subclasses :class:`Recipe` and registers it: ``@RECIPES.register("rdan")``. The loop
(:mod:`xray_match.train.loop`) and the Ray worker (:mod:`xray_match.driver.worker`) only ever
talk to this interface, so every method gets the same data streaming, DDP, bf16, checkpointing,
resume, Tune and MLflow handling without copies of them.

Data flow per step::

    shard sample --decode--> Sample dict --recipe.transform(train)--> item dict
    [items] --recipe.collate--> batch --recipe.forward(model, batch)--> outputs (dict of tensors)
    loss_module(outputs, batch) --> {"xxx_loss": scalar, "metric": scalar, ...}; the loop sums *_loss.

A decoded ``Sample`` (see :func:`xray_match.data.reader.decode_sample`) is a dict with keys
``key`` (str), ``url`` (shard), ``image`` (PIL RGB), ``meta`` (the sample json), and optional
``saliency`` (PIL "L" or None), ``regions`` (np.ndarray (k, d) or None), ``region_boxes``
(np.ndarray (k, 4) or None).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from xray_match.config import Config

if TYPE_CHECKING:
    from xray_match.data.reader import Source


@dataclass
class DataInfo:
    """What a recipe knows about the data before training: where it is, split sizes, and the
    driver-side ``prepared`` state (e.g. a vocabulary built from training captions only).

    A mixed run (``data.sources``) lists its folders in ``sources`` as plain data (``{"name",
    "root", "weight" (normalised), "counts"}``); ``root`` then only describes them (the roots,
    comma-separated), ``dataset`` joins their data sets with ``+`` and ``counts`` sums theirs."""

    root: str
    dataset: str
    counts: dict[str, int]
    prepared: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def stream(self) -> "str | list[Source]":
        """What the reader streams: the folder ``root``, or the mixed sources."""
        from xray_match.data.reader import Source

        return [Source(s["name"], s["root"], s["weight"]) for s in self.sources] if self.sources else self.root


@dataclass
class EvalContext:
    """Rank information and collectives for distributed evaluation (world size 1 without Ray)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], Any] = contextlib.nullcontext  # bf16 on GPU; a no-op context on CPU
    out_dir: str | None = None  # where rank 0 may write PNGs to log as artifacts
    artifacts: list[str] = field(default_factory=list)
    split: str = ""  # the split evaluated (its shards are under the recipe's ``info.root``)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor's first dimension across ranks in rank order (sizes may differ)."""
        from xray_match.distributed import all_gather_varsize

        return all_gather_varsize(t) if self.world_size > 1 else t

    def gather_objects(self, items: list[Any]) -> list[Any]:
        from xray_match.distributed import all_gather_objects

        return all_gather_objects(items) if self.world_size > 1 else list(items)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Recipe:
    """Base class; override what differs. ``cfg`` is the whole validated :class:`Config`."""

    #: the method's own config section (``cfg.moco``, ...; one of ``config.METHOD_SECTIONS``): a
    #: run logs the common sections and this one as MLflow params, not the other methods'
    section: ClassVar[str] = ""
    #: the validation metric Tune optimizes and the registry tags by default
    metric: ClassVar[str] = "val/rsum"
    mode: ClassVar[str] = "max"
    #: the columns a grid study's table reports per trial (its last epoch), after the grid's keys
    table_columns: ClassVar[tuple[str, ...]] = ("val/rsum",)
    #: gradient caching (``train.micro_batch_size``, :mod:`xray_match.train.gradcache`): the batch
    #: fields the encoders read with one row per item (``item_fields``) and one per caption
    #: (``caption_fields``, rows mapped to items by ``batch["caption_image"]``). Empty: the loss is no
    #: function of per-sample embeddings, and the config refuses the key, saying ``no_grad_cache``.
    item_fields: ClassVar[tuple[str, ...]] = ()
    caption_fields: ClassVar[tuple[str, ...]] = ()
    no_grad_cache: ClassVar[str] = "its loss is not a function of per-sample embeddings"
    #: whether :meth:`prepare` fits something on the train split (a vocabulary, tf-idf): such a
    #: method reads one folder, and ``data.sources`` is refused for it before any worker starts
    fits_train_split: ClassVar[bool] = False

    def __init__(self, cfg: Config, info: DataInfo):
        self.cfg = cfg
        self.info = info

    # ---- driver side, once, before any worker starts --------------------------------------
    @classmethod
    def prepare(cls, cfg: Config, root: str) -> dict[str, Any]:
        """State every worker needs and that must come from the train split only (vocabulary,
        tf-idf fit, ...). Must be picklable; it is saved in checkpoints and registered models."""
        return {}

    @classmethod
    def pixels_field(cls, cfg: Config) -> str | None:
        """The config field that makes this run decode images, or None when it reads only
        precomputed features. :func:`~xray_match.driver.prepare.prepare_info` refuses such a run on
        shards converted without pixels (manifest ``info.convert.pixels`` false) before any worker
        starts. Every recipe but those with a precomputed-feature option reads pixels."""
        return "model.name"

    @classmethod
    def saliency_field(cls, cfg: Config) -> str | None:
        """The config field that makes this run use saliency maps (gaze), or None.
        :func:`~xray_match.driver.prepare.prepare_info` refuses such a run when no source's samples
        have maps, before any worker starts; with some that have, it applies to those samples only."""
        return None

    # ---- builders --------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_loss(self) -> nn.Module:
        """``loss(outputs, batch) -> dict`` of named scalars; keys ending in ``_loss`` are summed."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | Iterable[nn.Parameter]:
        """Optimizer parameter groups (e.g. a lower lr for a pretrained backbone)."""
        return [p for p in model.parameters() if p.requires_grad]

    # ---- data ------------------------------------------------------------------------------
    def transform(self, train: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Decoded Sample -> item dict. Runs inside DataLoader worker processes: picklable."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return torch.utils.data.default_collate(items)

    # ---- steps -----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(batch)

    def embed(self, model: nn.Module, chunk: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The outputs that carry the gradient, for a chunk of the batch (gradient caching): one row
        per item or caption, so that the chunks' rows concatenate to the whole batch's."""
        return self.forward(model, chunk)

    def embed_once(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Outputs the loss needs beyond :meth:`embed`'s, computed once per step over the whole batch
        without gradient (gradient caching; e.g. momentum keys)."""
        return {}

    def after_step(self, model: nn.Module, loss_module: nn.Module, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        """Called after each optimizer step (momentum encoders, queues)."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext) -> dict[str, float]:
        """Metrics over the whole split. ``batches`` yields this rank's part (each sample exactly
        once across ranks); gather with ``ctx``; return the same dict on every rank."""
        raise NotImplementedError

    # ---- inference (registry lookups) -----------------------------------------------------
    def inference(self, model: nn.Module) -> Any:
        """An object with the method's inference API (e.g. a :class:`RetrievalInference`)."""
        return model


class RetrievalInference:
    """A loaded image-text model with its preprocessing. Subclasses set ``model`` (in eval mode),
    ``transform`` and ``device`` and give ``encode_texts``; ``encode_images`` here runs each PIL
    image through ``transform.image`` and ``model.encode_image``; ``score`` is overridden where
    similarity is not the dot product of one embedding per image and per text (cross-attention).
    Ranking is written here once."""

    model: nn.Module
    transform: Any
    device: torch.device

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """(N, D) embeddings of PIL images."""
        x = torch.stack([self.transform.image({"image": im.convert("RGB")}) for im in images]).to(self.device)
        return self.model.encode_image(x).float().cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: list, texts: list[str]) -> torch.Tensor:
        """(N_images, N_texts) similarities."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def rank_images(self, text: str, images: list) -> list[tuple[int, float]]:
        """``(index, score)`` of every image, best match of ``text`` first."""
        return _ranked(self.score(images, [text])[:, 0])

    def rank_texts(self, image, texts: list[str]) -> list[tuple[int, float]]:
        """``(index, score)`` of every text, best match of ``image`` first."""
        return _ranked(self.score([image], texts)[0])


def _ranked(s: torch.Tensor) -> list[tuple[int, float]]:
    return [(int(i), float(s[i])) for i in s.argsort(descending=True)]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch

