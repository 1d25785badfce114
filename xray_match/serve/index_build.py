"""Building the search index of a shard folder with Ray Data (``xray-match index``).

:func:`build_index`: one Ray Data read task per shard lists its samples with the byte offset of
each image inside the tar (:func:`xray_match.data.reader.iter_raw` with ``positions``, so the
service can serve the image later with one ranged read), ``map_batches`` runs a pool of model
actors that embed every image and every caption, and the driver collects the vectors in a fixed
order (split, key) and writes the folder (:func:`write_index`; the format: :mod:`.index_store`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from xray_match.data.format import image_key, join
from xray_match.data.io import local_path
from xray_match.serve.config import IndexConfig
from xray_match.serve.index_store import FORMAT_VERSION, IMAGE_COLUMNS, META, IndexFormatError, publish, read_meta
from xray_match.serve.model import INDEX_TAG
from xray_match.tracking.models import ModelRef


# ----------------------------------------------------------------------------- reading shards


def read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One shard -> one row per sample: its image bytes and json, and where the image lies in the
    tar. ``row``: ``{"root", "shard", "split"}``. Errors name shard and key."""
    from xray_match.data.reader import iter_raw, parse_meta

    for raw in iter_raw(join(row["root"], row["shard"]), positions=True):
        parse_meta(raw)  # a sample without its json is refused here
        ext = image_key(raw)
        offset, size = raw["__positions__"][ext]
        yield {"key": raw["__key__"], "split": row["split"], "shard": row["shard"], "image": raw[ext], "ext": ext,
               "offset": offset, "size": size, "json": raw["json"]}


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


# ----------------------------------------------------------------------------- the folder


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
