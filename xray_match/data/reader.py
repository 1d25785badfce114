"""Streaming shards into training and evaluation.

Inside each Ray Train worker the reader streams only that rank's shards, and inside a
DataLoader only that worker's part of them (shards ``[rank::world][worker::workers]``; with
fewer shards than readers, samples are split round-robin instead). Training streams are endless:
each pass reshuffles the shard order, a seeded buffer shuffles samples, and the loop takes a
fixed number of steps per epoch. Evaluation streams visit every sample exactly once across all
ranks and workers, in a fixed order.

Corrupt input raises :class:`ShardFormatError` naming shard and key. With ``skip_corrupt`` the
sample is dropped instead, and the count rides on the next good item as ``"_skipped"`` (so it
survives DataLoader worker processes) for the loop to sum and report.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from xray_match.data.format import (
    Manifest,
    ShardFormatError,
    check_meta,
    image_key,
    join,
    read_manifest,
    sample_where,
)


def shard_urls(root: str, split: str, manifest: Manifest | None = None) -> list[str]:
    manifest = manifest or read_manifest(root)
    return [join(root, s.name) for s in manifest.shards(split)]


def iter_raw(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard (local or fsspec URL)."""
    last = "(start of shard)"
    try:
        with fsspec.open(url, "rb") as fh:
            files = tariterators.tar_file_expander([{"url": url, "stream": fh}])
            for sample in tariterators.group_by_keys(files):
                last = sample.get("__key__", last)
                yield sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{url}: unreadable tar after key {last!r} ({type(e).__name__}: {e})") from e


ALL_PARTS = frozenset({"saliency", "regions", "region_boxes"})


def decode_sample(raw: dict[str, Any], parts: frozenset[str] | set[str] = ALL_PARTS) -> dict[str, Any]:
    """Raw tar sample -> Sample dict (see :mod:`xray_match.train.recipe`); errors name shard + key.

    The image and json are always decoded and checked; the optional ``parts`` only when asked for
    (a transform declares what it reads in a ``parts`` attribute), so that e.g. a saliency map is
    not decoded for a model that never looks at it.
    """
    where = sample_where(raw)
    ext = image_key(raw)
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Exception as e:
        raise ShardFormatError(f"{where}: undecodable image .{ext} ({e})") from None
    meta = parse_meta(raw)
    check_meta(meta, where, width=image.width, height=image.height)
    saliency = None
    if "saliency" in parts and "saliency.png" in raw:
        try:
            saliency = Image.open(io.BytesIO(raw["saliency.png"]))
            saliency.load()
            saliency = saliency.convert("L")
        except Exception as e:
            raise ShardFormatError(f"{where}: undecodable saliency.png ({e})") from None
        if saliency.size != image.size:
            raise ShardFormatError(f"{where}: saliency.png is {saliency.size}, image is {image.size}")
    regions = _npy(raw, "regions.npy", where) if "regions" in parts else None
    region_boxes = _npy(raw, "boxes.npy", where) if "region_boxes" in parts else None
    return {
        "key": raw["__key__"], "url": raw.get("__url__", ""), "image": image, "meta": meta,
        "saliency": saliency, "regions": regions, "region_boxes": region_boxes,
    }


def parse_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's ``json``, parsed (not yet checked); errors name shard and key."""
    if "json" not in raw:
        raise ShardFormatError(f"{sample_where(raw)}: no .json metadata")
    try:
        return json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{sample_where(raw)}: .json is not valid JSON ({e})") from None


def iter_meta(root: str, split: str, limit: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, json)`` of a split's samples without decoding images (driver-side fitting such as
    vocabularies and tf-idf, which must see the train split only)."""
    n = 0
    for url in shard_urls(root, split):
        for raw in iter_raw(url):
            yield raw["__key__"], parse_meta(raw)
            n += 1
            if limit and n >= limit:
                return


def _npy(raw: dict[str, Any], ext: str, where: str) -> np.ndarray | None:
    if ext not in raw:
        return None
    try:
        return np.load(io.BytesIO(raw[ext]), allow_pickle=False)
    except Exception as e:
        raise ShardFormatError(f"{where}: undecodable {ext} ({e})") from None


class ShardStream(IterableDataset):
    """This rank's (and DataLoader worker's) part of a split, decoded and transformed."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        skip_corrupt: bool = False,
    ):
        if not urls:
            raise ShardFormatError("no shards to read")
        self.urls = list(urls)
        self.transform = transform
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch = seed, epoch
        self.skip_corrupt = skip_corrupt

    def _reader_slot(self) -> tuple[int, int]:
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _plan(self) -> tuple[list[str], int, int]:
        """(shards to open, sample stride, sample offset) for this reader."""
        slot, slots = self._reader_slot()
        if len(self.urls) >= slots:
            # rank-major, then worker: shards[rank::world][worker::workers]
            wi = get_worker_info()
            wid, nw = (wi.id, wi.num_workers) if wi else (0, 1)
            return self.urls[self.rank :: self.world_size][wid::nw], 1, 0
        return self.urls, slots, slot  # too few shards: round-robin over samples

    def _samples(self, urls: list[str], stride: int, offset: int) -> Iterator[dict[str, Any]]:
        n = 0
        for url in urls:
            it = iter_raw(url)
            while True:
                try:
                    raw = next(it)
                except StopIteration:
                    break
                except ShardFormatError as e:
                    if not self.skip_corrupt:
                        raise
                    yield {"_error": str(e)}
                    break
                if n % stride == offset:
                    yield raw
                n += 1

    def _stream(self) -> Iterator[dict[str, Any]]:
        urls, stride, offset = self._plan()
        slot, _ = self._reader_slot()
        if not self.train:
            yield from self._samples(urls, stride, offset)
            return
        rng = seeded_rng(self.seed, self.epoch, slot, "shards")
        while True:  # endless: the loop decides how many steps make an epoch
            order = urls[:]
            rng.shuffle(order)
            produced = False
            for raw in self._samples(order, stride, offset):
                produced = True
                yield raw
            if not produced:
                raise ShardFormatError(f"reader {slot}: its shards yielded no samples")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._reader_slot()
        rng = seeded_rng(self.seed, self.epoch, slot, "buffer")
        source = self._stream()
        if self.train and self.shuffle_buffer > 1:
            source = _buffer_shuffle(source, self.shuffle_buffer, rng)
        skipped = 0
        parts = getattr(self.transform, "parts", ALL_PARTS) if self.transform is not None else ALL_PARTS
        for raw in source:
            try:
                if "_error" in raw:
                    raise ShardFormatError(raw["_error"])
                sample = decode_sample(raw, parts)
            except ShardFormatError:
                if not self.skip_corrupt:
                    raise
                skipped += 1
                continue
            item = self.transform(sample) if self.transform else sample
            if skipped:
                item["_skipped"] = skipped
                skipped = 0
            yield item


def seeded_rng(*parts: Any) -> random.Random:
    """A generator that is a function of ``parts`` alone. ``random.Random`` seeds a ``str`` through
    SHA-512, the same in every process; ``hash()`` of a tuple holding a string changes with each
    process's PYTHONHASHSEED, so two runs with one seed would see different orders."""
    return random.Random(":".join(str(p) for p in parts))


def _buffer_shuffle(source: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    buf: list[dict[str, Any]] = []
    for x in source:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def make_loader(
    root: str,
    split: str,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
    collate: Callable[[list[dict[str, Any]]], Any] | None,
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    skip_corrupt: bool = False,
    manifest: Manifest | None = None,
) -> DataLoader:
    """A DataLoader over this rank's part of ``split``. Training batches are full (drop_last)."""
    urls = shard_urls(root, split, manifest)
    ds = ShardStream(
        urls, transform, train=train, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
        seed=seed, epoch=epoch, skip_corrupt=skip_corrupt,
    )
    # more DataLoader workers than shards per rank would idle (webdataset#392)
    per_rank = max(1, len(urls) // world_size)
    workers = min(num_workers, per_rank)
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_CountingCollate(collate),
        drop_last=train,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers else None,
    )


class _CountingCollate:
    """Moves the items' ``_skipped`` counters onto the batch (dict batches) before collating."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any] | None):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        skipped = sum(int(it.pop("_skipped", 0)) for it in items if isinstance(it, dict))
        batch = self.collate(items) if self.collate else items
        if isinstance(batch, dict):
            batch["_skipped"] = skipped
        return batch
