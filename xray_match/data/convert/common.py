"""What every converter shares: input checks, image handling, and resumable shard writing.

A conversion runs in two phases.

1. *Plan* (driver, cheap): read the annotation files, list the image folders, and turn each image
   into a small JSON-able *record* (paths, captions, boxes in source pixels). Every mismatch in the
   input (an id with captions but no image file, a SALICON map for an unknown image, a box outside
   its image, a wrong caption count, ...) is added to :class:`Problems`. Before anything is written,
   :meth:`Problems.resolve` either raises :class:`ConversionError` listing the offending ids (first
   20 per kind, plus the count), or, with ``skip_bad``, drops those images and returns the counts
   that go into the manifest. A data set is never silently smaller than its input.
2. *Write* (process pool, or Ray tasks with ``use_ray``): a picklable *builder* turns each record
   into a shard sample; :func:`write_records` writes the shards with
   :func:`xray_match.data.writer.write_split`, so a re-run keeps complete shards and rewrites the
   rest. Record order is deterministic, and each split's records and options are fingerprinted
   in the manifest: when they change, that split is rewritten instead of resumed. The output
   folder is marked incomplete from the first write until the last split is written
   (:func:`xray_match.data.writer.finish_write`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from xray_match.data.format import MANIFEST, Manifest, ShardInfo, join, write_manifest
from xray_match.data.io import exists, filesystem, isdir, list_names, open_url, png_bytes  # the converters take them from here
from xray_match.data.writer import (
    _complete,
    add_shard,
    finish_write,
    open_folder,
    start_split,
    write_shard,
    write_split,
)

#: how many offending ids an error message or the manifest lists per kind of problem
SHOW_IDS = 20
#: bumped when a converter's output for the same input changes (part of the split fingerprint)
CONVERTER_VERSION = 1


class ConversionError(ValueError):
    """The input does not match its published layout; the message names files, ids and counts."""


# ----------------------------------------------------------------------------- options


@dataclass
class ConvertOptions:
    """Options shared by every converter (the CLI flags of ``xray-match data <dataset>``)."""

    maxcount: int = 1000  # samples per shard
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # process pool size
    use_ray: bool = False  # one Ray task per shard (output and input paths must be visible to every node)
    ray_address: str | None = None  # None: join $RAY_ADDRESS / a running cluster, else start a local one
    skip_bad: bool = False  # skip (count, record) mismatched images instead of failing
    splits: tuple[str, ...] = ()  # output splits to write; empty = all
    limit: int = 0  # >0: only the first N images of each split (smoke runs)
    captions_per_image: int = 5  # exactly this many captions per image; extras dropped (counted), fewer = problem
    max_side: int = 0  # >0: downscale images whose longer side exceeds this (re-encoded); 0 = original bytes
    verify_images: bool = False  # decode every image while planning (unreadable ones become problems)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.maxcount < 1:
            raise ConversionError(f"maxcount must be >= 1, got {self.maxcount}")
        if self.workers < 1:
            raise ConversionError(f"workers must be >= 1, got {self.workers}")
        if self.limit < 0 or self.max_side < 0 or self.captions_per_image < 0:
            raise ConversionError("limit, max_side and captions_per_image must be >= 0")
        self.splits = tuple(self.splits)

    def wants(self, split: str) -> bool:
        return not self.splits or split in self.splits

    def limited(self, items: Sequence[Any]) -> Sequence[Any]:
        return items[: self.limit] if self.limit else items

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options that change what a sample contains (not how or where it is written)."""
        return {"captions_per_image": self.captions_per_image, "max_side": self.max_side, "limit": self.limit}


# ----------------------------------------------------------------------------- problems


class Problems:
    """Mismatches found while planning, by split and kind (e.g. ``missing_image``)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.found: dict[str, dict[str, list[str]]] = {}

    def add(self, split: str, kind: str, ident: Any, detail: str = "") -> None:
        text = str(ident) + (f" ({detail})" if detail else "")
        self.found.setdefault(split, {}).setdefault(kind, []).append(text)

    def __bool__(self) -> bool:
        return any(self.found.values())

    def count(self, split: str | None = None) -> int:
        splits = [split] if split is not None else list(self.found)
        return sum(len(v) for sp in splits for v in self.found.get(sp, {}).values())

    def message(self) -> str:
        lines = []
        for split in sorted(self.found):
            for kind, ids in sorted(self.found[split].items()):
                shown = ", ".join(ids[:SHOW_IDS])
                more = f" ... and {len(ids) - SHOW_IDS} more" if len(ids) > SHOW_IDS else ""
                lines.append(f"  {split}: {kind}: {len(ids)} image{'s' if len(ids) != 1 else ''}: {shown}{more}")
        return "\n".join(lines)

    def resolve(self, skip_bad: bool) -> dict[str, dict[str, Any]]:
        """Raise :class:`ConversionError` listing every problem, or (``skip_bad``) return per split
        ``{"skipped": {kind: n}, "skipped_ids": {kind: [first 20]}}`` for the manifest."""
        if self and not skip_bad:
            raise ConversionError(
                f"{self.dataset}: {self.count()} mismatch{'es' if self.count() != 1 else ''} between the annotations "
                f"and the files (no shard was written). Fix the input, or pass --skip-bad to leave these images "
                f"out (the skips are counted and recorded in the manifest):\n{self.message()}"
            )
        return {
            split: {
                "skipped": {k: len(v) for k, v in sorted(kinds.items())},
                "skipped_ids": {k: v[:SHOW_IDS] for k, v in sorted(kinds.items())},
            }
            for split, kinds in self.found.items()
        }


# ----------------------------------------------------------------------------- input files (local or fsspec URL)


def read_bytes(path: str) -> bytes:
    try:
        with open_url(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e})") from None


def read_lines(path: str) -> list[str]:
    """Lines split on ``\\n`` only (``str.splitlines`` would also split inside captions on
    characters such as U+2028 and shift every later caption), ``\\r`` removed, the empty tail after
    a final newline dropped."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def read_json(path: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def require_dir(path: str, what: str) -> None:
    if not isdir(path):
        raise ConversionError(f"{path}: {what} not found (no such folder)")


def field_of(obj: Any, key: str, where: str) -> Any:
    """``obj[key]`` or an error naming the file and the missing field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ConversionError(f"{where}: missing field {key!r}")
    return obj[key]


def normalize_caption(text: str) -> str:
    """Whitespace runs (COCO captions hold stray newlines and double spaces) become one space."""
    return " ".join(str(text).split())


def take_captions(
    captions: list[str], opts: ConvertOptions, problems: Problems, split: str, ident: Any, stats: dict[str, int]
) -> list[str] | None:
    """The first ``opts.captions_per_image`` non-empty captions, or None (and a problem) if too few.

    COCO has a few images with 6 or 7 captions; retrieval protocols (Karpathy, SCAN) use 5, so the
    extras are dropped and counted in ``stats["captions_dropped"]`` (recorded in the manifest)."""
    caps = [normalize_caption(c) for c in captions]
    empty = sum(1 for c in caps if not c)
    caps = [c for c in caps if c]
    if empty:
        problems.add(split, "empty_caption", ident, f"{empty} empty caption{'s' if empty > 1 else ''}")
        return None
    n = opts.captions_per_image
    if n == 0:
        if not caps:
            problems.add(split, "too_few_captions", ident, "0 captions")
            return None
        return caps
    if len(caps) < n:
        problems.add(split, "too_few_captions", ident, f"{len(caps)} captions, need {n}")
        return None
    if len(caps) > n:
        stats["captions_dropped"] = stats.get("captions_dropped", 0) + len(caps) - n
    return caps[:n]


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(ident: Any) -> str:
    """A WebDataset key (no dots: the tar member's text after the first dot is the extension)."""
    return _KEY_BAD.sub("_", str(ident))


# ----------------------------------------------------------------------------- images


@dataclass
class ImageBlob:
    data: bytes
    ext: str  # "jpg" | "png"
    width: int
    height: int
    src_width: int
    src_height: int

    @property
    def scale(self) -> tuple[float, float]:
        return self.width / self.src_width, self.height / self.src_height


def image_size(path: str, full_decode: bool = False) -> tuple[int, int]:
    """(width, height) from the header (only the first bytes are read); ``full_decode`` also
    decodes the pixels (at 1/8 scale for JPEG) so that truncated or corrupt files are caught."""
    try:
        with open_url(path, "rb") as fh:
            im = Image.open(fh)
            size = im.size
            if full_decode:
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
        return size
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:
        raise ConversionError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def load_image(path: str, max_side: int = 0) -> ImageBlob:
    """The image as shard bytes. JPEG and PNG files are kept byte for byte (no re-encoding loss)
    unless ``max_side`` asks for a downscale; any other format is re-encoded as PNG."""
    data = read_bytes(path)
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        fmt = im.format
        # decode at reduced scale: catches truncated files cheaply (full decode happens in training)
        probe = Image.open(io.BytesIO(data))
        probe.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        probe.load()
    except Exception as e:
        raise ConversionError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        im = im.convert("RGB" if im.mode not in ("RGB", "L") else im.mode).resize((nw, nh), Image.BICUBIC)
        buf = io.BytesIO()
        if fmt == "JPEG":
            im.save(buf, format="JPEG", quality=90)
            return ImageBlob(buf.getvalue(), "jpg", nw, nh, w, h)
        im.save(buf, format="PNG")
        return ImageBlob(buf.getvalue(), "png", nw, nh, w, h)
    if fmt == "JPEG":
        return ImageBlob(data, "jpg", w, h, w, h)
    if fmt == "PNG":
        return ImageBlob(data, "png", w, h, w, h)
    buf = io.BytesIO()
    im.convert("RGB" if im.mode not in ("RGB", "L") else im.mode).save(buf, format="PNG")
    return ImageBlob(buf.getvalue(), "png", w, h, w, h)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


#: the image of a sample that has no pixels (SCAN precomputed features): 1x1 black, 8-bit grey
PLACEHOLDER_PNG = png_bytes(np.zeros((1, 1), np.uint8))


def scale_box(box: Sequence[float], sx: float, sy: float, width: int, height: int) -> list[float]:
    """A source-pixel box [x0, y0, x1, y1] in the (possibly downscaled) output image, clamped to it
    (a downscale by a float factor can overshoot the border by rounding)."""
    x0, y0, x1, y1 = box
    return [
        round(max(0.0, x0 * sx), 3), round(max(0.0, y0 * sy), 3),
        round(min(float(width), x1 * sx), 3), round(min(float(height), y1 * sy), 3),
    ]


def box_problem(box: Sequence[float], width: int, height: int) -> str | None:
    """Why a box [x0, y0, x1, y1] in pixels is not a valid box inside a width x height image."""
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        return f"box {list(box)} is empty"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"box {list(box)} lies outside the {width}x{height} image"
    return None


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, progress: bool, desc: str) -> list[Any]:
    """``[fn(j) for j in jobs]`` in a process pool (when there is enough work), with a progress bar.
    ``fn`` must be a picklable top-level function."""
    out: list[Any] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress)
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(fn, jobs, chunksize=32):
                out.append(r)
                bar.update(1)
    else:
        for j in jobs:
            out.append(fn(j))
            bar.update(1)
    bar.close()
    return out


def probe_images(paths: Sequence[str], workers: int, full_decode: bool, progress: bool, desc: str) -> list[tuple[int, int] | str]:
    """Per path its (width, height), or the error text if it is unreadable."""
    return pool_map(_probe_one, [(p, full_decode) for p in paths], workers, progress, desc)


def _probe_one(job: tuple[str, bool]) -> tuple[int, int] | str:
    path, full = job
    try:
        return image_size(path, full_decode=full)
    except ConversionError as e:
        return str(e)


# ----------------------------------------------------------------------------- large .npy files, row by row


class NpyRows:
    """Rows of a C-ordered ``.npy`` array read by offset (local path or fsspec URL), so a
    33 GB ``train_ims.npy`` is never loaded whole. Picklable: it reopens the file lazily."""

    def __init__(self, path: str):
        self.path = path
        fs, p = filesystem(path)
        try:
            with fs.open(p, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format._read_array_header(fh, version)  # (3, 0)
                self.offset = fh.tell()
        except FileNotFoundError:
            raise ConversionError(f"{path}: no such file") from None
        except ValueError as e:
            raise ConversionError(f"{path}: not a .npy array ({e})") from None
        if fortran and len(shape) > 1:
            raise ConversionError(f"{path}: Fortran-ordered array; save it C-ordered (np.ascontiguousarray)")
        if dtype.hasobject:
            raise ConversionError(f"{path}: holds Python objects (pickled); expected a numeric array")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else 0
        self._fh = None

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fh"} | {"_fh": None}

    def row(self, i: int) -> np.ndarray:
        if self._fh is None:
            fs, p = filesystem(self.path)
            self._fh = fs.open(p, "rb")
        self._fh.seek(self.offset + i * self.row_bytes)
        buf = self._fh.read(self.row_bytes)
        if len(buf) != self.row_bytes:
            raise ConversionError(f"{self.path}: truncated (row {i} of {len(self)} is incomplete)")
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:]).copy()


# ----------------------------------------------------------------------------- writing


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


def _ray_shard_task(path: str, records: list[dict[str, Any]], build: Callable[[dict[str, Any]], dict[str, Any]]) -> ShardInfo:
    return write_shard(path, (build(r) for r in records))


@dataclass
class SplitPlan:
    records: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)  # e.g. captions_dropped, phrases_without_box


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
        return _write_records_ray(root, dataset, split, records, build, opts, info, finish)
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


def _write_records_ray(
    root: str, dataset: str, split: str, records: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], dict[str, Any]], opts: ConvertOptions, info: dict[str, Any], finish: bool,
) -> Manifest:
    """The Ray twin of :func:`write_split`: same manifest bookkeeping (so a local run resumes a Ray
    run and back), one task per missing shard, each writing its shard straight to ``root``."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=opts.ray_address, log_to_driver=False)
        started = True
    try:
        manifest, todo = start_split(root, dataset, split, len(records), opts.maxcount, info)
        task = ray.remote(num_cpus=1)(_ray_shard_task)
        build_ref = ray.put(build)
        pending = {task.remote(join(root, name), records[start:stop], build_ref): name for name, start, stop in todo}
        bar = tqdm(total=len(records), desc=f"{dataset}/{split} (ray)", unit="img", disable=not opts.progress)
        bar.update(manifest.count(split))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                entry: ShardInfo = ray.get(ref)
                if not _complete(root, entry):
                    raise ConversionError(
                        f"{join(root, name)}: written by a Ray task but not visible from the driver; with --ray the "
                        f"output must be storage every node shares (an s3:// or gs:// URL, or a shared file system)"
                    )
                add_shard(root, manifest, split, entry)
                bar.update(entry.count)
        bar.close()
        return finish_write(root, manifest) if finish else manifest
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- the builder of pixel samples


class ImageSampleBuilder:
    """``record -> sample`` for data sets with pixels. A record holds ``key``, ``image_id``,
    ``split``, ``path`` and ``captions``, optionally ``objects`` (boxes in source pixels),
    ``phrases`` and ``meta`` (extra json fields). Subclasses add files in :meth:`extend`."""

    def __init__(self, max_side: int = 0):
        self.max_side = max_side

    def describe(self) -> dict[str, Any]:
        """What, besides the records, decides the samples (part of the split fingerprint)."""
        return {"builder": type(self).__name__, "max_side": self.max_side}

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            img = load_image(record["path"], self.max_side)
        except ConversionError as e:
            raise ConversionError(f"image_id {record['image_id']}: {e}") from None
        sx, sy = img.scale
        meta: dict[str, Any] = {
            "image_id": record["image_id"], "split": record["split"], "width": img.width, "height": img.height,
            "captions": record["captions"],
        }
        if (img.width, img.height) != (img.src_width, img.src_height):
            meta["source_size"] = [img.src_width, img.src_height]
        if "objects" in record:
            objs = []
            for ob in record["objects"]:
                ob = dict(ob)
                ob["box"] = scale_box(ob["box"], sx, sy, img.width, img.height)
                if "boxes" in ob:
                    ob["boxes"] = [scale_box(b, sx, sy, img.width, img.height) for b in ob["boxes"]]
                objs.append(ob)
            meta["objects"] = objs
        if "phrases" in record:
            meta["phrases"] = record["phrases"]
        meta.update(record.get("meta", {}))
        sample: dict[str, Any] = {"__key__": record["key"], img.ext: img.data}
        self.extend(record, sample, meta, img)
        sample["json"] = json.dumps(meta).encode()
        return sample

    def extend(self, record: dict[str, Any], sample: dict[str, Any], meta: dict[str, Any], img: ImageBlob) -> None:
        """Add files or json fields (e.g. ``saliency.png``)."""


# ----------------------------------------------------------------------------- Karpathy split files


def karpathy_records(
    path: str,
    image_path: Callable[[dict[str, Any]], str],
    image_id: Callable[[dict[str, Any]], Any],
    split_map: dict[str, str],
    opts: ConvertOptions,
    problems: Problems,
    dataset: str,
) -> dict[str, SplitPlan]:
    """Plans from a Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``):
    images with ``split``, ``sentences[].raw``; ``split_map`` renames splits (restval -> train).
    Order: the file's order within each split (deterministic, and the order SCAN's features use)."""
    doc = read_json(path)
    images = field_of(doc, "images", path)
    if not isinstance(images, list):
        raise ConversionError(f"{path}: field 'images' is not a list")
    by_split: dict[str, list[dict[str, Any]]] = {}
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        src_split = field_of(im, "split", where)
        split = split_map.get(src_split, src_split)
        if opts.wants(split):
            by_split.setdefault(split, []).append(im)
    plans: dict[str, SplitPlan] = {}
    for split, ims in by_split.items():
        ims = list(opts.limited(ims))
        plan = SplitPlan([])
        folders: dict[str, set[str]] = {}
        seen: set[str] = set()
        for im in ims:
            where = f"{path}: image {im.get('filename', '?')}"
            ident = image_id(im)
            file = image_path(im)
            folder, name = posixpath.split(file) if "://" in file else os.path.split(file)
            if folder not in folders:
                require_dir(folder, f"the image folder named by the filepath/filename of images in {path}")
                folders[folder] = list_names(folder)
            key = safe_key(ident)
            if key in seen:
                problems.add(split, "duplicate_id", ident)
                continue
            seen.add(key)
            if name not in folders[folder]:
                problems.add(split, "missing_image", ident, file)
                continue
            sentences = field_of(im, "sentences", where)
            caps = take_captions([field_of(s, "raw", where) for s in sentences], opts, problems, split, ident, plan.stats)
            if caps is None:
                continue
            rec = {"key": key, "image_id": ident, "split": split, "path": file, "captions": caps,
                   "meta": {"source_split": im["split"], "filename": im.get("filename", name)}}
            plan.records.append(rec)
        plans[split] = plan
    return plans


def verify_records(plans: dict[str, SplitPlan], problems: Problems, opts: ConvertOptions, dataset: str) -> None:
    """With ``opts.verify_images``: decode every planned image; unreadable ones become problems."""
    if not opts.verify_images:
        return
    for split, plan in plans.items():
        results = probe_images([r["path"] for r in plan.records], opts.workers, True, opts.progress, f"{dataset}/{split} verify")
        keep = []
        for rec, res in zip(plan.records, results):
            if isinstance(res, str):
                problems.add(split, "unreadable_image", rec["image_id"], res)
            else:
                keep.append(rec)
        plan.records = keep


def options_info(opts: ConvertOptions, **more: Any) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    for k in ("workers", "use_ray", "ray_address", "progress", "maxcount"):
        d.pop(k)
    d["splits"] = list(d["splits"])
    return {**d, **more}


__all__ = [
    "ConversionError", "ConvertOptions", "Problems", "SplitPlan", "ImageSampleBuilder", "NpyRows",
    "PLACEHOLDER_PNG", "write_plans", "write_records", "karpathy_records", "take_captions", "load_image",
    "exists", "filesystem", "isdir", "list_names",
]
