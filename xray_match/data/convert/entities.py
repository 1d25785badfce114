"""Flickr30k Entities into shards: captions with phrase -> box links.

Layout (Plummer et al., ICCV 2015)::

    ENTITIES/Annotations/<id>.xml   PASCAL-VOC-like: <size><width/><height/></size>, per box an
                                    <object> with one or more <name>entity id</name> and a
                                    <bndbox><xmin/><ymin/><xmax/><ymax/></bndbox> (1-based, inclusive),
                                    or <nobndbox>1</nobndbox> / <scene>1</scene> and no box
    ENTITIES/Sentences/<id>.txt     five lines of phrase markup:
                                    [/EN#18/people A child] in [/EN#19/clothing a pink dress] ...
    ENTITIES/{train,val,test}.txt   Flickr ids per split (29,783 / 1,000 / 1,000); without
                                    them every annotated image goes to one split ``all``
    IMAGES/<id>.jpg                 the Flickr30k images

Readings chosen (documented in docs/data.md):

* Boxes: the XML holds 1-based inclusive pixel indices; our boxes are continuous pixel edges,
  so ``[xmin, ymin, xmax, ymax]`` becomes ``[xmin - 1, ymin - 1, xmax, ymax]``.
* One ``object`` per entity that has boxes: ``box`` is the union of its boxes (the standard
  phrase-localization protocol for entities such as "two men" with several boxes), ``boxes`` the
  individual ones, ``label`` the entity type of its first mention (people, clothing, ...),
  ``label_id`` the type's index in :data:`ENTITY_TYPES`, ``entity_id`` the annotation id.
* Captions are the sentences with the markup removed, words joined by single spaces; each phrase
  of an entity with boxes becomes ``{"text", "start", "end", "object", "entity_id", "type"}`` with
  ``caption[start:end] == text``. Phrases of entities without a box (``notvisual``, ``scene``,
  ``nobndbox``) have nothing to point at: they are counted (``stats.phrases_without_box``).
* The XML's image size must equal the real image's, and every box must lie inside the image;
  otherwise the image is a problem (error, or skipped with ``--skip-bad``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from xray_match.data.convert.flickr30k import ONE_SPLIT, id_order, read_split_lists
from xray_match.data.convert.images import ImageSampleBuilder, box_problem, image_size
from xray_match.data.convert.inputs import read_bytes, read_lines, require_dir
from xray_match.data.convert.plan import (
    ConversionError,
    ConvertOptions,
    Problems,
    SplitPlan,
    options_info,
    pool_map,
    safe_key,
)
from xray_match.data.convert.write import write_plans
from xray_match.data.format import Manifest, join
from xray_match.data.io import list_names

DATASET = "flickr30k-entities"
ENTITY_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other", "notvisual")


class MarkupError(ValueError):
    pass


def parse_sentence(line: str) -> tuple[str, list[dict[str, Any]]]:
    """One line of ``Sentences/<id>.txt`` -> (clean caption, phrases with character spans).

    >>> parse_sentence("[/EN#18/people A child] in [/EN#19/clothing a pink dress] .")
    ('A child in a pink dress .', [{'text': 'A child', 'start': 0, 'end': 7, 'entity_id': 18, 'types': ['people']}, \
{'text': 'a pink dress', 'start': 11, 'end': 23, 'entity_id': 19, 'types': ['clothing']}])
    """
    words: list[str] = []
    spans: list[tuple[int, int, int, list[str]]] = []  # (first word, end word, entity id, types)
    open_: tuple[int, int, list[str]] | None = None
    for tok in line.split():
        if open_ is None and tok.startswith("[/EN#"):
            parts = tok[1:].split("/")  # ['', 'EN#18', 'people', ...]
            eid = parts[1][3:]
            if not eid.isdigit() or len(parts) < 3 or tok.endswith("]"):
                raise MarkupError(f"bad phrase header {tok!r}")
            open_ = (len(words), int(eid), [t for t in parts[2:] if t])
            continue
        if open_ is not None and tok.endswith("]"):
            tok = tok[:-1]
            if tok:
                words.append(tok)
            first, eid, types = open_
            if len(words) == first:
                raise MarkupError(f"empty phrase for entity {eid}")
            spans.append((first, len(words), eid, types))
            open_ = None
            continue
        if tok.startswith("[/EN#"):
            raise MarkupError(f"phrase opened inside another: {tok!r}")
        words.append(tok)
    if open_ is not None:
        raise MarkupError(f"phrase for entity {open_[1]} is never closed")
    starts = []  # character offset of each word in " ".join(words)
    pos = 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    text = " ".join(words)
    phrases = []
    for first, end, eid, types in spans:
        s, e = starts[first], starts[end - 1] + len(words[end - 1])
        phrases.append({"text": text[s:e], "start": s, "end": e, "entity_id": eid, "types": types})
    return text, phrases


def parse_annotation(data: bytes, where: str) -> tuple[int, int, dict[int, list[list[float]]]]:
    """An ``Annotations/<id>.xml`` -> (width, height, {entity id: [box, ...]}) with boxes as
    continuous pixel edges ``[xmin - 1, ymin - 1, xmax, ymax]``."""
    try:
        root = ET.fromstring(data)
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise MarkupError(f"{where}: unreadable annotation ({e})") from None
    boxes: dict[int, list[list[float]]] = {}
    for ob in root.findall("object"):
        bnd = ob.find("bndbox")
        if bnd is None:
            continue  # nobndbox / scene: the entity has no box
        try:
            xmin, ymin, xmax, ymax = (float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise MarkupError(f"{where}: an <object> has an incomplete <bndbox>") from None
        for name in ob.findall("name"):
            if not (name.text or "").strip().isdigit():
                raise MarkupError(f"{where}: <name>{name.text}</name> is not an entity id")
            boxes.setdefault(int(name.text), []).append([xmin - 1, ymin - 1, xmax, ymax])
    return width, height, boxes


def _plan_one(job: tuple[Any, ...]) -> tuple[dict[str, Any] | None, list[tuple[str, Any, str]], dict[str, int]]:
    """One image -> (record or None, problems [(kind, id, detail)], stats). Runs in a process pool."""
    fid, split, ann_path, sen_path, img_path, n_caps, full_decode = job
    ident = int(fid) if fid.isdigit() else fid
    stats: dict[str, int] = {}
    try:
        width, height, boxes = parse_annotation(read_bytes(ann_path), ann_path)
        lines = [ln for ln in read_lines(sen_path) if ln.strip()]
        parsed = [parse_sentence(ln) for ln in lines]
    except (MarkupError, ConversionError) as e:
        return None, [("bad_markup", ident, str(e))], stats
    try:
        real = image_size(img_path, full_decode=full_decode)
    except ConversionError as e:
        return None, [("unreadable_image", ident, str(e))], stats
    if real != (width, height):
        return None, [("size_mismatch", ident, f"xml says {width}x{height}, image is {real[0]}x{real[1]}")], stats
    if n_caps and len(parsed) < n_caps:
        return None, [("too_few_captions", ident, f"{len(parsed)} sentences, need {n_caps}")], stats
    if n_caps and len(parsed) > n_caps:
        stats["captions_dropped"] = len(parsed) - n_caps
        parsed = parsed[:n_caps]
    if any(not t for t, _ in parsed):
        return None, [("empty_caption", ident, sen_path)], stats
    for eid, bs in sorted(boxes.items()):
        for b in bs:
            why = box_problem(b, width, height)
            if why:
                return None, [("box_outside_image", ident, f"entity {eid}: {why}")], stats
    first_type: dict[int, str] = {}
    for _, phrases in parsed:
        for p in phrases:
            first_type.setdefault(p["entity_id"], p["types"][0] if p["types"] else "other")
    index: dict[int, int] = {}
    objects = []
    for eid, bs in sorted(boxes.items()):
        label = first_type.get(eid, "other")
        index[eid] = len(objects)
        union = [min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)]
        objects.append({
            "box": union, "boxes": bs, "label": label,
            "label_id": ENTITY_TYPES.index(label) if label in ENTITY_TYPES else -1, "entity_id": eid,
        })
    captions, links = [], []
    for text, phrases in parsed:
        captions.append(text)
        linked = []
        for p in phrases:
            if p["entity_id"] not in index:
                stats["phrases_without_box"] = stats.get("phrases_without_box", 0) + 1
                continue
            stats["phrases"] = stats.get("phrases", 0) + 1
            linked.append({"text": p["text"], "start": p["start"], "end": p["end"], "object": index[p["entity_id"]],
                           "entity_id": p["entity_id"], "type": p["types"][0] if p["types"] else "other"})
        links.append(linked)
    record = {"key": safe_key(ident), "image_id": ident, "split": split, "path": img_path, "captions": captions,
              "objects": objects, "phrases": links, "meta": {"filename": f"{fid}.jpg"}}
    return record, [], stats


def convert_entities(
    out: str,
    images: str,
    entities: str,
    *,
    split_lists: str | None = None,
    opts: ConvertOptions | None = None,
) -> Manifest:
    """Convert Flickr30k Entities (``entities`` holds Annotations/, Sentences/ and the split
    lists unless ``split_lists`` names another folder) with the images in ``images``. Without
    lists in ``entities`` (and no ``split_lists``), every image with an annotation or sentence
    file goes to one split ``all``, as ``flickr30k --token`` does without ``--split-lists``."""
    opts = opts or ConvertOptions()
    require_dir(images, "the flickr30k-images folder")
    ann_dir, sen_dir = join(entities, "Annotations"), join(entities, "Sentences")
    require_dir(ann_dir, "Flickr30k Entities Annotations/")
    require_dir(sen_dir, "Flickr30k Entities Sentences/")
    lists = read_split_lists(split_lists or entities, "Flickr30k Entities split lists", required=bool(split_lists))
    problems = Problems(DATASET)
    anns, sens, imgs = list_names(ann_dir), list_names(sen_dir), list_names(images)
    listed = bool(lists)
    if not listed:  # the union, so that an image with one file but not the other is a problem, not left out
        stems = {n[: -len(".xml")] for n in anns if n.endswith(".xml")} | {n[: -len(".txt")] for n in sens if n.endswith(".txt")}
        lists = {"all": id_order(stems)}
    plans: dict[str, SplitPlan] = {}
    seen: dict[str, str] = {}
    for split, ids in lists.items():
        if not opts.wants(split):
            continue
        jobs = []
        for fid in opts.limited(ids):
            ident = int(fid) if fid.isdigit() else fid
            if fid in seen:
                problems.add(split, "in_two_splits", ident, f"also in {seen[fid]}")
                continue
            seen[fid] = split
            missing = [what for what, names, name in (
                ("annotation", anns, f"{fid}.xml"), ("sentences", sens, f"{fid}.txt"), ("image", imgs, f"{fid}.jpg"))
                if name not in names]
            if "image" in missing:
                problems.add(split, "missing_image", ident, join(images, f"{fid}.jpg"))
                continue
            if missing:
                problems.add(split, f"missing_{missing[0]}", ident)
                continue
            jobs.append((fid, split, join(ann_dir, f"{fid}.xml"), join(sen_dir, f"{fid}.txt"), join(images, f"{fid}.jpg"),
                         opts.captions_per_image, opts.verify_images))
        plan = SplitPlan([])
        for record, probs, stats in pool_map(_plan_one, jobs, opts.workers, opts.progress, f"{DATASET}/{split} plan"):
            for kind, ident, detail in probs:
                problems.add(split, kind, ident, detail)
            for k, v in stats.items():
                plan.stats[k] = plan.stats.get(k, 0) + v
            if record is not None:
                plan.records.append(record)
        plans[split] = plan
    if not plans:
        raise ConversionError(f"{DATASET}: none of the splits {list(opts.splits)} exists (have: {', '.join(lists)})")
    info = {
        "converter": "flickr30k-entities",
        "source": {"images": images, "entities": entities, "split_lists": (split_lists or entities) if listed else None},
        "options": options_info(opts), "pixels": True,
        "split_scheme": "Flickr30k Entities lists" if listed else ONE_SPLIT,
        "entity_types": list(ENTITY_TYPES),
        "box_convention": "union of the entity's boxes; XML 1-based inclusive -> [xmin-1, ymin-1, xmax, ymax]",
    }
    return write_plans(out, DATASET, plans, problems, ImageSampleBuilder(opts.max_side), opts, info)
