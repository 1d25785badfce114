"""MS-COCO captions into shards: the official annotations, or Karpathy's split file.

Official layout (``--coco-root DIR``)::

    DIR/annotations/captions_train2014.json   {"images": [{"id", "file_name", "width", "height"}],
    DIR/annotations/captions_val2014.json      "annotations": [{"id", "image_id", "caption"}]}
    DIR/train2014/COCO_train2014_000000xxxxxx.jpg
    DIR/val2014/COCO_val2014_000000xxxxxx.jpg

gives splits ``train`` (train2014) and ``val`` (val2014), images in id order, captions in
annotation-id order. ``year=2017`` reads ``captions_train2017.json`` and ``train2017/`` instead.
The image folders may also sit in ``DIR/images/`` (``DIR/images/train2014``: the layout of LAVIS
and Karpathy's tools), or anywhere with ``images=`` (``--images``) naming their parent folder.

Karpathy layout (``--karpathy dataset_coco.json``): ``images[]`` with ``filepath`` (train2014 or
val2014, relative to the COCO root), ``filename``, ``cocoid``, ``split`` in train / restval / val
/ test and ``sentences[].raw``. ``restval`` folds into ``train`` (113,287 training images, the
protocol of Karpathy & Fei-Fei, VSE++, SCAN and RDAN) unless ``keep_restval``.

Each sample: the image file byte for byte (unless ``max_side``), json ``image_id`` = the COCO id
(int), the first ``captions_per_image`` captions (default 5; the few images with 6-7 captions lose
the extras, counted in the manifest), ``file_name`` and ``source_split``.
"""

from __future__ import annotations

from typing import Any

from xray_match.data.convert.captions import take_captions
from xray_match.data.convert.images import ImageSampleBuilder, verify_records
from xray_match.data.convert.inputs import field_of, read_json, require_dir
from xray_match.data.convert.karpathy import karpathy_records
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, options_info, safe_key
from xray_match.data.convert.write import write_plans
from xray_match.data.format import Manifest, join
from xray_match.data.io import exists, isdir, list_names


def find_image_folder(coco_root: str, part: str, images: str | None = None) -> str:
    """The folder of COCO's ``part`` images (``train2014``, ...): ``images/part`` when ``images``
    names their parent, else the first that exists of ``coco_root/part`` (the layout of
    cocodataset.org's zips) and ``coco_root/images/part`` (LAVIS, Karpathy's tools)."""
    tried = [join(images, part)] if images else [join(coco_root, part), join(coco_root, "images", part)]
    for folder in tried:
        if isdir(folder):
            return folder
    nor = f" (nor {', '.join(tried[1:])})" if len(tried) > 1 else ""
    raise ConversionError(f"{tried[0]}: the {part} image folder not found{nor}; pass --images DIR, the folder that holds {part}/")


def convert_coco(
    out: str,
    coco_root: str,
    *,
    karpathy: str | None = None,
    keep_restval: bool = False,
    year: int = 2014,
    images: str | None = None,
    opts: ConvertOptions | None = None,
) -> Manifest:
    """Convert COCO captions under ``coco_root`` into shards at ``out`` (path or fsspec URL);
    ``images`` is the folder holding ``train2014/`` and ``val2014/`` when they are not in
    ``coco_root`` or ``coco_root/images``."""
    opts = opts or ConvertOptions()
    require_dir(coco_root, "the COCO root")
    if karpathy:
        dataset = "coco-karpathy"
        problems = Problems(dataset)
        folders: dict[str, str] = {}

        def image_path(im: dict[str, Any]) -> str:
            where = f"{karpathy}: image {im.get('filename', '?')}"
            part = field_of(im, "filepath", where)
            if part not in folders:
                folders[part] = find_image_folder(coco_root, part, images)
            return join(folders[part], field_of(im, "filename", where))

        def image_id(im: dict[str, Any]) -> int:
            return int(field_of(im, "cocoid", f"{karpathy}: image {im.get('filename', '?')}"))

        split_map = {} if keep_restval else {"restval": "train"}
        plans = karpathy_records(karpathy, image_path, image_id, split_map, opts, problems, dataset)
        source = {"coco_root": coco_root, "images": images, "karpathy": karpathy}
    else:
        dataset = "coco"
        problems = Problems(dataset)
        plans = _official_plans(coco_root, images, year, opts, problems)
        source = {"coco_root": coco_root, "images": images, "year": year}
    verify_records(plans, problems, opts, dataset)
    info = {
        "converter": "coco",
        "source": source,
        "options": options_info(opts, keep_restval=keep_restval, year=year),
        "pixels": True,
        "split_scheme": "karpathy" + ("" if keep_restval else " (restval in train)") if karpathy else f"official {year}",
    }
    return write_plans(out, dataset, plans, problems, ImageSampleBuilder(opts.max_side), opts, info)


def _official_plans(
    coco_root: str, images: str | None, year: int, opts: ConvertOptions, problems: Problems
) -> dict[str, SplitPlan]:
    plans: dict[str, SplitPlan] = {}
    for split in ("train", "val"):
        if not opts.wants(split):
            continue
        part = f"{split}{year}"
        ann = join(coco_root, "annotations", f"captions_{part}.json")
        if not exists(ann):
            raise ConversionError(f"{ann}: no such file (to convert only some splits, pass --splits)")
        plans[split] = _plan_part(ann, find_image_folder(coco_root, part, images), part, split, opts, problems)
    if not plans:
        raise ConversionError(f"coco: none of the splits {list(opts.splits)} exists (official splits: train, val)")
    return plans


def _plan_part(ann: str, folder: str, part: str, split: str, opts: ConvertOptions, problems: Problems) -> SplitPlan:
    doc = read_json(ann)
    images = field_of(doc, "images", ann)
    annotations = field_of(doc, "annotations", ann)
    by_id: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(images):
        iid = int(field_of(im, "id", f"{ann}: images[{i}]"))
        if iid in by_id:
            problems.add(split, "duplicate_id", iid, ann)
            continue
        by_id[iid] = im
    captions: dict[int, list[tuple[int, str]]] = {}
    for i, a in enumerate(annotations):
        where = f"{ann}: annotations[{i}]"
        iid = int(field_of(a, "image_id", where))
        if iid not in by_id:
            problems.add(split, "caption_for_unknown_image", iid, f"annotation id {a.get('id', '?')}")
            continue
        captions.setdefault(iid, []).append((int(a.get("id", i)), field_of(a, "caption", where)))
    names = list_names(folder)
    plan = SplitPlan([])
    for iid in opts.limited(sorted(by_id)):
        im = by_id[iid]
        file_name = field_of(im, "file_name", f"{ann}: image id {iid}")
        if file_name not in names:
            problems.add(split, "missing_image", iid, join(part, file_name))
            continue
        caps = take_captions([c for _, c in sorted(captions.get(iid, []))], opts, problems, split, iid, plan.stats)
        if caps is None:
            continue
        plan.records.append({
            "key": safe_key(iid), "image_id": iid, "split": split, "path": join(folder, file_name), "captions": caps,
            "meta": {"file_name": file_name, "source_split": part},
        })
    return plan
