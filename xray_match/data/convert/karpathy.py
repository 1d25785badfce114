"""Karpathy split files (``dataset_coco.json`` / ``dataset_flickr30k.json``), the published split of
COCO and Flickr30k that the retrieval protocols (Karpathy, SCAN) use."""

from __future__ import annotations

import os
import posixpath
from typing import Any, Callable

from xray_match.data.convert.captions import take_captions
from xray_match.data.convert.inputs import field_of, read_json, require_dir
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, safe_key
from xray_match.data.io import list_names


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
