"""Tiny data sets written in each real published layout (real JPEG/PNG/JSON/XML/TXT/NPY/MAT files).

Each ``make_*`` writes the files the way the data set ships them and returns what a test needs
to check the conversion (ids, captions, sizes, boxes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

# (width, height) of the fixture images by id: varied so that sizes are checked
SIZES = [(40, 30), (32, 48), (50, 50), (36, 28), (30, 40)]


def write_jpeg(path: str, width: int, height: int, seed: int) -> None:
    """A real JPEG: a colour gradient plus noise (so it is not trivially compressible)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), np.full_like(xx, seed * 37 % 256)], -1)
    img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=90)


def size_of(image_id: int) -> tuple[int, int]:
    return SIZES[image_id % len(SIZES)]


def captions_for(image_id: int, n: int = 5) -> list[str]:
    return [f"picture {image_id} shows thing {j}" for j in range(n)]


# ----------------------------------------------------------------------------- COCO


def coco_name(part: str, image_id: int) -> str:
    return f"COCO_{part}_{image_id:012d}.jpg"


def make_coco(
    root: str,
    train_ids: list[int] = (9, 25, 30),
    val_ids: list[int] = (42, 73),
    year: int = 2014,
    extra_captions: dict[int, int] | None = None,
    no_file: tuple[int, ...] = (),
    images_under: str = "",
) -> dict[str, Any]:
    """``root/annotations/captions_{train,val}{year}.json`` + ``root/{train,val}{year}/COCO_*.jpg``.

    ``extra_captions[id] = k`` gives image ``id`` 5 + k captions; ids in ``no_file`` get annotations
    but no image file; ``images_under="images"`` puts the image folders in ``root/images/`` (the
    layout of LAVIS and Karpathy's tools). Annotation ids are assigned in reverse caption order, so a converter that
    keeps file order instead of annotation-id order gets the captions backwards."""
    extra_captions = extra_captions or {}
    images_root = os.path.join(root, images_under) if images_under else root
    truth: dict[str, Any] = {"root": root, "images": images_root, "year": year, "captions": {}, "sizes": {}, "part": {}}
    ann_id = 10_000
    for split, ids in (("train", train_ids), ("val", val_ids)):
        part = f"{split}{year}"
        images, anns = [], []
        for iid in ids:
            w, h = size_of(iid)
            name = coco_name(part, iid) if year == 2014 else f"{iid:012d}.jpg"
            images.append({"id": iid, "file_name": name, "width": w, "height": h, "license": 1})
            caps = captions_for(iid, 5 + extra_captions.get(iid, 0))
            for c in reversed(caps):  # annotation ids decrease along the caption list
                anns.append({"id": ann_id - len(anns), "image_id": iid, "caption": c + " \n"})
            truth["captions"][iid] = caps
            truth["sizes"][iid] = (w, h)
            truth["part"][iid] = part
            if iid not in no_file:
                write_jpeg(os.path.join(images_root, part, name), w, h, seed=iid)
        ann_id += 1000
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        doc = {"info": {"year": year}, "licenses": [], "images": images[::-1], "annotations": anns}
        with open(os.path.join(root, "annotations", f"captions_{part}.json"), "w") as fh:
            json.dump(doc, fh)
    return truth


def make_karpathy_coco(path: str, coco: dict[str, Any], splits: dict[int, str]) -> str:
    """Karpathy's ``dataset_coco.json`` over the images of :func:`make_coco` (``splits[id]`` in
    train / restval / val / test)."""
    images = []
    for n, (iid, split) in enumerate(splits.items()):
        part = coco["part"][iid]
        images.append({
            "filepath": part, "filename": coco_name(part, iid), "cocoid": iid, "imgid": n, "split": split,
            "sentids": list(range(5 * n, 5 * n + 5)),
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 5 * n + j}
                          for j, c in enumerate(coco["captions"][iid])],
        })
    with open(path, "w") as fh:
        json.dump({"images": images, "dataset": "coco"}, fh)
    return path


# ----------------------------------------------------------------------------- Flickr30k + Entities


def make_flickr30k(root: str, splits: dict[str, list[int]], no_file: tuple[int, ...] = ()) -> dict[str, Any]:
    """``flickr30k-images/<id>.jpg``, ``dataset_flickr30k.json``, ``results_20130124.token`` and
    Entities-style ``train.txt``/``val.txt``/``test.txt`` split lists."""
    images_dir = os.path.join(root, "flickr30k-images")
    os.makedirs(images_dir, exist_ok=True)
    truth: dict[str, Any] = {"images": images_dir, "captions": {}, "splits": splits}
    kimages, token_lines = [], []
    n = 0
    for split, ids in splits.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
        for fid in ids:
            w, h = size_of(fid)
            if fid not in no_file:
                write_jpeg(os.path.join(images_dir, f"{fid}.jpg"), w, h, seed=fid)
            caps = captions_for(fid)
            truth["captions"][fid] = caps
            kimages.append({"filename": f"{fid}.jpg", "imgid": n, "split": split,
                            "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
            token_lines += [f"{fid}.jpg#{j}\t{c}" for j, c in enumerate(caps)]
            n += 1
    truth["karpathy"] = os.path.join(root, "dataset_flickr30k.json")
    with open(truth["karpathy"], "w") as fh:
        json.dump({"images": kimages, "dataset": "flickr30k"}, fh)
    truth["token"] = os.path.join(root, "results_20130124.token")
    # the token file lists an image's captions out of order on purpose (#4 first)
    token_lines = token_lines[4::5] + [ln for i, ln in enumerate(token_lines) if i % 5 != 4]
    with open(truth["token"], "w") as fh:
        fh.write("\n".join(token_lines) + "\n")
    truth["split_lists"] = root
    return truth


ENTITY_SENTENCES = [
    "[/EN#{a}/people A child] in [/EN#{b}/clothing a pink dress] is climbing up [/EN#0/notvisual it] .",
    "[/EN#{a}/people A little girl] wearing [/EN#{b}/clothing pink] near [/EN#{c}/scene the stairs] .",
    "[/EN#{a}/people/other A girl] climbs .",
    "[/EN#{b}/clothing The dress] is pink .",
    "Someone is climbing [/EN#{c}/scene stairs] .",
]
ENTITY_CLEAN = [
    "A child in a pink dress is climbing up it .",
    "A little girl wearing pink near the stairs .",
    "A girl climbs .",
    "The dress is pink .",
    "Someone is climbing stairs .",
]


def entity_boxes(fid: int) -> dict[str, Any]:
    """The XML content of image ``fid``: entity a (people) has two boxes, b (clothing) one and
    c (scene) none. Coordinates are 1-based inclusive, as in the data set."""
    w, h = size_of(fid)
    a, b, c = fid * 10 + 1, fid * 10 + 2, fid * 10 + 3
    return {
        "ids": (a, b, c), "size": (w, h),
        "boxes": {a: [[2, 3, 10, 12], [5, 1, 20, 9]], b: [[1, 1, w, h]]},  # b spans the whole image
    }


def make_entities(root: str, fids: list[int], bad_box: tuple[int, ...] = (), size_lie: tuple[int, ...] = ()) -> dict[str, Any]:
    """``Annotations/<id>.xml`` + ``Sentences/<id>.txt`` for images ``fids``. ``bad_box`` ids get
    a box past the image's right edge; ``size_lie`` ids state a wrong image size in the XML."""
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "Sentences"), exist_ok=True)
    truth = {}
    for fid in fids:
        eb = entity_boxes(fid)
        a, b, c = eb["ids"]
        w, h = eb["size"]
        objects = []
        for eid, boxes in eb["boxes"].items():
            for x0, y0, x1, y1 in boxes:
                if fid in bad_box and eid == b:
                    x1 = w + 5
                objects.append(
                    f"<object><name>{eid}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                    f"<ymax>{y1}</ymax></bndbox></object>"
                )
        objects.append(f"<object><name>{c}</name><scene>1</scene></object>")
        objects.append("<object><name>0</name><nobndbox>1</nobndbox></object>")
        xw, xh = (w + 1, h) if fid in size_lie else (w, h)
        xml = (f"<annotation><filename>{fid}.jpg</filename><size><width>{xw}</width><height>{xh}</height>"
               f"<depth>3</depth></size>{''.join(objects)}</annotation>")
        with open(os.path.join(root, "Annotations", f"{fid}.xml"), "w") as fh:
            fh.write(xml)
        with open(os.path.join(root, "Sentences", f"{fid}.txt"), "w") as fh:
            fh.write("\n".join(s.format(a=a, b=b, c=c) for s in ENTITY_SENTENCES) + "\n")
        truth[fid] = eb
    return truth


# ----------------------------------------------------------------------------- SALICON


def make_salicon(
    root: str, coco: dict[str, Any], train_ids: list[int], val_ids: list[int], unknown: tuple[int, ...] = (),
    fixations: bool = True,
) -> dict[str, Any]:
    """``maps/{train,val}/COCO_<part>_<id>.png`` (640x480 grey: left half 200, right half 50) and
    ``fixations/{train,val}/*.mat`` (two subjects) for COCO images of :func:`make_coco`.
    ``unknown`` ids get a map but are no COCO image."""
    from scipy.io import savemat

    year = coco["year"]
    sal = np.full((480, 640), 50, np.uint8)
    sal[:, :320] = 200
    for split, ids in (("train", train_ids), ("val", val_ids)):
        os.makedirs(os.path.join(root, "maps", split), exist_ok=True)
        for iid in list(ids) + [u for u in unknown if split == "train"]:
            part = f"{split}{year}"
            stem = coco_name(part, iid)[: -len(".jpg")]
            Image.fromarray(sal).save(os.path.join(root, "maps", split, f"{stem}.png"))
            if fixations:
                os.makedirs(os.path.join(root, "fixations", split), exist_ok=True)
                gaze = np.empty((2, 1), dtype=[("location", "O"), ("timestamp", "O"), ("fixations", "O")])
                gaze[0, 0] = (np.array([[1, 1]]), np.array([[0]]), np.array([[1, 1], [640, 480]]))
                gaze[1, 0] = (np.array([[1, 1]]), np.array([[0]]), np.array([[321, 241], [700, 10]]))  # 2nd is outside
                savemat(os.path.join(root, "fixations", split, f"{stem}.mat"),
                        {"image": stem, "resolution": np.array([[480, 640]]), "gaze": gaze})
    return {"root": root}


# ----------------------------------------------------------------------------- SCAN precomp


def make_precomp(
    root: str,
    counts: dict[str, int] = {"train": 3, "dev": 2, "test": 2},
    k: int = 36,
    d: int = 2048,
    ids: bool = True,
    boxes: bool = True,
    sizes: bool = True,
    caption_lines: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``<split>_ims.npy`` (N, k, d) float32, ``<split>_caps.txt`` (5 lines per image), optional
    ``_ids.txt``, ``_boxes.npy`` (N, k, 4) and ``_img_sizes.npy`` (N, 2). ``caption_lines`` overrides
    a split's number of caption lines (to make a wrong count)."""
    os.makedirs(root, exist_ok=True)
    truth: dict[str, Any] = {}
    for split, n in counts.items():
        rng = np.random.default_rng(len(split) * 100 + n)
        feats = rng.standard_normal((n, k, d)).astype(np.float32)
        np.save(os.path.join(root, f"{split}_ims.npy"), feats)
        caps = [f"{split} image {i} caption {j}" for i in range(n) for j in range(5)]
        if caption_lines and split in caption_lines:
            caps = caps[: caption_lines[split]] if caption_lines[split] <= len(caps) else caps + ["extra"] * (caption_lines[split] - len(caps))
        with open(os.path.join(root, f"{split}_caps.txt"), "w") as fh:
            fh.write("\n".join(caps) + "\n")
        t: dict[str, Any] = {"feats": feats, "caps": caps}
        if ids:
            t["ids"] = [1000 + 7 * i for i in range(n)]
            with open(os.path.join(root, f"{split}_ids.txt"), "w") as fh:
                fh.write("\n".join(str(i) for i in t["ids"]) + "\n")
        if sizes:
            t["sizes"] = np.array([[100 + i, 80 + i] for i in range(n)], np.int64)
            np.save(os.path.join(root, f"{split}_img_sizes.npy"), t["sizes"])
        if boxes:
            b = np.zeros((n, k, 4), np.float32)
            b[:, :, 2], b[:, :, 3] = 50.0, 40.0
            b[:, :, 0] = np.arange(k)[None] % 10
            t["boxes"] = b
            np.save(os.path.join(root, f"{split}_boxes.npy"), b)
        truth[split] = t
    return truth
