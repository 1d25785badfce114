"""Atomic, resumable shard writing with a manifest; a folder is complete or says it is not.

Each shard is written whole before it has its name (locally: under a temporary name, then
renamed; on an object store, which cannot rename: to local disk, then one upload, which makes the
object appear whole or not at all); only then is it added to ``manifest.json`` (itself replaced
the same way). A writer killed mid-shard therefore leaves no shard in the manifest, at most an
unlisted file or object beside it that no reader opens, and re-running a conversion keeps the
complete shards and rewrites the rest. Conversions must produce samples in a deterministic order
for the resume to be exact.

A write starts by marking the manifest incomplete (:func:`open_folder` refuses a non-empty folder
that holds no manifest: it is not ours to overwrite) and ends in :func:`finish_write`, which marks
it complete once every split holds its planned count and only then deletes what the manifest no
longer lists (shards of an earlier, larger write, temp files of a killed one). A data set of
several splits calls :func:`finish_write` once, after the last split (``finish=False`` before).
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any, Callable, Iterable, Iterator

import webdataset as wds
from tqdm.auto import tqdm

from xray_match.data.format import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ShardFormatError,
    ShardInfo,
    count_problems,
    find_manifest,
    is_shard_name,
    join,
    shard_name,
    write_manifest,
)
from xray_match.data.io import filesystem, is_temp_name, list_names, local_path, open_url, remove, write_atomic


def sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open_url(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class _Hashing:
    """A write-only stream that hashes and counts what passes through it to ``fh``."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> ShardInfo:
    """Write one tar shard atomically (:func:`~xray_match.data.io.write_atomic`: a rename
    locally, one upload on an object store); returns its manifest entry."""
    count = 0
    stream: _Hashing | None = None

    def write(fh: IO[bytes]) -> None:
        nonlocal count, stream
        stream = _Hashing(fh)
        with wds.TarWriter(stream) as sink:
            for sample in samples:
                if "__key__" not in sample:
                    raise ShardFormatError(f"{path}: sample {count} has no __key__")
                sink.write(sample)
                count += 1

    write_atomic(path, write)
    return ShardInfo(name=posixpath.basename(path), count=count, sha256=stream.sha256.hexdigest(), bytes=stream.bytes)


# ----------------------------------------------------------------------------- a folder's life: open, fill, finish


def open_folder(root: str, dataset: str) -> Manifest:
    """The manifest to write ``dataset`` into ``root`` with, read before anything is written.

    An absent or empty folder gets a new one. A folder with a manifest (complete or not: a re-run
    resumes it) must hold the same data set. A non-empty folder without one is refused: it is not
    ours (another tool's output, or shards whose manifest was lost), and writing there would
    overwrite some of its files and leave the rest beside ours."""
    manifest = find_manifest(root)
    if manifest is None:
        names = sorted(list_names(root))
        if names:
            raise ShardFormatError(
                f"{root}: not empty and has no {MANIFEST} ({len(names)} entries, e.g. {names[0]!r}), so not a folder "
                f"xray_match wrote; write to an empty or new folder"
            )
        local = local_path(root)
        if local is not None:
            os.makedirs(local, exist_ok=True)
        return Manifest(dataset=dataset)
    if manifest.splits and manifest.dataset != dataset:
        raise ShardFormatError(f"{join(root, MANIFEST)}: this folder holds {manifest.dataset!r}; write {dataset!r} to another folder")
    manifest.dataset = dataset
    return manifest


def finish_write(root: str, manifest: Manifest) -> Manifest:
    """Mark the folder complete, then delete the files the manifest does not list.

    Refused (the folder stays incomplete) while a split holds another count than planned. The
    deletion comes after the complete manifest is in place: a crash in between leaves a complete
    data set beside files that ``verify`` names, never a manifest listing a deleted shard. Only
    names a writer gives are deleted (``<split>-NNNNNN.tar`` and hidden temp files): on an object
    store, where a killed writer leaves no temp files, what it leaves is shards it uploaded but
    never listed, and those go here."""
    short = count_problems(root, manifest)
    if short:
        raise ShardFormatError(f"{short[0]}; the folder stays marked incomplete")
    manifest.complete = True
    write_manifest(root, manifest)
    listed = manifest.shard_names()
    for name in sorted(list_names(root)):
        if (is_shard_name(name) and name not in listed) or is_temp_name(name):
            remove(join(root, name))
    return manifest


def _complete(root: str, entry: ShardInfo) -> bool:
    fs, p = filesystem(join(root, entry.name))
    try:
        return fs.size(p) == entry.bytes
    except FileNotFoundError:
        return False


def start_split(
    root: str, dataset: str, split: str, num_samples: int, maxcount: int, info: dict[str, Any] | None = None
) -> tuple[Manifest, list[tuple[str, int, int]]]:
    """Open ``root``, mark it incomplete and list the shards of ``split`` still to write as
    ``(name, start, stop)``. Complete shards (listed, same size on disk) are kept when they were
    written for the same request (samples, maxcount); another request rebuilds the split."""
    manifest = open_folder(root, dataset)
    spec = {"num_samples": num_samples, "maxcount": maxcount}
    if manifest.info.get("splits", {}).get(split) != spec:
        manifest.splits[split] = []
    manifest.info.setdefault("splits", {})[split] = spec
    manifest.info.update(info or {})
    manifest.splits[split] = [s for s in manifest.splits.get(split, []) if _complete(root, s)]
    manifest.complete = False
    write_manifest(root, manifest)
    done = {s.name for s in manifest.splits[split]}
    n_shards = (num_samples + maxcount - 1) // maxcount
    names = [shard_name(split, i) for i in range(n_shards)]
    todo = [(name, i * maxcount, min(num_samples, (i + 1) * maxcount)) for i, name in enumerate(names) if name not in done]
    return manifest, todo


def add_shard(root: str, manifest: Manifest, split: str, entry: ShardInfo) -> None:
    """List a written shard (the manifest on disk is replaced at once: a kill keeps it)."""
    manifest.splits[split] = sorted(manifest.splits[split] + [entry], key=lambda s: s.name)
    write_manifest(root, manifest)


# ----------------------------------------------------------------------------- writers


def _make_shard(args: tuple[str, int, int, Callable[[int], dict[str, Any]]]) -> ShardInfo:
    path, start, stop, make_sample = args
    return write_shard(path, (make_sample(i) for i in range(start, stop)))


def write_split(
    root: str,
    dataset: str,
    split: str,
    num_samples: int,
    make_sample: Callable[[int], dict[str, Any]],
    maxcount: int = 500,
    workers: int = 1,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    finish: bool = True,
) -> Manifest:
    """Write ``num_samples`` samples ``make_sample(0..n-1)`` as shards of ``maxcount``.

    ``make_sample`` must be deterministic and picklable (it runs in worker processes when
    ``workers > 1``). Shards already complete (listed in the manifest, same size on disk) are kept.
    ``finish=False`` leaves the folder marked incomplete for a further split (then call
    :func:`finish_write`)."""
    manifest, todo = start_split(root, dataset, split, num_samples, maxcount, info)
    jobs = [(join(root, name), start, stop, make_sample) for name, start, stop in todo]
    bar = tqdm(total=num_samples, desc=f"{dataset}/{split}", unit="img", disable=not progress)
    bar.update(manifest.count(split))

    def record(entry: ShardInfo) -> None:
        add_shard(root, manifest, split, entry)
        bar.update(entry.count)

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for entry in pool.map(_make_shard, jobs):
                record(entry)
    else:
        for job in jobs:
            record(_make_shard(job))
    bar.close()
    return finish_write(root, manifest) if finish else manifest


def write_splits(
    root: str,
    dataset: str,
    sizes: dict[str, int],
    render: Callable[[str, int], dict[str, Any]],
    maxcount: int = 500,
    workers: int = 1,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> Manifest | None:
    """A generated data set: ``sizes[split]`` samples ``render(split, i)`` per split (0: skipped),
    complete only once the last split is written. ``render`` must be picklable (a top-level
    function or a ``functools.partial`` of one)."""
    manifest = None
    for split, n in sizes.items():
        if n:
            make = functools.partial(render, split)
            manifest = write_split(root, dataset, split, n, make, maxcount=maxcount, workers=workers, info=info,
                                   progress=progress, finish=False)
    return finish_write(root, manifest) if manifest is not None else None


def write_samples(
    root: str,
    dataset: str,
    split: str,
    samples: Iterable[dict[str, Any]],
    maxcount: int = 500,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    total: int | None = None,
    finish: bool = True,
) -> Manifest:
    """Write a stream of samples (for converters without random access), resuming past
    complete shards: the first ``complete * maxcount`` samples of the stream are skipped."""
    manifest = open_folder(root, dataset)
    manifest.info.update(info or {})
    prev = manifest.info.setdefault("splits", {}).get(split, {})
    keep: list[ShardInfo] = []
    if prev.get("maxcount") == maxcount:
        for i, s in enumerate(manifest.splits.get(split, [])):
            if s.name == shard_name(split, i) and s.count == maxcount and _complete(root, s):
                keep.append(s)
            else:
                break
    manifest.splits[split] = keep
    manifest.info["splits"][split] = {"maxcount": maxcount}  # the count is known when the stream ends
    manifest.complete = False
    write_manifest(root, manifest)
    bar = tqdm(total=total, desc=f"{dataset}/{split}", unit="img", disable=not progress)
    it: Iterator[dict[str, Any]] = iter(samples)
    skip = len(keep) * maxcount
    for _ in range(skip):
        next(it, None)
    bar.update(skip)
    index = len(keep)
    while True:
        chunk = [s for _, s in zip(range(maxcount), it)]
        if not chunk:
            break
        entry = write_shard(join(root, shard_name(split, index)), chunk)
        add_shard(root, manifest, split, entry)
        bar.update(entry.count)
        index += 1
        if len(chunk) < maxcount:
            break
    bar.close()
    manifest.info["splits"][split]["num_samples"] = manifest.count(split)
    if finish:
        return finish_write(root, manifest)
    write_manifest(root, manifest)
    return manifest


def remove_tree(root: str) -> None:
    if "://" in root:
        fs, p = filesystem(root)
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["write_shard", "write_split", "write_splits", "write_samples", "finish_write", "sha256_file", "FORMAT_VERSION"]
