"""File operations on local paths and URLs (``s3://``, ``gs://``, ``file://``, ``memory://``): the
one way the package opens a URL's file system, atomic writes, listing, removal; PNG encoding for
the generators.

Every read, write and listing of a path that may be a URL goes through :func:`filesystem` (or
:func:`open_url`), so that an object store is configured the way users configure it: the AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), which s3fs (fsspec) and pyarrow (Ray's storage) both read.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid
from typing import IO, TYPE_CHECKING, Any, Callable

import fsspec

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: the names :func:`temp_path` gives: hidden, and never taken for a shard (``.x.tar.tmp-1a2b3c4d``)
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")
S3_SCHEMES = ("s3", "s3a")


# ----------------------------------------------------------------------------- a URL's file system


def scheme(path: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``""`` for a local path."""
    return path.split("://", 1)[0] if "://" in path else ""


def s3_endpoint() -> str | None:
    """The S3 endpoint the user set (botocore's own variables: the S3-specific one first), or None
    for AWS's default."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(path: str) -> dict[str, Any]:
    """What the file system of ``path`` is opened with beyond what its library reads by itself.

    For S3: the endpoint, passed explicitly although botocore reads the variable too, because
    fsspec caches one file system per set of options: a process whose ``AWS_ENDPOINT_URL``
    changed (a test session, a notebook) would otherwise keep talking to the old endpoint. And no
    listings cache: s3fs would otherwise keep a folder's first listing for the life of the
    process, and another process (a writer, a re-run, a new index version) changes the bucket."""
    if scheme(path) in S3_SCHEMES:
        opts: dict[str, Any] = {"use_listings_cache": False}
        if s3_endpoint():
            opts["endpoint_url"] = s3_endpoint()
        return opts
    return {}


def filesystem(path: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(file system, path inside it)`` for a local path or URL, configured from the user's
    environment (:func:`storage_options`); ``options`` add to or override those."""
    return fsspec.core.url_to_fs(path, **(storage_options(path) | options))


def open_url(path: str, mode: str = "rb") -> IO[Any]:
    """Open a local path or URL (text modes too); use as a context manager."""
    fs, p = filesystem(path)
    return fs.open(p, mode)


def unstrip(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """A path ``fs`` returned (``bucket/key``: file systems drop the scheme) as ``like`` spells
    paths: a URL again when ``like`` is one, so that what is printed can be used."""
    return fs.unstrip_protocol(path) if "://" in like else path


# ----------------------------------------------------------------------------- writing whole files


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


def write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file through ``write(fh)`` so that readers see the old file or the whole new one,
    never a part; if ``write`` raises or the process dies, ``path`` is left as it was.

    A local file is written under a hidden temporary name beside it (:func:`temp_path`), synced
    and renamed onto ``path``. An object store has no rename, but it has the same guarantee for
    one upload: an object appears when its PUT (or the completion of a multipart upload, which
    s3fs does in one call) succeeds, whole, and not before. So the file is written to local disk
    first and uploaded in one call; nothing partial is ever sent under ``path``. (Streaming into
    an open fsspec file instead would not do: closing it on an exception uploads what was
    written so far.)"""
    local = local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = temp_path(os.path.abspath(local))
    else:
        fd, tmp = tempfile.mkstemp(prefix=".xray-upload-", suffix="-" + posixpath.basename(path))
        os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if local is not None:
                fh.flush()
                os.fsync(fh.fileno())
        if local is not None:
            os.replace(tmp, local)
        else:
            fs, p = filesystem(path)
            fs.put_file(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    write_atomic(path, lambda fh: fh.write(data))


# ----------------------------------------------------------------------------- listing, removal


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def list_names(path: str) -> set[str]:
    """File names directly inside a folder (empty set if the folder does not exist)."""
    fs, p = filesystem(path)
    if not fs.isdir(p):
        return set()
    return {posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)}


def remove(path: str) -> None:
    fs, p = filesystem(path)
    fs.rm(p)


def png_bytes(im: "np.ndarray | Image.Image") -> bytes:
    """``im`` - a PIL image, or an (H, W) or (H, W, 3) uint8 array - as PNG bytes (fast compression:
    shards are written once). The one PNG encoder of the generators and the converters."""
    import io

    from PIL import Image

    if not isinstance(im, Image.Image):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
