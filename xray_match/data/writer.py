"""Atomic, resumable shard writing with a manifest.

Each shard is written under a temporary name and renamed when complete; only then is it added
to ``manifest.json`` (itself replaced atomically). A writer killed mid-shard therefore leaves no
shard in the manifest, and re-running a conversion keeps the complete shards and rewrites the
rest. Conversions must produce samples in a deterministic order for the resume to be exact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import fsspec
import webdataset as wds
from tqdm.auto import tqdm

from xray_match.data.format import (
    FORMAT_VERSION,
    Manifest,
    ShardFormatError,
    ShardInfo,
    join,
    read_manifest,
    shard_name,
    write_manifest,
)


def sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> ShardInfo:
    """Write one tar shard atomically; returns its manifest entry."""
    local_final = "://" not in path
    tmp_dir = os.path.dirname(os.path.abspath(path)) if local_final else tempfile.gettempdir()
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    count = 0
    try:
        with wds.TarWriter(tmp) as sink:
            for sample in samples:
                if "__key__" not in sample:
                    raise ShardFormatError(f"{path}: sample {count} has no __key__")
                sink.write(sample)
                count += 1
        digest, nbytes = sha256_file(tmp)
        if local_final:
            os.replace(tmp, path)
        else:
            fs, p = fsspec.core.url_to_fs(path)
            fs.put_file(tmp, p)
            os.remove(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ShardInfo(name=os.path.basename(path), count=count, sha256=digest, bytes=nbytes)


def load_or_new_manifest(root: str, dataset: str) -> Manifest:
    try:
        return read_manifest(root)
    except ShardFormatError as e:
        if "no manifest" in str(e):
            return Manifest(dataset=dataset)
        raise


def _complete(root: str, entry: ShardInfo) -> bool:
    fs, p = fsspec.core.url_to_fs(join(root, entry.name))
    try:
        return fs.size(p) == entry.bytes
    except FileNotFoundError:
        return False


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
) -> Manifest:
    """Write ``num_samples`` samples ``make_sample(0..n-1)`` as shards of ``maxcount``.

    ``make_sample`` must be deterministic and picklable (it runs in worker processes when
    ``workers > 1``). Shards already complete (listed in the manifest, same size on disk) are kept.
    """
    if "://" not in root:
        os.makedirs(root, exist_ok=True)
    manifest = load_or_new_manifest(root, dataset)
    spec = {"num_samples": num_samples, "maxcount": maxcount}
    if manifest.info.get("splits", {}).get(split) != spec:
        manifest.splits[split] = []  # a different request: rebuild the split
    manifest.info.setdefault("splits", {})[split] = spec
    manifest.info.update(info or {})
    manifest.dataset = dataset
    done = {s.name: s for s in manifest.splits.get(split, []) if _complete(root, s)}
    manifest.splits[split] = sorted(done.values(), key=lambda s: s.name)
    write_manifest(root, manifest)

    n_shards = (num_samples + maxcount - 1) // maxcount
    todo = [
        (join(root, shard_name(split, i)), i * maxcount, min(num_samples, (i + 1) * maxcount), make_sample)
        for i in range(n_shards)
        if shard_name(split, i) not in done
    ]
    bar = tqdm(total=num_samples, desc=f"{dataset}/{split}", unit="img", disable=not progress)
    bar.update(sum(s.count for s in done.values()))

    def record(entry: ShardInfo) -> None:
        manifest.splits[split] = sorted(manifest.splits[split] + [entry], key=lambda s: s.name)
        write_manifest(root, manifest)
        bar.update(entry.count)

    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for entry in pool.map(_make_shard, todo):
                record(entry)
    else:
        for job in todo:
            record(_make_shard(job))
    bar.close()
    return manifest


def write_samples(
    root: str,
    dataset: str,
    split: str,
    samples: Iterable[dict[str, Any]],
    maxcount: int = 500,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> Manifest:
    """Write a stream of samples (for converters without random access), resuming past
    complete shards: the first ``complete * maxcount`` samples of the stream are skipped."""
    if "://" not in root:
        os.makedirs(root, exist_ok=True)
    manifest = load_or_new_manifest(root, dataset)
    manifest.dataset = dataset
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
    manifest.info["splits"][split] = {"maxcount": maxcount}
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
        manifest.splits[split].append(entry)
        write_manifest(root, manifest)
        bar.update(entry.count)
        index += 1
        if len(chunk) < maxcount:
            break
    manifest.info["splits"][split]["num_samples"] = manifest.count(split)
    write_manifest(root, manifest)
    bar.close()
    return manifest


def remove_tree(root: str) -> None:
    if "://" in root:
        fs, p = fsspec.core.url_to_fs(root)
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["write_shard", "write_split", "write_samples", "sha256_file", "FORMAT_VERSION"]
