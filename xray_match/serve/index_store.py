"""Where a search index lives: its folder format, and its versions on an object store.

A folder (format version 1)::

    index.json       model (uri, name, version), dim, faiss kind and parameters, counts, data root
    images.faiss     faiss index of image vectors, row i = images.json row i
    images.json      columns key / split / shard / offset / size / ext of every image
    captions.faiss   faiss index of caption vectors, row j = captions.json row j
    captions.json    columns text / image (row of the caption's image in images.json)

Nothing is pickled: faiss's own format and JSON. A local folder is written under a hidden
temporary name and renamed into place (:func:`xray_match.serve.index_build.write_index`), so a
reader sees the old index or the whole new one.

An object store cannot rename a folder, and a reader that copies five objects one by one could
copy some of an old index and some of a new one if they were overwritten in place. There the
index is written as a *version* that is never changed afterwards, and published by one small
pointer object, written last (:func:`publish`); one PUT replaces an object whole, so a reader sees
the old pointer or the new one, and either names a version all of whose objects are in place::

    URL/current.json         {"format_version": 1, "version": "v-20261206T101500-1a2b3c4d"}
    URL/v-.../index.json, images.faiss, images.json, captions.faiss, captions.json

A writer killed before the pointer leaves an unpublished version that no reader opens; the next
write deletes it (and every version but the new one and the one it replaces, which a reader that
read the old pointer a moment ago may still be copying). Readers load a local copy of the
version the pointer names (:func:`fetch`, cached by URL and version).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from typing import Any

from xray_match.config import xray_home
from xray_match.data.format import join
from xray_match.data.io import atomic_write_bytes, filesystem, local_path, open_url

FORMAT_VERSION = 1
META = "index.json"
#: on an object store: the pointer to the published version (written last, see the module doc)
CURRENT = "current.json"
#: the files of an index besides META (written first; META last marks a folder complete)
INDEX_FILES = ("images.faiss", "images.json", "captions.faiss", "captions.json")
IMAGE_COLUMNS = ("key", "split", "shard", "offset", "size", "ext")


class IndexFormatError(ValueError):
    """An index folder that is missing, from another format version, or inconsistent."""


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
