"""Flickr30k into shards: Karpathy's split file, or the original ``results_20130124.token``.

Images: ``flickr30k-images/<flickr id>.jpg``.

Karpathy (``--karpathy dataset_flickr30k.json``): ``images[]`` with ``filename``, ``split`` in
train / val / test (29,000 / 1,014 / 1,000 images, the RDAN protocol: 1,000 val + 1,000 test)
and ``sentences[].raw``.

Token file (``--token results_20130124.token``): one caption a line, ``<file>#<n>\\t<caption>``.
The token file holds no splits: with ``--split-lists DIR`` the splits come from ``DIR/train.txt``,
``val.txt`` and ``test.txt`` (one Flickr id a line; the files Flickr30k Entities publishes);
without, every image goes to one split named ``all``. Images that no list names are left out and
counted in the manifest (``info.convert.source.unlisted_images``).

``image_id`` is the Flickr photo id (int), the same id Flickr30k Entities uses.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Iterable

from xray_match.data.convert.captions import take_captions
from xray_match.data.convert.images import ImageSampleBuilder, verify_records
from xray_match.data.convert.inputs import field_of, read_lines, require_dir
from xray_match.data.convert.karpathy import karpathy_records
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, options_info, safe_key
from xray_match.data.convert.write import write_plans
from xray_match.data.format import Manifest, join
from xray_match.data.io import exists, list_names

SPLITS = ("train", "val", "test")
#: ``split_scheme`` of a conversion without split lists: every image in one split ``all``
ONE_SPLIT = "none (one split 'all')"


def flickr_id(name: str) -> int | str:
    """``1000092795.jpg`` -> 1000092795 (int when numeric)."""
    stem = posixpath.basename(name).split(".")[0]
    return int(stem) if stem.isdigit() else stem


def id_order(stems: Iterable[str]) -> list[str]:
    """Flickr ids in numeric order (non-numeric names after them, by name): a deterministic order
    for a split ``all`` that no list orders."""
    return sorted(stems, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def read_split_lists(folder: str, what: str, required: bool = True) -> dict[str, list[str]]:
    """``{split: [id, ...]}`` from ``folder/{train,val,test}.txt`` (blank lines ignored); empty
    when there are none and they are not ``required``."""
    lists = {}
    for split in SPLITS:
        path = join(folder, f"{split}.txt")
        if exists(path):
            lists[split] = [ln.strip() for ln in read_lines(path) if ln.strip()]
    if not lists and required:
        raise ConversionError(f"{folder}: no train.txt, val.txt or test.txt ({what})")
    return lists


def convert_flickr30k(
    out: str,
    images: str,
    *,
    karpathy: str | None = None,
    token: str | None = None,
    split_lists: str | None = None,
    opts: ConvertOptions | None = None,
) -> Manifest:
    """Convert Flickr30k (images folder + one caption source) into shards at ``out``."""
    opts = opts or ConvertOptions()
    if bool(karpathy) == bool(token):
        raise ConversionError("flickr30k: give exactly one caption source: --karpathy dataset_flickr30k.json or --token results_20130124.token")
    require_dir(images, "the flickr30k-images folder")
    if karpathy:
        dataset = "flickr30k-karpathy"
        problems = Problems(dataset)

        def image_path(im: dict[str, Any]) -> str:
            return join(images, field_of(im, "filename", f"{karpathy}: image {im.get('imgid', '?')}"))

        def image_id(im: dict[str, Any]) -> int | str:
            return flickr_id(field_of(im, "filename", f"{karpathy}: image {im.get('imgid', '?')}"))

        plans = karpathy_records(karpathy, image_path, image_id, {}, opts, problems, dataset)
        source: dict[str, Any] = {"images": images, "karpathy": karpathy}
    else:
        dataset = "flickr30k"
        problems = Problems(dataset)
        plans, unlisted = _token_plans(images, token, split_lists, opts, problems)
        source = {"images": images, "token": token, "split_lists": split_lists, "unlisted_images": unlisted}
    verify_records(plans, problems, opts, dataset)
    info = {
        "converter": "flickr30k", "source": source, "options": options_info(opts), "pixels": True,
        "split_scheme": "karpathy" if karpathy else ("split lists" if split_lists else ONE_SPLIT),
    }
    return write_plans(out, dataset, plans, problems, ImageSampleBuilder(opts.max_side), opts, info)


def parse_token_file(path: str, problems: Problems) -> dict[str, dict[int, str]]:
    """``{file name: {caption number: caption}}``; malformed lines become problems."""
    caps: dict[str, dict[int, str]] = {}
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        head, tab, text = line.partition("\t")
        name, hash_, num = head.partition("#")
        if not tab or not hash_ or not num.strip().isdigit() or not name:
            problems.add("token file", "bad_line", f"line {n}", repr(line[:60]))
            continue
        k = int(num)
        if k in caps.setdefault(name, {}):
            problems.add("token file", "duplicate_caption", name, f"{name}#{k} again on line {n}")
            continue
        caps[name][k] = text
    return caps


def _token_plans(
    images: str, token: str, split_lists: str | None, opts: ConvertOptions, problems: Problems
) -> tuple[dict[str, SplitPlan], int]:
    """Plans per split, and how many captioned images no split list names."""
    caps = parse_token_file(token, problems)
    by_stem = {os.path.splitext(name)[0]: name for name in caps}
    if split_lists:
        lists = read_split_lists(split_lists, "the --split-lists folder")
    else:
        lists = {"all": id_order(by_stem)}
    listed: dict[str, str] = {}
    for split, ids in lists.items():
        for i in ids:
            if i in listed:
                problems.add(split, "in_two_splits", i, f"also in {listed[i]}")
            else:
                listed[i] = split
    names = list_names(images)
    plans: dict[str, SplitPlan] = {}
    for split, ids in lists.items():
        if not opts.wants(split):
            continue
        plan = SplitPlan([])
        for stem in opts.limited(ids):
            if listed.get(stem) != split:
                continue  # listed twice: already a problem
            name = by_stem.get(stem)
            if name is None:
                problems.add(split, "no_captions", stem, f"not in {posixpath.basename(token)}")
                continue
            if name not in names:
                problems.add(split, "missing_image", stem, join(images, name))
                continue
            ident = flickr_id(name)
            got = take_captions([t for _, t in sorted(caps[name].items())], opts, problems, split, ident, plan.stats)
            if got is None:
                continue
            plan.records.append({"key": safe_key(ident), "image_id": ident, "split": split, "path": join(images, name),
                                 "captions": got, "meta": {"filename": name}})
        plans[split] = plan
    if not plans:
        raise ConversionError(f"flickr30k: none of the splits {list(opts.splits)} exists (have: {', '.join(lists)})")
    return plans, sum(1 for s in by_stem if s not in listed)
