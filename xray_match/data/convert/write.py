"""Writing a planned conversion as shards: resumable, and fingerprinted so that a changed input is
rewritten instead of resumed.

A picklable *builder* turns each record into a shard sample; :func:`write_records` writes the shards
with :func:`xray_match.data.writer.write_split` in a process pool (or one Ray task per shard with
``use_ray``, :mod:`.ray_tasks`), so a re-run keeps complete shards and rewrites the rest. Record
order is deterministic, and each split's records and options are fingerprinted in the manifest:
when they change, that split is rewritten instead of resumed. The output folder is marked
incomplete from the first write until the last split is written
(:func:`xray_match.data.writer.finish_write`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from typing import Any, Callable

from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan
from xray_match.data.convert.ray_tasks import write_records_ray
from xray_match.data.format import MANIFEST, Manifest, join, write_manifest
from xray_match.data.writer import finish_write, open_folder, write_split

#: bumped when a converter's output for the same input changes (part of the split fingerprint)
CONVERTER_VERSION = 1


def fingerprint(records: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CONVERTER_VERSION, **extra}, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


_RECORD_CACHE: dict[str, list[dict[str, Any]]] = {}


class _RecordMaker:
    """``index -> sample`` for :func:`write_split`. With a process pool it is pickled once per
    shard, so it carries the path of a temporary pickle of the records (loaded once per worker
    process) instead of the records themselves."""

    def __init__(self, build: Callable[[dict[str, Any]], dict[str, Any]], records_path: str):
        self.build = build
        self.records_path = records_path

    def _records(self) -> list[dict[str, Any]]:
        recs = _RECORD_CACHE.get(self.records_path)
        if recs is None:
            with open(self.records_path, "rb") as fh:
                recs = pickle.load(fh)  # our own temporary file, written by write_records
            _RECORD_CACHE.clear()
            _RECORD_CACHE[self.records_path] = recs
        return recs

    def __call__(self, index: int) -> dict[str, Any]:
        return self.build(self._records()[index])


def write_plans(
    root: str,
    dataset: str,
    plans: dict[str, SplitPlan],
    problems: Problems,
    build: Callable[[dict[str, Any]], dict[str, Any]],
    opts: ConvertOptions,
    info: dict[str, Any],
) -> Manifest:
    """Check, then write every planned split. ``info`` (converter name, sources, options, ...) goes
    to ``manifest.info["convert"]`` with per split: image count, fingerprint, skips and stats."""
    skipped = problems.resolve(opts.skip_bad)  # raises before anything is written
    if not plans:
        raise ConversionError(f"{dataset}: no split to write (splits asked for: {', '.join(opts.splits) or 'all'})")
    unknown = [s for s in opts.splits if s not in plans]
    if unknown:
        raise ConversionError(f"{dataset}: no split {', '.join(map(repr, unknown))} in this input (have: {', '.join(plans)})")
    for split, plan in plans.items():
        if not plan.records:
            raise ConversionError(f"{dataset}: split {split!r} has no images left to write")
    manifest = open_folder(root, dataset)  # refuses a folder that is not ours, or holds another data set
    old = manifest.info.get("convert", {})
    if manifest.splits and old.get("converter", info.get("converter")) != info.get("converter"):
        raise ConversionError(
            f"{join(root, MANIFEST)}: this folder holds {manifest.dataset!r} written by converter "
            f"{old.get('converter')!r}; write {info.get('converter')!r} output to another folder"
        )
    if opts.splits:  # some splits: the others stay as written (a plan never started is forgotten)
        per_split = {sp: v for sp, v in old.get("splits", {}).items() if sp in manifest.splits}
    else:  # the whole input: a split it no longer has is stale (finish_write deletes its shards)
        per_split = {}
        for split in (set(manifest.splits) | set(manifest.info.get("splits", {}))) - set(plans):
            manifest.splits.pop(split, None)
            manifest.info.get("splits", {}).pop(split, None)
    changed = []
    for split, plan in plans.items():
        fp = fingerprint(plan.records, {
            "dataset": dataset, "converter": info.get("converter"), **opts.fingerprint_fields(),
            "builder": getattr(build, "describe", dict)(),
        })
        if old.get("splits", {}).get(split, {}).get("fingerprint") != fp:
            changed.append(split)
        per_split[split] = {
            "images": len(plan.records),
            "fingerprint": fp,
            **skipped.get(split, {"skipped": {}, "skipped_ids": {}}),
            **({"stats": dict(sorted(plan.stats.items()))} if plan.stats else {}),
        }
    convert_info = {**info, "version": CONVERTER_VERSION, "splits": per_split}
    # problems not tied to an output split (e.g. a malformed line of a caption file)
    outside = {k: v for k, v in skipped.items() if k not in plans}
    if outside:
        convert_info["skipped_outside_splits"] = outside
    # Invalidate every changed split before writing any: a crash later must not leave a split
    # whose recorded fingerprint matches shards written from other inputs.
    for split in changed:
        if manifest.splits.get(split):
            manifest.splits[split] = []
    manifest.info["convert"] = convert_info
    manifest.complete = False
    write_manifest(root, manifest)

    for split, plan in plans.items():
        manifest = write_records(root, dataset, split, plan.records, build, opts, {"convert": convert_info}, finish=False)
    return finish_write(root, manifest)


def write_records(
    root: str,
    dataset: str,
    split: str,
    records: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], dict[str, Any]],
    opts: ConvertOptions,
    info: dict[str, Any],
    finish: bool = True,
) -> Manifest:
    """Write ``build(record)`` for every record as shards of ``opts.maxcount`` (resumable;
    ``finish=False`` leaves the folder incomplete for a further split, as in :func:`write_split`)."""
    if opts.use_ray:
        return write_records_ray(root, dataset, split, records, build, opts, info, finish)
    fd, tmp = tempfile.mkstemp(prefix="xray-records-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as fh:
            if opts.workers > 1:  # in-process writing uses the cache alone
                pickle.dump(records, fh, protocol=pickle.HIGHEST_PROTOCOL)
        # forked pool workers inherit this cache and never read the file
        _RECORD_CACHE.clear()
        _RECORD_CACHE[tmp] = records
        return write_split(
            root, dataset, split, len(records), _RecordMaker(build, tmp), maxcount=opts.maxcount,
            workers=opts.workers, info=info, progress=opts.progress, finish=finish,
        )
    finally:
        _RECORD_CACHE.pop(tmp, None)
        os.remove(tmp)
