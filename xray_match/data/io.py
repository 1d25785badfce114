"""File operations on local paths and fsspec URLs: atomic writes, listing, removal; PNG encoding
for the generators."""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid

import fsspec
import numpy as np
from PIL import Image

#: the names :func:`temp_path` gives: hidden, and never taken for a shard (``.x.tar.tmp-1a2b3c4d``)
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def local_path(path: str) -> str | None:
    """The file system path of a local path or ``file://`` URL; None for other URLs (s3://, ...),
    where files cannot be renamed and a PUT is what makes a file appear whole."""
    if "://" not in path:
        return path
    if path.startswith("file://"):
        return path.removeprefix("file://")
    return None


def temp_path(path: str) -> str:
    """A hidden name beside ``path`` to write under before renaming onto it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """A file a writer had not renamed yet when it was killed."""
    return bool(_TEMP_NAME.match(name))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    local = local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = temp_path(local)
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


def isdir(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def list_names(path: str) -> set[str]:
    """File names directly inside a folder (empty set if the folder does not exist)."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.isdir(p):
        return set()
    return {posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)}


def remove(path: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.rm(p)


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (H, W) or (H, W, 3) uint8 as PNG bytes (fast compression: shards are written once)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
