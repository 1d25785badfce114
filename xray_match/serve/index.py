"""The search index of a shard folder: built with Ray Data, stored as faiss indexes plus JSON ids.

Building (:func:`build_index`): one Ray Data read task per shard lists its samples with the byte
offset of each image inside the tar (so the service can serve the image later with one ranged
read), ``map_batches`` runs a pool of model actors that embed every image and every caption, and
the driver collects the vectors in a fixed order (split, key) and writes the folder.

A folder (format version 1)::

    index.json       model (uri, name, version), dim, faiss kind and parameters, counts, data root
    images.faiss     faiss index of image vectors, row i = images.json row i
    images.json      columns key / split / shard / offset / size / ext of every image
    captions.faiss   faiss index of caption vectors, row j = captions.json row j
    captions.json    columns text / image (row of the caption's image in images.json)

Nothing is pickled: faiss's own format and JSON. A local folder is written under a hidden
temporary name and renamed into place, so a reader sees the old index or the whole new one.

An object store cannot rename a folder, and a reader that copies five objects one by one could
copy some of an old index and some of a new one if they were overwritten in place. There the
index is written as a *version* that is never changed afterwards, and published by one small
pointer object, written last; one PUT replaces an object whole, so a reader sees the old pointer
or the new one, and either names a version all of whose objects are in place::

    URL/current.json         {"format_version": 1, "version": "v-20261206T101500-1a2b3c4d"}
    URL/v-.../index.json, images.faiss, images.json, captions.faiss, captions.json

A writer killed before the pointer leaves an unpublished version that no reader opens; the next
write deletes it (and every version but the new one and the one it replaces, which a reader that
read the old pointer a moment ago may still be copying). Readers load a local copy of the
version the pointer names (:func:`fetch`, cached by URL and version).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from xray_match.data.format import join
from xray_match.data.io import atomic_write_bytes, filesystem, local_path, open_url
from xray_match.serve.config import IndexConfig
from xray_match.serve.model import INDEX_TAG
from xray_match.tracking.models import ModelRef

FORMAT_VERSION = 1
META = "index.json"
#: on an object store: the pointer to the published version (written last, see the module doc)
CURRENT = "current.json"
IMAGE_COLUMNS = ("key", "split", "shard", "offset", "size", "ext")
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}


class IndexFormatError(ValueError):
    """An index folder that is missing, from another format version, or inconsistent."""


def check_built_for(ref: ModelRef, meta: dict[str, Any], where: str) -> None:
    """The one check that an index (its ``index.json`` content ``meta``, at ``where``) was built for
    the pinned version ``ref``: an index of another version of the same registered model is refused.
    An index of a checkpoint, or of another model, is not checked (the dimensions still are)."""
    built_for = meta.get("model") or {}
    if ref.registered and built_for.get("name") == ref.name and str(built_for.get("version")) != str(ref.version):
        raise IndexFormatError(f"{where}: built for {ref.name} version {built_for.get('version')}, "
                               f"not version {ref.version}")


# ----------------------------------------------------------------------------- reading shards


def _split_name(name: str) -> tuple[str, str]:
    """A tar member name -> (sample key, extension), as webdataset groups files."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One shard -> one row per sample: its image bytes and json with where the image lies in the tar.

    ``row``: ``{"root", "shard", "split"}``. Errors name shard and key.
    """
    from xray_match.data.format import IMAGE_EXTS

    url = join(row["root"], row["shard"])
    current: dict[str, Any] = {}

    def finish(sample: dict[str, Any]) -> dict[str, Any] | None:
        if not sample:
            return None
        where = f"{url}: key {sample['key']!r}"
        if "json" not in sample:
            raise IndexFormatError(f"{where}: no .json metadata")
        if "image" not in sample:
            raise IndexFormatError(f"{where}: no image (.{' / .'.join(IMAGE_EXTS)})")
        return sample

    try:
        with open_url(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if current and key != current["key"]:
                    yield finish(current)
                    current = {}
                if not current:
                    current = {"key": key, "split": row["split"], "shard": row["shard"]}
                if ext in IMAGE_EXTS:
                    current |= {"image": tar.extractfile(member).read(), "ext": ext,
                                "offset": int(member.offset_data), "size": int(member.size)}
                elif ext == "json":
                    current["json"] = tar.extractfile(member).read()
            last = finish(current)
            if last:
                yield last
    except tarfile.TarError as e:
        raise IndexFormatError(f"{url}: unreadable tar after key {current.get('key', '(start)')!r} ({e})") from e


class ShardEmbedder:
    """``map_batches`` actor: loads the model once, then embeds a batch of samples' images and
    captions. Out: one row per image (``kind`` "image") and one per caption (``kind`` "caption")."""

    def __init__(self, ref: ModelRef, threads: int = 1):
        import torch

        from xray_match.serve.model import load_embedder

        torch.set_num_threads(threads)  # the actor's CPU share, not every core of the node
        self.model = load_embedder(ref)  # the version the driver pinned, not the alias again

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from xray_match.data.reader import decode_sample

        images, captions, rows = [], [], []
        for i in range(len(batch["key"])):
            raw = {"__key__": str(batch["key"][i]), "__url__": str(batch["shard"][i]),
                   str(batch["ext"][i]): bytes(batch["image"][i]), "json": bytes(batch["json"][i])}
            sample = decode_sample(raw, parts=frozenset())  # checks image and json, errors name shard + key
            images.append(sample["image"])
            for j, text in enumerate(sample["meta"]["captions"]):
                captions.append(text)
                rows.append((i, j))
        from xray_match.serve.model import embed_images, embed_texts

        img = embed_images(self.model, images)
        txt = embed_texts(self.model, captions) if captions else np.zeros((0, img.shape[1]), np.float32)
        n, m = len(images), len(captions)
        pick = lambda col: np.concatenate([batch[col], batch[col][[i for i, _ in rows]]])  # noqa: E731
        return {
            "kind": np.array(["image"] * n + ["caption"] * m),
            "key": pick("key"), "split": pick("split"), "shard": pick("shard"),
            "offset": pick("offset").astype(np.int64), "size": pick("size").astype(np.int64), "ext": pick("ext"),
            "text": np.array([""] * n + captions, dtype=object),
            "caption_index": np.array([-1] * n + [j for _, j in rows], dtype=np.int64),
            "emb": np.concatenate([img, txt]).astype(np.float32),
        }


# ----------------------------------------------------------------------------- faiss


def make_faiss(vectors: np.ndarray, cfg: IndexConfig):
    """A faiss index over ``vectors`` (N, D) scoring by inner product, of ``cfg.kind``."""
    import faiss

    n, d = vectors.shape
    if cfg.kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == "ivf":
        nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    index.add(vectors)
    return index


def _search_params(index, meta: dict[str, Any]) -> None:
    import faiss

    p = meta.get("params", {})
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = int(p.get("nprobe", 16))
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(p.get("ef_search", 64))


# ----------------------------------------------------------------------------- the folder


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_index(out: str, image_vectors: np.ndarray, images: dict[str, list], caption_vectors: np.ndarray,
                captions: dict[str, list], meta: dict[str, Any], cfg: IndexConfig | None = None) -> str:
    """Write an index folder atomically (a local folder, or a published version on an object
    store); ``images`` / ``captions`` are the JSON columns. Returns ``out``."""
    import faiss

    cfg = cfg or IndexConfig()
    if local_path(out) is None:  # object store: written locally, then published as a new version
        import tempfile

        with tempfile.TemporaryDirectory(prefix="xray-index-") as d:
            local = write_index(os.path.join(d, "index"), image_vectors, images, caption_vectors, captions, meta, cfg)
            publish(local, out)
        return out
    out = os.path.abspath(local_path(out))
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, META)))):
        raise IndexFormatError(f"{out}: exists and is not an index folder (no {META}); refusing to replace it")
    n, m = len(image_vectors), len(caption_vectors)
    if any(len(images[c]) != n for c in IMAGE_COLUMNS):
        raise IndexFormatError(f"{out}: images.json columns do not all have {n} rows")
    if len(captions["text"]) != m or len(captions["image"]) != m:
        raise IndexFormatError(f"{out}: captions.json columns do not all have {m} rows")
    dim = int(image_vectors.shape[1])
    meta = {"format_version": FORMAT_VERSION, "dim": dim, "kind": cfg.kind, "images": n, "captions": m,
            "params": {"nprobe": cfg.nprobe, "ef_search": cfg.ef_search},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")} | meta
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        faiss.write_index(make_faiss(np.ascontiguousarray(image_vectors, np.float32), cfg), os.path.join(tmp, "images.faiss"))
        faiss.write_index(make_faiss(np.ascontiguousarray(caption_vectors, np.float32).reshape(m, dim), cfg),
                          os.path.join(tmp, "captions.faiss"))
        _write_json(os.path.join(tmp, "images.json"), {c: list(images[c]) for c in IMAGE_COLUMNS})
        _write_json(os.path.join(tmp, "captions.json"), {"text": list(captions["text"]), "image": [int(i) for i in captions["image"]]})
        _write_json(os.path.join(tmp, META), meta)  # last: a folder with index.json is complete
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return out


INDEX_FILES = ("images.faiss", "images.json", "captions.faiss", "captions.json")


def _version_name() -> str:
    """A new version's name: sorts by creation time, unique across writers."""
    return f"v-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _pointer(url: str) -> str | None:
    """The version ``URL/current.json`` names, or None when there is no pointer."""
    try:
        with open_url(join(url, CURRENT), "r") as fh:
            body = json.load(fh)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{join(url, CURRENT)}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format_version") != FORMAT_VERSION or not isinstance(body.get("version"), str):
        raise IndexFormatError(f"{join(url, CURRENT)}: not an index pointer of format_version {FORMAT_VERSION} ({body!r})")
    return body["version"]


def publish(local: str, url: str) -> str:
    """Upload the index folder ``local`` to the object store prefix ``url`` as a new version, then
    point ``URL/current.json`` at it (the module doc says why this order makes readers safe).
    Returns the version. A prefix that holds objects but no pointer is not an index: refused."""
    fs, root = filesystem(url)
    previous = _pointer(url)
    if previous is None and fs.exists(root) and fs.ls(root, detail=False):
        raise IndexFormatError(f"{url}: exists and is not an index (no {CURRENT}); refusing to write into it")
    version = _version_name()
    for name in (*INDEX_FILES, META):  # each object appears whole on its upload
        fs.put_file(os.path.join(local, name), f"{root.rstrip('/')}/{version}/{name}")
    atomic_write_bytes(join(url, CURRENT), json.dumps({"format_version": FORMAT_VERSION, "version": version}).encode())
    # versions no pointer names any more, and unpublished ones of killed writers; the one just
    # replaced stays for readers that read the old pointer a moment ago
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("v-") and name not in (version, previous):
            fs.rm(entry, recursive=True)
    return version


def version_url(url: str) -> str:
    """The published version of the index at the object store prefix ``url``."""
    version = _pointer(url)
    if version is None:
        raise IndexFormatError(f"{url}: no {CURRENT} (not an index, or its first upload has not finished; "
                               f"build one with `xray-match index`)")
    return join(url, version)


def read_meta(path: str) -> dict[str, Any]:
    """The ``index.json`` of an index folder or object store index, without loading the index."""
    meta_path = os.path.join(local_path(path), META) if local_path(path) is not None else join(version_url(path), META)
    try:
        with open_url(meta_path, "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: no {META} (not an index folder; build one with `xray-match index`)") from None


def fetch(url: str, cache: str | None = None) -> str:
    """An index on an object store (``s3://...``) -> a local copy of its published version (cached
    by URL and version: a version never changes)."""
    import hashlib

    from xray_match.config import xray_home

    source = version_url(url)
    local = os.path.join(cache or str(xray_home() / "index-cache"), hashlib.sha256(source.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(local, META)):
        return local
    fs, root = filesystem(source)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for name in (*INDEX_FILES, META):
            fs.get_file(f"{root.rstrip('/')}/{name}", os.path.join(tmp, name))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never a partial copy in the cache
        if isinstance(e, FileNotFoundError):
            raise IndexFormatError(f"{source}: an object of this version is gone (replaced twice while being "
                                   f"read?); load {url} again") from None
        raise
    try:
        os.rename(tmp, local)
    except OSError:  # another replica fetched it first
        shutil.rmtree(tmp, ignore_errors=True)
    return local


@dataclass
class SearchIndex:
    """A loaded index folder: nearest images for query vectors, nearest captions, image bytes."""

    path: str
    meta: dict[str, Any]
    images_index: Any
    captions_index: Any
    images: dict[str, list]
    captions: dict[str, list]

    @classmethod
    def load(cls, path: str) -> "SearchIndex":
        import faiss

        source = path
        path = local_path(path) if local_path(path) is not None else fetch(path)
        meta_path = os.path.join(path, META)
        if not os.path.isfile(meta_path):
            raise IndexFormatError(f"{path}: no {META} (not an index folder; build one with `xray-match index`)")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{meta_path}: format_version {meta.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
        with open(os.path.join(path, "images.json")) as fh:
            images = json.load(fh)
        with open(os.path.join(path, "captions.json")) as fh:
            captions = json.load(fh)
        img = faiss.read_index(os.path.join(path, "images.faiss"))
        cap = faiss.read_index(os.path.join(path, "captions.faiss"))
        for what, index, rows in (("images", img, len(images["key"])), ("captions", cap, len(captions["text"]))):
            if index.ntotal != rows or index.ntotal != meta[what]:
                raise IndexFormatError(f"{path}/{what}.faiss: {index.ntotal} vectors, {what}.json {rows} rows, "
                                       f"{META} says {meta[what]}")
            if index.d != meta["dim"]:
                raise IndexFormatError(f"{path}/{what}.faiss: dimension {index.d}, {META} says {meta['dim']}")
            _search_params(index, meta)
        return cls(source if local_path(source) is None else os.path.abspath(path), meta, img, cap, images, captions)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def _search(self, index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexFormatError(f"{self.path}: queries of shape {tuple(q.shape)} for an index of dimension {self.dim}")
        k = min(k, index.ntotal)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return index.search(q, k)

    def search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> scores (B, k), image rows (B, k), best first (-1 rows: fewer than k found)."""
        return self._search(self.images_index, queries, k)

    def search_captions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(self.captions_index, queries, k)

    def image_record(self, row: int) -> dict[str, Any]:
        return {c: self.images[c][row] for c in IMAGE_COLUMNS}

    def image_bytes(self, row: int) -> tuple[bytes, str] | None:
        """The image of ``row`` read from its shard (one ranged read), with its MIME type."""
        rec = self.image_record(row)
        if not rec["shard"] or not self.meta.get("data"):
            return None  # synthetic entries have no pixels
        with open_url(join(self.meta["data"], rec["shard"]), "rb") as fh:
            fh.seek(int(rec["offset"]))
            data = fh.read(int(rec["size"]))
        return data, MIME.get(rec["ext"], "application/octet-stream")


# ----------------------------------------------------------------------------- building


def build_index(model: str, data: str, out: str, cfg: IndexConfig | None = None, tracking_uri: str | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed every image and caption of ``data``'s splits with ``model`` and write the index to ``out``.

    Returns the index's ``index.json`` content plus ``path``. A registered model's version is tagged
    with the folder (:data:`xray_match.serve.model.INDEX_TAG`).
    """
    import ray

    from xray_match.data.format import read_manifest
    from xray_match.serve.model import tag_index
    from xray_match.tracking.models import resolve

    cfg = cfg or IndexConfig()
    ref = resolve(model, tracking_uri)  # once: the actors get this pinned version
    manifest = read_manifest(data)
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()] or sorted(manifest.splits)
    missing = [s for s in splits if s not in manifest.splits]
    if missing:
        raise IndexFormatError(f"{data}: no split {missing[0]!r} (have: {', '.join(sorted(manifest.splits))})")
    shards = [{"root": data, "shard": s.name, "split": sp} for sp in splits for s in manifest.shards(sp)]
    total = sum(manifest.count(sp) for sp in splits)
    if not shards:
        raise IndexFormatError(f"{data}: splits {splits} hold no shards")
    log(f"indexing {total} images of {data} ({', '.join(splits)}; {len(shards)} shards) with {ref}")
    from xray_match.driver.worker import ensure_ray

    started = ensure_ray(log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(read_shard)
        ds = ds.map_batches(ShardEmbedder, fn_constructor_kwargs={"ref": ref,
                                                                  "threads": max(1, math.ceil(cfg.num_cpus))},
                            batch_size=cfg.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        image_rows, caption_rows = [], []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            is_img = batch["kind"] == "image"
            for sel, acc in ((is_img, image_rows), (~is_img, caption_rows)):
                if sel.any():
                    acc.append({c: batch[c][sel] for c in batch})
    finally:
        if started:
            ray.shutdown()
    cat = lambda rows, c: np.concatenate([r[c] for r in rows]) if rows else np.zeros(0)  # noqa: E731
    if not image_rows:
        raise IndexFormatError(f"{data}: no images in splits {splits}")
    img = {c: cat(image_rows, c) for c in image_rows[0]}
    cap = {c: cat(caption_rows, c) for c in image_rows[0]} if caption_rows else None
    order = sorted(range(len(img["key"])), key=lambda i: (str(img["split"][i]), str(img["key"][i])))
    row_of = {(str(img["split"][i]), str(img["key"][i])): r for r, i in enumerate(order)}
    if len(row_of) != len(order):
        raise IndexFormatError(f"{data}: an image key occurs twice within a split")
    images = {c: [v.item() if hasattr(v, "item") else v for v in img[c][order]] for c in IMAGE_COLUMNS}
    captions: dict[str, list] = {"text": [], "image": []}
    cap_vectors = np.zeros((0, img["emb"].shape[1]), np.float32)
    if cap is not None:
        owner = [row_of[(str(s), str(k))] for s, k in zip(cap["split"], cap["key"])]
        corder = sorted(range(len(owner)), key=lambda j: (owner[j], int(cap["caption_index"][j])))
        captions = {"text": [str(cap["text"][j]) for j in corder], "image": [owner[j] for j in corder]}
        cap_vectors = cap["emb"][corder]
    meta = {"model": ref.to_json(), "data": data if "://" in data else os.path.abspath(data), "splits": splits}
    path = write_index(out, img["emb"][order], images, cap_vectors, captions, meta, cfg)
    tag_index(ref, path)
    log(f"index written to {path}: {len(order)} images, {len(captions['text'])} captions, "
        f"dim {img['emb'].shape[1]}, {cfg.kind}" + (f"; tagged {INDEX_TAG} on {ref.name} version {ref.version}"
                                                    if ref.registered else ""))
    return read_meta(path) | {"path": path}


def decode_image(data: bytes):
    """Upload bytes -> PIL RGB image; a clear error for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a PNG/JPEG image ({e})") from None
    return im.convert("RGB")
