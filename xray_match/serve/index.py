"""A search index loaded for queries: nearest images and captions of query vectors, and an image's
bytes read back from its shard. The folder format and where it is stored: :mod:`.index_store`;
building one: :mod:`.index_build`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xray_match.data.format import join
from xray_match.data.io import local_path, open_url
from xray_match.serve.config import IndexConfig
from xray_match.serve.index_store import FORMAT_VERSION, IMAGE_COLUMNS, META, IndexFormatError, fetch
from xray_match.tracking.models import ModelRef

MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}


def check_built_for(ref: ModelRef, meta: dict[str, Any], where: str) -> None:
    """The one check that an index (its ``index.json`` content ``meta``, at ``where``) was built for
    the pinned version ``ref``: an index of another version of the same registered model is refused.
    An index of a checkpoint, or of another model, is not checked (the dimensions still are)."""
    built_for = meta.get("model") or {}
    if ref.registered and built_for.get("name") == ref.name and str(built_for.get("version")) != str(ref.version):
        raise IndexFormatError(f"{where}: built for {ref.name} version {built_for.get('version')}, "
                               f"not version {ref.version}")


def _search_params(index, meta: dict[str, Any]) -> None:
    import faiss

    p, default = meta.get("params", {}), IndexConfig()
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = int(p.get("nprobe", default.nprobe))
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(p.get("ef_search", default.ef_search))


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
