"""The serving side's one door to models: load a pinned reference, embed with it, tag its version.

References are :class:`xray_match.tracking.models.ModelRef` (parse, resolve, pin, load: one place).
Everything in :mod:`xray_match.serve` loads models through :func:`load_embedder`, so a move of
checkpoint loading touches one line here. An index is built from, tagged on and served with one
pinned version while the alias may move on.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from xray_match.tracking.models import ModelLookupError, ModelRef

#: model-version tag holding the folder of the index built for that version
INDEX_TAG = "xray_match.index"


class Embedder(Protocol):
    """What search needs of a model: both towers into one space, (N, D) each."""

    def encode_images(self, images: list) -> Any: ...

    def encode_texts(self, texts: list[str]) -> Any: ...


def load_embedder(ref: ModelRef, device: str = "cpu") -> Embedder:
    """The pinned model's inference object (preprocessing included), checked to embed both modalities."""
    model = ref.load(device)
    if not (hasattr(model, "encode_images") and hasattr(model, "encode_texts")):
        raise ModelLookupError(f"{ref}: {type(model).__name__} does not embed images and texts")
    return model


def embed_texts(model: Embedder, texts: list[str]) -> np.ndarray:
    """(N, D) float32, checked to be one vector per text."""
    return _vectors(model.encode_texts(list(texts)), "encode_texts")


def embed_images(model: Embedder, images: list) -> np.ndarray:
    return _vectors(model.encode_images(list(images)), "encode_images")


def _vectors(x: Any, what: str) -> np.ndarray:
    a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    if a.ndim != 2:
        raise ModelLookupError(f"{what} returned shape {tuple(a.shape)}, not (N, D): the model scores pairs "
                               "(cross-attention) instead of embedding each side; it cannot be indexed")
    return np.ascontiguousarray(a, dtype=np.float32)


def tag_index(ref: ModelRef, index_dir: str) -> None:
    """Record on the pinned model version where its index is (registered models only)."""
    if ref.registered:
        ref.set_tag(INDEX_TAG, index_dir if "://" in index_dir else os.path.abspath(index_dir))


def index_of(ref: ModelRef) -> str | None:
    """The index folder tagged on the pinned version ``ref``, or None."""
    return ref.tags().get(INDEX_TAG)
