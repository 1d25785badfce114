"""Search with a loaded model and its index, without Ray: the core the Serve replicas call.

A :class:`Searcher` is immutable once loaded; the service swaps whole searchers when the model's
alias moves, so a query always sees one model with the index built for it.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

from xray_match.serve.index import SearchIndex, check_built_for
from xray_match.serve.index_store import IndexFormatError
from xray_match.serve.model import Embedder, embed_images, embed_texts, load_embedder
from xray_match.tracking.models import ModelRef


def image_path(split: str, key: str) -> str:
    """The app-relative URL of an indexed image."""
    return f"/images/{quote(split, safe='')}/{quote(key, safe='')}"


class Searcher:
    """Text -> nearest images and image -> nearest captions, with scores, ids and image URLs."""

    def __init__(self, ref: ModelRef, model: Embedder, index: SearchIndex):
        check_built_for(ref, index.meta, index.path)
        probe = embed_texts(model, ["a"])
        if probe.shape[1] != index.dim:
            raise IndexFormatError(f"{index.path}: dimension {index.dim}, the model {ref} embeds to {probe.shape[1]}")
        self.ref, self.model, self.index = ref, model, index
        self._rows = {(s, k): i for i, (s, k) in enumerate(zip(index.images["split"], index.images["key"]))}
        self._lock = threading.Lock()  # one forward pass at a time per replica (torch's own threads do the rest)

    @classmethod
    def load(cls, ref: ModelRef, index_dir: str) -> "Searcher":
        """The pinned ``ref``'s model with the index at ``index_dir``."""
        return cls(ref, load_embedder(ref), SearchIndex.load(index_dir))

    def info(self) -> dict[str, Any]:
        m = self.index.meta
        return {"model": self.ref.to_json(), "index": self.index.path, "images": m["images"], "captions": m["captions"],
                "dim": m["dim"], "kind": m["kind"], "data": m.get("data")}

    def _image_hit(self, row: int, score: float, rank: int) -> dict[str, Any]:
        split, key = self.index.images["split"][row], self.index.images["key"][row]
        return {"rank": rank, "score": float(score), "id": key, "split": split,
                "url": image_path(split, key) if self.index.images["shard"][row] else None}

    def text_to_images(self, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
        with self._lock:
            q = embed_texts(self.model, texts)
        scores, rows = self.index.search_images(q, k)
        return [[self._image_hit(int(r), s, i + 1) for i, (r, s) in enumerate(zip(rr, ss)) if r >= 0]
                for rr, ss in zip(rows, scores)]

    def image_to_captions(self, images: list, k: int) -> list[list[dict[str, Any]]]:
        with self._lock:
            q = embed_images(self.model, images)
        scores, rows = self.index.search_captions(q, k)
        out = []
        for rr, ss in zip(rows, scores):
            hits = []
            for i, (r, s) in enumerate(zip(rr, ss)):
                if r < 0:
                    continue
                img = int(self.index.captions["image"][r])
                hit = self._image_hit(img, s, i + 1)
                hits.append({"rank": i + 1, "score": float(s), "text": self.index.captions["text"][r], "id": int(r),
                             "image_id": hit["id"], "image_url": hit["url"]})
            out.append(hits)
        return out

    def image_bytes(self, split: str, key: str) -> tuple[bytes, str] | None:
        row = self._rows.get((split, key))
        return None if row is None else self.index.image_bytes(row)

