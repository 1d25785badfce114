"""The plan of a conversion: its options, its records and the mismatches found in its input.

Planning runs on the driver and is cheap: a converter reads the annotation files, lists the image
folders and turns each image into a small JSON-able *record* (paths, captions, boxes in source
pixels) of a :class:`SplitPlan`. Every mismatch in the input (an id with captions but no image
file, a SALICON map for an unknown image, a box outside its image, a wrong caption count, ...) is
added to :class:`Problems`. Before anything is written, :meth:`Problems.resolve` either raises
:class:`ConversionError` listing the offending ids (first 20 per kind, plus the count), or, with
``skip_bad``, drops those images and returns the counts that go into the manifest. A data set is
never silently smaller than its input.
"""

from __future__ import annotations

import dataclasses
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

#: how many offending ids an error message or the manifest lists per kind of problem
SHOW_IDS = 20


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



def options_info(opts: ConvertOptions, **more: Any) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    for k in ("workers", "use_ray", "ray_address", "progress", "maxcount"):
        d.pop(k)
    d["splits"] = list(d["splits"])
    return {**d, **more}


# ----------------------------------------------------------------------------- records and problems


@dataclass
class SplitPlan:
    records: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)  # e.g. captions_dropped, phrases_without_box


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(ident: Any) -> str:
    """A WebDataset key (no dots: the tar member's text after the first dot is the extension)."""
    return _KEY_BAD.sub("_", str(ident))


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


# ----------------------------------------------------------------------------- the process pool of planning


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
