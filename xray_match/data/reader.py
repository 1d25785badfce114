"""Streaming shards into training and evaluation.

Inside each Ray Train worker the reader streams only that rank's shards, and inside a
DataLoader only that worker's part of them (shards ``[rank::world][worker::workers]``; with
fewer shards than readers, samples are split round-robin instead). Training streams are endless:
each pass reshuffles the shard order, a seeded buffer shuffles samples, and the loop takes a
fixed number of steps per epoch. Evaluation streams visit every sample exactly once across all
ranks and workers, in a fixed order.

A training stream is a function of (seed, epoch, reader slot) alone, and so is every sample's
augmentation: the transform's random draws (a caption picked, a flip) are seeded from the sample's
position in its reader's stream (:func:`sample_seed`), not from whichever process or worker
happens to run it. Each training item carries its position (``"_pos"``: reader slot, raw items
that reader has taken so far) and its shard key (``"_key"``), which the collate moves onto the
batch. A checkpoint stores the positions the loop has consumed; ``start`` positions make a new
stream skip exactly those raw items (read, not decoded), so a run resumed in the middle of an
epoch sees the samples it would have seen: none repeated, none skipped.

Several shard folders read as one stream (``data.sources``): each source is split over ranks and
workers, shuffled and cycled on its own, exactly as a lone folder is, and each next raw item's source
is drawn by weight from a generator seeded like the others by (seed, epoch, reader slot), ahead of
the one shuffle buffer. A small source simply comes round more often: the proportions hold at any
length (no epoch skew), and a reader's position still counts raw items of the mixed stream, so a
resume replays the draws while it skips. Every item of a mixed stream carries its ``"source"``
name, which the collate moves onto the batch as a list.

Corrupt input raises :class:`ShardFormatError` naming shard and key. With ``skip_corrupt`` the
sample is dropped instead, and the count rides on the next good item as ``"_skipped"`` (so it
survives DataLoader worker processes) for the loop to sum and report.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
from xray_match.data.io import open_url


def shard_urls(root: str, split: str, manifest: Manifest | None = None) -> list[str]:
    manifest = manifest or read_manifest(root)
    return [join(root, s.name) for s in manifest.shards(split)]


@dataclass(frozen=True)
class Source:
    """One shard folder of a mixed stream: the name its samples carry, where it is, its share
    (relative; the weights of a stream's sources are normalised)."""

    name: str
    root: str
    weight: float = 1.0


def has_saliency(root: str, split: str, manifest: Manifest | None = None) -> bool:
    """Whether a folder's samples carry saliency maps, from the first sample of ``split`` (a
    converter writes a map for every sample or for none: SALICON and the digit scenes have them,
    COCO and Flickr30k do not)."""
    for url in shard_urls(root, split, manifest):
        for raw in iter_raw(url):
            return "saliency.png" in raw
    return False


def iter_raw(url: str, positions: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard (local or fsspec URL):
    consecutive files grouped by key as WebDataset groups them (the key is the path up to the file
    name's first dot, the extension after it, lower-cased). With ``positions`` a sample also has
    ``"__positions__"``: ``{ext: (offset, size)}``, where each file's bytes lie in the tar (so one
    ranged read fetches a file later, as the search service does for images)."""
    last = "(start of shard)"
    try:
        with open_url(url, "rb") as fh:
            sample: dict[str, Any] = {}
            for name, offset, data in _tar_files(fh):
                key, ext = tariterators.base_plus_ext(name)
                if key is not None and not _TAR_META.match(name):
                    ext = ext.lower()
                    if sample and key != sample["__key__"]:
                        last = sample["__key__"]
                        yield sample
                        sample = {}
                    if not sample:
                        sample = {"__key__": key, "__url__": url}
                    if ext in sample:
                        raise ShardFormatError(f"{sample_where(sample)}: two .{ext} files")
                    sample[ext] = data
                    if positions:
                        sample.setdefault("__positions__", {})[ext] = (offset, len(data))
            if sample:
                last = sample["__key__"]
                yield sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{url}: unreadable tar after key {last!r} ({type(e).__name__}: {e})") from e


#: tar members that are not sample files (WebDataset's ``__key__``-style metadata)
_TAR_META = re.compile(r"__[^/]*__($|/)")

_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files


def _tar_files(fh: Any) -> Iterator[tuple[str, int, bytes]]:
    """``(name, offset of its data, data)`` of each regular file of a tar stream, in order.

    A reader of the POSIX formats that ``tarfile`` writes (ustar, with pax and GNU long-name
    headers), for one forward pass: ``tarfile`` itself spends more time on each header than the
    decoder spends on a small image (WebDataset's writer puts a pax header before every file).
    Headers are checked by their checksum; a bad one raises :class:`tarfile.HeaderError`, a stream
    that ends inside a header or a file :class:`EOFError`."""
    pos = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = fh.read(_BLOCK)
        if not header or header == bytes(_BLOCK):
            return  # end of archive (two zero blocks, or none where a writer left them out)
        if len(header) < _BLOCK:
            raise EOFError("unexpected end of data")
        stored = _number(header[148:156])
        if stored != 256 + sum(header[:148]) + sum(header[156:]):
            raise tarfile.HeaderError(f"bad checksum at offset {pos}")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        pos += _BLOCK
        data = fh.read(size)
        if len(data) < size:
            raise EOFError("unexpected end of data")
        padding = -size % _BLOCK
        if padding and len(fh.read(padding)) < padding:
            raise EOFError("unexpected end of data")
        offset, pos = pos, pos + size + padding
        if kind == b"x":  # pax extended header of the next member: "<len> <key>=<value>\n" records
            pax = _pax_records(data)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind in (b"g", b"K"):  # pax global header, GNU long link name: nothing for a file
            continue
        name = pax.get("path") or long_name or _ustar_name(header)
        pax, long_name = {}, None
        if kind in _REGULAR:
            yield name, offset, data


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when its first byte has the high bit set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") - (1 << (8 * len(field) - 8) if field[0] & 0x40 else 0)
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            return f"{prefix}/{name}"
    return name


def _pax_records(data: bytes) -> dict[str, str]:
    out, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


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
    """This rank's (and DataLoader worker's) part of a split, decoded and transformed.

    ``urls``: one folder's shards, or ``{source name: its shards}`` for a mixed stream, whose
    training items come from each source in proportion to ``weights`` (equal when not given) and
    whose evaluation items visit every source's samples once, source after source."""

    def __init__(
        self,
        urls: list[str] | Mapping[str, list[str]],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        skip_corrupt: bool = False,
        start: dict[int, int] | None = None,
        weights: Sequence[float] | None = None,
    ):
        # (source name, its shards); one unnamed part for a lone folder, whose items carry no name
        self.parts: list[tuple[str | None, list[str]]] = (
            [(name, list(u)) for name, u in urls.items()] if isinstance(urls, Mapping) else [(None, list(urls))])
        for name, part in self.parts:
            if not part:
                raise ShardFormatError("no shards to read" + (f" in source {name!r}" if name else ""))
        weights = list(weights) if weights is not None else [1.0] * len(self.parts)
        if len(weights) != len(self.parts) or not all(w > 0 for w in weights):
            raise ValueError(f"weights {weights}: one positive weight per source ({len(self.parts)})")
        self.weights = [w / sum(weights) for w in weights]
        self.urls = [u for _, part in self.parts for u in part]
        self._shard_index = {u: i for _, part in self.parts for i, u in enumerate(part)}
        self.transform = transform
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch = seed, epoch
        self.skip_corrupt = skip_corrupt
        self.start = dict(start or {})

    def _reader_slot(self) -> tuple[int, int]:
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _plan(self, urls: list[str]) -> tuple[list[str], int, int]:
        """(shards to open, sample stride, sample offset) of one source for this reader."""
        slot, slots = self._reader_slot()
        if len(urls) >= slots:
            # rank-major, then worker: shards[rank::world][worker::workers]
            wi = get_worker_info()
            wid, nw = (wi.id, wi.num_workers) if wi else (0, 1)
            return urls[self.rank :: self.world_size][wid::nw], 1, 0
        return urls, slots, slot  # too few shards: round-robin over samples

    def _samples(self, urls: list[str], stride: int, offset: int, name: str | None,
                 owned: bool = False) -> Iterator[dict[str, Any]]:
        """The samples of ``urls`` at ``offset`` modulo ``stride``: counted across the shards in the
        order given (evaluation), or, ``owned``, from each shard's own index in its source, so that
        whichever order a reader's pass takes its shards in, it reads the same samples and no other
        reader does (training readers shuffle the order each with its own generator)."""
        n = 0
        for url in urls:
            if owned:
                n = self._shard_index[url]
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
                    if name is not None:
                        raw["__source__"] = name
                    yield raw
                n += 1

    def _endless(self, name: str | None, urls: list[str], slot: int) -> Iterator[dict[str, Any]]:
        """One source's training stream: its shards reshuffled at each pass, for ever."""
        urls, stride, offset = self._plan(urls)
        rng = seeded_rng(self.seed, self.epoch, slot, "shards", *([name] if name is not None else []))
        while True:  # endless: the loop decides how many steps make an epoch
            order = urls[:]
            rng.shuffle(order)
            produced = False
            for raw in self._samples(order, stride, offset, name, owned=True):
                produced = True
                yield raw
            if not produced:
                of = f" of source {name!r}" if name is not None else ""
                raise ShardFormatError(f"reader {slot}: its shards{of} yielded no samples")

    def _stream(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._reader_slot()
        if not self.train:
            for name, urls in self.parts:
                yield from self._samples(*self._plan(urls), name)
            return
        streams = [self._endless(name, urls, slot) for name, urls in self.parts]
        if len(streams) == 1:
            yield from streams[0]
            return
        # each next item's source by weight, from a generator of (seed, epoch, slot) alone: a resume
        # that skips n items replays the same n draws
        rng = seeded_rng(self.seed, self.epoch, slot, "mix")
        which, cum = range(len(streams)), list(itertools.accumulate(self.weights))
        while True:
            yield next(streams[rng.choices(which, cum_weights=cum)[0]])

    def raw(self) -> Iterator[dict[str, Any]]:
        """This reader's raw items (``{"__key__", ext: bytes, ...}``, a mixed stream's with
        ``"__source__"``) in the order it decodes them, shuffle buffer included, from the start."""
        slot, _ = self._reader_slot()
        source = self._stream()
        if self.train and self.shuffle_buffer > 1:
            source = _buffer_shuffle(source, self.shuffle_buffer, seeded_rng(self.seed, self.epoch, slot, "buffer"))
        return source

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._reader_slot()
        source = self.raw()
        pos = self.start.get(slot, 0) if self.train else 0
        for _ in range(pos):  # resume: the raw items this reader already gave out (read, not decoded)
            next(source)
        skipped = 0
        parts = getattr(self.transform, "parts", ALL_PARTS) if self.transform is not None else ALL_PARTS
        for raw in source:
            pos += 1
            try:
                if "_error" in raw:
                    raise ShardFormatError(raw["_error"])
                sample = decode_sample(raw, parts)
            except ShardFormatError:
                if not self.skip_corrupt:
                    raise
                skipped += 1
                continue
            if not self.transform:
                item = sample
            elif self.train:
                with _seeded(sample_seed(self.seed, self.epoch, slot, pos)):
                    item = self.transform(sample)
            else:
                item = self.transform(sample)
            if skipped:
                item["_skipped"] = skipped
                skipped = 0
            if "__source__" in raw:
                item["source"] = raw["__source__"]
            if self.train:
                item["_pos"], item["_key"] = (slot, pos), raw["__key__"]
            yield item


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed that is a function of ``parts`` alone (the same in every process)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _seeded:
    """Seed python's, numpy's and torch's global generators for one transform call. In a DataLoader
    worker they belong to the worker; in the main process (``num_workers=0``) their states are put
    back afterwards, so the model's own random draws do not depend on the data."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = None if get_worker_info() else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            random.setstate(self.saved[0])
            np.random.set_state(self.saved[1])
            torch.set_rng_state(self.saved[2])


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
    root: str | Sequence[Source],
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
    start: dict[int, int] | None = None,
    taken: int = 0,
) -> Iterable[Any]:
    """A DataLoader over this rank's part of ``split`` of the folder ``root``, or of several
    :class:`Source` folders mixed into one stream. Training batches are full (drop_last).

    Resuming a training stream where a checkpoint left it: ``start`` (reader slot -> raw items
    already taken, from :func:`batch_positions`) and ``taken``, the batches this rank had taken. The
    DataLoader hands out its workers' batches in turn from worker 0; after ``taken`` batches the
    next one is worker ``taken % workers``'s, so the stream is rotated to start there."""
    if isinstance(root, str):
        urls: list[str] | dict[str, list[str]] = shard_urls(root, split, manifest)
        weights = None
    else:
        urls = {s.name: shard_urls(s.root, split) for s in root}
        weights = [s.weight for s in root]
    ds = ShardStream(
        urls, transform, train=train, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
        seed=seed, epoch=epoch, skip_corrupt=skip_corrupt, start=start, weights=weights,
    )
    workers = loader_workers(len(ds.urls), world_size, num_workers)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_CountingCollate(collate),
        drop_last=train,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers else None,
        # its own generator: starting an iterator draws a worker base seed, which must not move the
        # global RNG the model draws from (a resumed run starts its loader at another moment)
        generator=torch.Generator().manual_seed(seed),
    )
    if train and workers > 1 and taken % workers:
        return _Rotated(loader, workers, taken % workers)
    return loader


def loader_workers(n_shards: int, world_size: int, num_workers: int) -> int:
    """DataLoader workers per rank: more than the rank's shards would idle (webdataset#392). A mixed
    stream counts the shards of all its sources (a source with fewer shards than readers is split
    by sample instead)."""
    return min(num_workers, max(1, n_shards // world_size))


def batch_positions(batch: Any) -> dict[int, int]:
    """``{reader slot: raw items taken}`` after a training batch (empty for other batches)."""
    return dict(batch.get("_pos", {})) if isinstance(batch, dict) else {}


def take_bookkeeping(batch: Any) -> tuple[int, dict[int, int], list[str]]:
    """Remove what :class:`_CountingCollate` put on a batch, before the model sees it: (corrupt
    samples skipped, ``{reader slot: raw items taken}``, shard keys); zeros for other batches."""
    if not isinstance(batch, dict):
        return 0, {}, []
    return int(batch.pop("_skipped", 0)), batch.pop("_pos", {}), batch.pop("_keys", [])


class _Rotated:
    """A training DataLoader's batches in worker order ``first, first + 1, ...`` (mod ``workers``)
    instead of ``0, 1, ...``: each batch's reader slot names its worker; at most ``workers - 1``
    batches wait."""

    def __init__(self, loader: DataLoader, workers: int, first: int):
        self.loader, self.workers, self.first = loader, workers, first

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        waiting: dict[int, list[Any]] = {w: [] for w in range(self.workers)}
        w = self.first
        while True:
            while not waiting[w]:
                batch = next(it)
                slot = next(iter(batch_positions(batch)))
                waiting[slot % self.workers].append(batch)  # slot = rank * workers + worker
            yield waiting[w].pop(0)
            w = (w + 1) % self.workers


class _CountingCollate:
    """Moves the items' bookkeeping onto the batch (dict batches) before collating: the
    ``_skipped`` counters summed, the reader positions as ``{slot: furthest position}`` and the
    shard keys as a list (``_pos``, ``_keys``; training items only), and a mixed stream's source
    names as the list ``source``."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any] | None):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        skipped, pos, keys, sources = 0, {}, [], []
        for it in items:
            if isinstance(it, dict):
                skipped += int(it.pop("_skipped", 0))
                if "_pos" in it:
                    slot, n = it.pop("_pos")
                    pos[slot] = max(n, pos.get(slot, 0))
                    keys.append(it.pop("_key"))
                if self.collate and "source" in it:  # without a collate the items keep theirs
                    sources.append(it.pop("source"))
        batch = self.collate(items) if self.collate else items
        if isinstance(batch, dict):
            batch["_skipped"] = skipped
            if pos:
                batch["_pos"], batch["_keys"] = pos, keys
            if sources:
                batch["source"] = sources
        return batch
