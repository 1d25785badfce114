"""The serving side's one door to models: resolve a model reference, load it, tag its version.

Everything in :mod:`xray_match.serve` loads models through :func:`load_embedder`, the only call
into the training/registry code, so a move of checkpoint loading touches one line here.

A reference is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local checkpoint folder/file.
:func:`resolve` pins an alias to the version it points at *now*, so that an index is built from,
and tagged on, exactly one version while the alias may move on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: model-version tag holding the folder of the index built for that version
INDEX_TAG = "xray_match.index"

_MODELS_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


class ModelLookupError(LookupError):
    """A model reference that names nothing loadable (the message says what and where)."""


class Embedder(Protocol):
    """What search needs of a model: both towers into one space, (N, D) each."""

    def encode_images(self, images: list) -> Any: ...

    def encode_texts(self, texts: list[str]) -> Any: ...


@dataclass(frozen=True)
class ModelRef:
    """A model reference with its alias resolved: ``version`` is the version loaded."""

    uri: str  # as given
    tracking_uri: str | None = None
    name: str | None = None  # registered model name (None for a local checkpoint)
    alias: str | None = None
    version: str | None = None

    @property
    def pinned(self) -> str:
        """A URI that keeps naming this exact model when the alias moves."""
        return f"models:/{self.name}/{self.version}" if self.name else self.uri

    @property
    def registered(self) -> bool:
        return self.name is not None

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "name": self.name, "alias": self.alias, "version": self.version}


def default_tracking_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the project's local store."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from xray_match.config import Config
    from xray_match.tracking.store import resolve_tracking_uri

    return resolve_tracking_uri(Config())


def _client(tracking_uri: str):
    from xray_match.tracking.store import client

    return client(tracking_uri)


def resolve(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Pin ``uri`` to a version (a local path stays as it is); errors name what exists."""
    if os.path.exists(uri):
        return ModelRef(uri=os.path.abspath(uri))
    m = _MODELS_URI.fullmatch(uri)
    if not m:
        raise ModelLookupError(f"{uri!r}: not a checkpoint path nor a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    from xray_match.tracking.registry import pin_version

    name, alias, version = m.groups()
    tracking_uri = default_tracking_uri(tracking_uri)
    version = pin_version(tracking_uri, name, alias, version)
    return ModelRef(uri=uri, tracking_uri=tracking_uri, name=name, alias=alias, version=str(version))


def current_version(ref: ModelRef) -> str | None:
    """The version ``ref``'s alias points at now (None for a pinned version or a path)."""
    if not (ref.registered and ref.alias):
        return None
    return str(_client(ref.tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version)


def load_embedder(ref: ModelRef, device: str = "cpu") -> Embedder:
    """The model's inference object (preprocessing included), checked to embed both modalities."""
    from xray_match.tracking.registry import load_model

    model = load_model(ref.pinned, tracking_uri=ref.tracking_uri, device=device)
    if not (hasattr(model, "encode_images") and hasattr(model, "encode_texts")):
        raise ModelLookupError(f"{ref.uri}: {type(model).__name__} does not embed images and texts")
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
    """Record on the model version where its index is (registered models only)."""
    if ref.registered:
        where = index_dir if "://" in index_dir else os.path.abspath(index_dir)
        from xray_match.tracking.registry import tag_model_version

        tag_model_version(ref.tracking_uri, ref.name, ref.version, INDEX_TAG, where)


def index_of(ref: ModelRef, version: str | None = None) -> str | None:
    """The index folder tagged on ``version`` (default: ``ref.version``), or None."""
    if not ref.registered:
        return None
    mv = _client(ref.tracking_uri).get_model_version(ref.name, version or ref.version)
    return mv.tags.get(INDEX_TAG)


def with_version(ref: ModelRef, version: str) -> ModelRef:
    return ModelRef(uri=ref.uri, tracking_uri=ref.tracking_uri, name=ref.name, alias=ref.alias, version=str(version))
