"""Atomic file writes for local paths and fsspec URLs; PNG encoding for the generators."""

from __future__ import annotations

import io
import os
import uuid

import fsspec
import numpy as np
from PIL import Image


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    if "://" not in path or path.startswith("file://"):
        local = path.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, local)
        return
    # Object stores (s3://, gs://) make a PUT visible only when complete.
    with fsspec.open(path, "wb") as fh:
        fh.write(data)


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (H, W) or (H, W, 3) uint8 as PNG bytes (fast compression: shards are written once)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
