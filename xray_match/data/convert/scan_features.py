"""SCAN / bottom-up-attention precomputed region features into shards.

Layout (the ``data/`` folder of SCAN, Lee et al. 2018, also used by VSRN, SGRAF, RDAN)::

    data/f30k_precomp/{train,dev,test}_ims.npy        float (N, 36, 2048): Faster R-CNN region features
    data/coco_precomp/{train,dev,test,testall}_ims.npy
    ..._precomp/<split>_caps.txt                       5 lines per image, image i owns lines 5i..5i+4
    ..._precomp/<split>_ids.txt                        optional: one image id a line
    ..._precomp/<split>_boxes.npy | <split>_ims_bbx.npy   optional: (N, 36, 4) x0 y0 x1 y1 pixels
    ..._precomp/<split>_img_sizes.npy                  optional: (N, 2) width height
    ..._precomp/<split>_ims_size.npy                   optional: object array of {"image_w", "image_h"}
                                                       (pickled: read only with allow_pickle)

Readings chosen (documented in docs/data.md):

* Splits: ``dev`` becomes ``val`` (our name for the validation split); ``train``, ``test`` and
  ``testall`` keep theirs.
* ``image_id`` (and key) is ``<split>-<row>`` (``val-0000003``): unique in the data set, as the
  format requires, although each split's rows count from 0 and the same image may sit in two
  splits (COCO's ``test`` is part of ``testall``). The id from ``<split>_ids.txt``, when there is
  one, goes to ``source_id``.
* These samples carry no pixels. Each holds a 1x1 black placeholder ``png`` (so the shard reader's
  image checks pass unchanged), ``regions.npy`` = the image's (36, 2048) features in their stored
  dtype, ``boxes.npy`` when a boxes file exists, and json ``"pixels": false``; the manifest says
  ``info.convert.pixels = false``. json ``width``/``height`` are the *original* image's size when a
  sizes file gives it (the frame of the boxes), and absent otherwise. A recipe that needs pixels
  must refuse such a data set; one that uses ``regions`` (RDAN with ``region_source=precomputed``)
  trains on it unchanged.
* The caption file must have exactly ``5 * N`` lines (and the ids file ``N``): with another count
  the image <-> caption alignment is unknown, so this is always an error, even with ``--skip-bad``.
  A single image with an empty caption, or (sizes known) a box outside its image, is a per-image
  problem that ``--skip-bad`` can skip. SCAN's older layout with one feature row per caption
  (``N_ims == N_caps``) is refused for the same reason.
* Feature rows are read by file offset, one image at a time: a 33 GB ``train_ims.npy`` is never
  loaded whole, and inputs may be fsspec URLs.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any

import numpy as np

from xray_match.data.convert.captions import take_captions
from xray_match.data.convert.images import PLACEHOLDER_PNG, box_problem, npy_bytes
from xray_match.data.convert.inputs import NpyRows, read_bytes, read_lines, require_dir
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, options_info
from xray_match.data.convert.write import write_plans
from xray_match.data.format import Manifest, join
from xray_match.data.io import exists, filesystem

SOURCE_SPLITS = {"train": "train", "dev": "val", "test": "test", "testall": "testall"}


class PrecompBuilder:
    """``record -> sample`` for precomputed features: placeholder png, regions.npy, boxes.npy."""

    def __init__(self, ims: dict[str, str], boxes: dict[str, str]):
        self.ims = ims  # source split -> path of <split>_ims.npy
        self.boxes = boxes  # source split -> path of the boxes file
        self._rows: dict[str, NpyRows] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"ims": self.ims, "boxes": self.boxes, "_rows": {}}

    def describe(self) -> dict[str, Any]:
        sizes = {}
        for path in list(self.ims.values()) + list(self.boxes.values()):
            fs, p = filesystem(path)
            sizes[path] = fs.size(p)
        return {"builder": "precomp", "ims": self.ims, "boxes": self.boxes, "bytes": sizes}

    def _row(self, path: str, i: int) -> np.ndarray:
        if path not in self._rows:
            self._rows[path] = NpyRows(path)
        return self._rows[path].row(i)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        src, row = record["source_split"], record["row"]
        regions = self._row(self.ims[src], row)
        if regions.ndim == 1:
            regions = regions[None]  # (d,) global feature -> one region
        meta: dict[str, Any] = {
            "image_id": record["image_id"], "split": record["split"], "captions": record["captions"],
            "pixels": False, "source_split": src, "feature_row": row,
        }
        if "source_id" in record:
            meta["source_id"] = record["source_id"]
        if "width" in record:
            meta["width"], meta["height"] = record["width"], record["height"]
        sample = {"__key__": record["key"], "png": PLACEHOLDER_PNG, "regions.npy": npy_bytes(regions)}
        if src in self.boxes:
            sample["boxes.npy"] = npy_bytes(self._row(self.boxes[src], row).astype(np.float32))
        sample["json"] = json.dumps(meta).encode()
        return sample


def _load_small(path: str, allow_pickle: bool) -> np.ndarray:
    try:
        return np.load(io.BytesIO(read_bytes(path)), allow_pickle=allow_pickle, encoding="latin1")
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ConversionError(f"{path}: holds pickled Python objects; pass --allow-pickle if you trust this file") from None
        raise ConversionError(f"{path}: not a .npy array ({e})") from None


def _sizes(path: str, n: int, allow_pickle: bool) -> list[tuple[int, int]]:
    arr = _load_small(path, allow_pickle)
    if len(arr) != n:
        raise ConversionError(f"{path}: {len(arr)} rows for {n} images")
    out = []
    for i, e in enumerate(arr):
        if isinstance(e, dict):
            try:
                out.append((int(e["image_w"]), int(e["image_h"])))
            except KeyError as k:
                raise ConversionError(f"{path}: row {i} has no {k}") from None
        else:
            e = np.asarray(e).ravel()
            if e.size != 2:
                raise ConversionError(f"{path}: row {i} is not (width, height)")
            out.append((int(e[0]), int(e[1])))
    return out


def convert_scan(
    out: str,
    precomp: str,
    *,
    allow_pickle: bool = False,
    dataset: str | None = None,
    opts: ConvertOptions | None = None,
) -> Manifest:
    """Convert a ``*_precomp`` folder of precomputed features into shards at ``out``."""
    opts = opts or ConvertOptions()
    require_dir(precomp, "the precomp folder")
    name = posixpath.basename(precomp.rstrip("/")) if "://" in precomp else os.path.basename(os.path.normpath(precomp))
    dataset = dataset or f"scan-{name}"
    problems = Problems(dataset)
    plans: dict[str, SplitPlan] = {}
    ims: dict[str, str] = {}
    boxes: dict[str, str] = {}
    found = []
    n_caps = opts.captions_per_image or 5
    for src, split in SOURCE_SPLITS.items():
        ims_path, caps_path = join(precomp, f"{src}_ims.npy"), join(precomp, f"{src}_caps.txt")
        has_ims, has_caps = exists(ims_path), exists(caps_path)
        if has_ims or has_caps:
            found.append(src)
        if not opts.wants(split) or not (has_ims or has_caps):
            continue
        if not (has_ims and has_caps):
            raise ConversionError(f"{caps_path if has_ims else ims_path}: no such file (its partner "
                                  f"{ims_path if has_ims else caps_path} exists)")
        rows = NpyRows(ims_path)
        if len(rows.shape) not in (2, 3):
            raise ConversionError(f"{ims_path}: shape {rows.shape}; expected (N, regions, dim) or (N, dim)")
        n = len(rows)
        caps = read_lines(caps_path)
        if len(caps) != n_caps * n:
            hint = " (one feature row per caption: the alignment of images is unknown)" if len(caps) == n else ""
            raise ConversionError(
                f"{caps_path}: {len(caps)} captions for {n} images in {ims_path}; the layout needs exactly "
                f"{n_caps} per image ({n_caps * n}){hint}. Not skippable: the caption <-> image alignment is unknown."
            )
        ids: list[Any] | None = None
        ids_path = join(precomp, f"{src}_ids.txt")
        if exists(ids_path):
            ids = [ln.strip() for ln in read_lines(ids_path)]
            if len(ids) != n:
                raise ConversionError(f"{ids_path}: {len(ids)} ids for {n} images in {ims_path}")
            ids = [int(i) if i.isdigit() else i for i in ids]
        box_path = next((p for p in (join(precomp, f"{src}_boxes.npy"), join(precomp, f"{src}_ims_bbx.npy")) if exists(p)), None)
        box_arr = None
        if box_path:
            box_rows = NpyRows(box_path)
            k = rows.shape[1] if len(rows.shape) == 3 else 1
            if box_rows.shape[:1] != (n,) or box_rows.shape[-1] != 4 or (len(box_rows.shape) == 3 and box_rows.shape[1] != k):
                raise ConversionError(f"{box_path}: shape {box_rows.shape}; expected ({n}, {k}, 4) to match {ims_path}")
            boxes[src] = box_path
            box_arr = _load_small(box_path, False).reshape(n, -1, 4)
        sizes = None
        for size_name in (f"{src}_img_sizes.npy", f"{src}_ims_size.npy"):
            if exists(join(precomp, size_name)):
                sizes = _sizes(join(precomp, size_name), n, allow_pickle)
                break
        ims[src] = ims_path
        plan = SplitPlan([])
        for i in opts.limited(range(n)):
            key = f"{split}-{i:07d}"
            ident = ids[i] if ids is not None else key  # problems name the id the user knows
            got = take_captions(caps[n_caps * i : n_caps * (i + 1)], opts, problems, split, ident, plan.stats)
            if got is None:
                continue
            rec: dict[str, Any] = {"key": key, "image_id": key, "split": split, "source_split": src, "row": i,
                                   "captions": got}
            if ids is not None:
                rec["source_id"] = ids[i]
            if sizes is not None:
                w, h = sizes[i]
                rec["width"], rec["height"] = w, h
                if box_arr is not None:
                    bad = next((why for b in box_arr[i] if (why := box_problem([float(v) for v in b], w, h))), None)
                    if bad:
                        problems.add(split, "box_outside_image", ident, f"row {i}: {bad}")
                        continue
            plan.records.append(rec)
        plans[split] = plan
    if not found:
        raise ConversionError(f"{precomp}: no <split>_ims.npy + <split>_caps.txt pairs (splits: {', '.join(SOURCE_SPLITS)})")
    if not plans:
        raise ConversionError(f"{dataset}: none of the splits {list(opts.splits)} exists (have: "
                              f"{', '.join(SOURCE_SPLITS[s] for s in found)})")
    info = {
        "converter": "scan", "source": {"precomp": precomp}, "options": options_info(opts, allow_pickle=allow_pickle),
        "pixels": False, "split_scheme": "SCAN precomp (dev -> val)",
        "regions": {s: list(NpyRows(p).shape[1:]) for s, p in ims.items()},
    }
    return write_plans(out, dataset, plans, problems, PrecompBuilder(ims, boxes), opts, info)
