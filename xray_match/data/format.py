"""The xray_match shard format (documented in docs/shards.md).

A data set is a folder (local path or fsspec URL) holding ``manifest.json`` and WebDataset tar
shards named ``{split}-{index:06d}.tar``. While a writer works on the folder its manifest says
``"complete": false``; readers refuse such a folder. Readers open only the shards the manifest
lists, never what a listing finds: an object a killed writer left beside them is not data (verify
names it, the writer's next run deletes it). This is what makes a folder on an object store,
where nothing can be renamed, complete or refused: each shard and each manifest version appears
whole on its one upload, and the upload that says ``"complete": true`` comes last
(docs/shards.md). Each sample in a shard has the files

    <key>.jpg | <key>.png   the image (required, exactly one)
    <key>.json              metadata (required, see :func:`check_meta`)
    <key>.saliency.png      gaze / saliency map, 8-bit grey, same size as the image (optional)
    <key>.regions.npy       precomputed region features, float (k, d) (optional)
    <key>.boxes.npy         boxes of those regions, float (k, 4) x0 y0 x1 y1 in pixels (optional)

Readers refuse a manifest or sample whose ``format_version`` they do not know.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from xray_match.data.io import atomic_write_bytes, open_url

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png")
_SHARD_NAME = re.compile(r"^.+-\d{6}\.tar$")


class ShardFormatError(ValueError):
    """A shard, sample or manifest does not follow the format (message names file and key)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    """A name :func:`shard_name` could have given (of any split)."""
    return bool(_SHARD_NAME.match(name))


def join(root: str, *parts: str) -> str:
    """Join a local path or URL."""
    if "://" in root:
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int = 0


@dataclass
class Manifest:
    """``manifest.json``: format version, data set name, shards per split, free-form info.

    ``complete`` is False from a writer's first step until its last shard is listed, so that a
    folder a crashed or failed conversion left behind is never read as a data set. Manifests
    written before the flag existed have no such field and count as complete."""

    dataset: str
    format_version: int = FORMAT_VERSION
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    @property
    def has_pixels(self) -> bool:
        """False for shards converted without pixels (``info.convert.pixels: false``, precomputed
        regions only); True otherwise."""
        return self.info.get("convert", {}).get("pixels", True) is not False

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards(split))

    def plan(self) -> dict[str, int]:
        """Samples per split that its writer set out to write: a converter's image count
        (``info.convert.splits.<split>.images``, known for every split before the first shard),
        then the shard writer's (``info.splits.<split>.num_samples``)."""
        planned = {sp: s["images"] for sp, s in self.info.get("convert", {}).get("splits", {}).items() if "images" in s}
        planned.update({sp: s["num_samples"] for sp, s in self.info.get("splits", {}).items() if "num_samples" in s})
        return planned

    def shard_names(self) -> set[str]:
        return {s.name for shards in self.splits.values() for s in shards}

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ShardFormatError(f"{MANIFEST}: no split {split!r} (have: {', '.join(sorted(self.splits)) or 'none'})")
        return self.splits[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "complete": self.complete,
            "info": self.info,
            "splits": {
                sp: {"count": sum(s.count for s in shards), "shards": [vars(s) for s in shards]}
                for sp, shards in sorted(self.splits.items())
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardFormatError(f"{where}: format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
        try:
            splits = {
                sp: [ShardInfo(**s) for s in body["shards"]] for sp, body in d.get("splits", {}).items()
            }
            return cls(dataset=d["dataset"], format_version=version, splits=splits, info=d.get("info", {}),
                       complete=d.get("complete", True) is not False)
        except (KeyError, TypeError) as e:
            raise ShardFormatError(f"{where}: malformed manifest ({e})") from None


def find_manifest(root: str) -> Manifest | None:
    """The folder's manifest, complete or not; None when it has none."""
    path = join(root, MANIFEST)
    try:
        with open_url(path, "r") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_json(d, where=path)


def read_manifest(root: str, allow_incomplete: bool = False) -> Manifest:
    """The manifest of a data set to read. A folder whose writer has not finished is refused
    (``allow_incomplete`` is for the writer resuming it and for ``verify``)."""
    manifest = find_manifest(root)
    if manifest is None:
        raise ShardFormatError(f"{join(root, MANIFEST)}: no manifest (is {root!r} an xray_match shard folder?)")
    if not manifest.complete and not allow_incomplete:
        raise ShardFormatError(incomplete_problem(root))
    return manifest


def incomplete_problem(root: str) -> str:
    return f"{join(root, MANIFEST)}: incomplete: its writer has not finished (re-run it to resume)"


def count_problems(root: str, manifest: Manifest) -> list[str]:
    """One line per split whose listed shards hold another number of samples than planned."""
    return [
        f"{join(root, MANIFEST)}: split {split!r} has {have} samples, the plan is {planned}"
        for split, planned in sorted(manifest.plan().items())
        if (have := sum(s.count for s in manifest.splits.get(split, []))) != planned
    ]


def write_manifest(root: str, manifest: Manifest) -> None:
    """Atomically replace the manifest (temp name, then rename; on an object store one PUT, which
    makes the new manifest appear whole)."""
    atomic_write_bytes(join(root, MANIFEST), json.dumps(manifest.to_json(), indent=1).encode())


# ----------------------------------------------------------------------------- samples


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes (0 when both are empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check_meta(meta: Any, where: str, width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """Validate one sample's ``json``; ``where`` names shard and key in the error.

    Required: ``image_id`` (str|int), ``split`` (str), ``captions`` (non-empty list of non-empty str).
    Optional: ``width``/``height``; ``objects``: ``[{"box": [x0, y0, x1, y1], "label": str, ...}]`` in
    pixels with 0 <= x0 < x1 <= width (likewise y); ``phrases``: per caption a list of
    ``{"text", "start", "end", "object"}`` linking a character span to an object index.
    """
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: json is not an object")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{where}: json.format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
    for k in ("image_id", "split", "captions"):
        if k not in meta:
            raise ShardFormatError(f"{where}: json has no {k!r}")
    if isinstance(meta["image_id"], bool) or not isinstance(meta["image_id"], (str, int)):
        raise ShardFormatError(f"{where}: json.image_id {meta['image_id']!r} is not a string or an integer")
    caps = meta["captions"]
    if not isinstance(caps, list) or not caps:
        raise ShardFormatError(f"{where}: json.captions is missing or empty")
    for i, c in enumerate(caps):
        if not isinstance(c, str) or not c.strip():
            raise ShardFormatError(f"{where}: json.captions[{i}] is not a non-empty string")
    width = width if width is not None else meta.get("width")
    height = height if height is not None else meta.get("height")
    objects = meta.get("objects", [])
    for i, ob in enumerate(objects):
        box = ob.get("box") if isinstance(ob, dict) else None
        if not (isinstance(box, list) and len(box) == 4):
            raise ShardFormatError(f"{where}: json.objects[{i}].box must be [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1 and x0 >= 0 and y0 >= 0):
            raise ShardFormatError(f"{where}: json.objects[{i}].box {box} is empty or negative")
        if width is not None and height is not None and (x1 > width or y1 > height):
            raise ShardFormatError(f"{where}: json.objects[{i}].box {box} lies outside the {width}x{height} image")
    phrases = meta.get("phrases")
    if phrases is not None:
        if len(phrases) != len(caps):
            raise ShardFormatError(f"{where}: json.phrases has {len(phrases)} entries for {len(caps)} captions")
        for ci, plist in enumerate(phrases):
            for pi, p in enumerate(plist):
                ob = p.get("object")
                if not isinstance(ob, int) or not 0 <= ob < len(objects):
                    raise ShardFormatError(f"{where}: json.phrases[{ci}][{pi}].object {ob!r} names no object")
                if caps[ci][p["start"] : p["end"]] != p["text"]:
                    raise ShardFormatError(f"{where}: json.phrases[{ci}][{pi}] span does not match its text")
    return meta


def image_key(sample: dict[str, Any]) -> str:
    """The extension under which a raw sample holds its image."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise ShardFormatError(f"{sample_where(sample)}: no image (.jpg or .png)")


def sample_where(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: key {sample.get('__key__', '?')!r}"
