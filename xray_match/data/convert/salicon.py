"""SALICON saliency maps joined to COCO images and captions.

Layout of the SALICON release (LSUN 2017 challenge version)::

    SALICON/maps/train/COCO_train2014_000000000009.png     saliency map, 8-bit grey, 640x480
    SALICON/maps/val/COCO_val2014_000000000133.png
    SALICON/fixations/{train,val}/COCO_*.mat                optional: MATLAB struct with
                                                           resolution [h w] and gaze(i).fixations
                                                           (n x 2, [x y], 1-based) per subject

The COCO side is the official layout (see :mod:`xray_match.data.convert.coco`; the image folders
in ``COCO/``, ``COCO/images/`` or ``images=``): the id in a map's
name picks the image and its captions from ``captions_{train,val}2014.json``. Splits are SALICON's:
``train`` (10,000 images from COCO train2014) and ``val`` (5,000 from COCO val2014); the SALICON
test images have no public maps and are not converted.

Readings chosen (documented in docs/data.md):

* SALICON showed each COCO image stretched to 640x480, and its maps live in that frame. The
  sample keeps the original COCO image, so the map is resized (bilinear, no aspect-preserving
  crop or pad) to the image's size: ``saliency.png`` is 8-bit grey, exactly the image's size (what
  the reader requires). ``saliency_source_size`` records the map's own size.
* Fixations (from the ``.mat`` files, when present) go to the json as ``fixations``:
  ``[[x, y, subject], ...]`` in the sample image's continuous pixel coordinates
  (``(x - 0.5) * W / 640``, likewise y). Points outside the recorded resolution are dropped
  and counted in ``fixations_dropped``.
* A map whose id is not a COCO image with captions, a missing COCO image file, a map name that is
  not ``COCO_<part>_<id>.png``, and (when a fixations folder exists) a map without its ``.mat``
  are problems: an error listing them, or skipped and counted with ``--skip-bad``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from PIL import Image

from xray_match.data.convert.captions import take_captions
from xray_match.data.convert.coco import find_image_folder
from xray_match.data.convert.images import ImageBlob, ImageSampleBuilder, verify_records
from xray_match.data.convert.inputs import field_of, read_bytes, read_json, require_dir
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, options_info, safe_key
from xray_match.data.convert.write import write_plans
from xray_match.data.format import Manifest, join
from xray_match.data.io import exists, list_names, png_bytes

DATASET = "salicon"
MAP_NAME = re.compile(r"^COCO_(train|val)(\d{4})_(\d+)\.png$")


def saliency_to_grey(data: bytes, where: str) -> Image.Image:
    """A map file as 8-bit grey; 16-bit and float maps are scaled by their maximum."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:
        raise ConversionError(f"{where}: unreadable saliency map ({type(e).__name__}: {e})") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = a.max()
        a = a / peak * 255.0 if peak > 0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("L")


def load_fixations(path: str, width: int, height: int) -> tuple[list[list[float]], int]:
    """``[[x, y, subject], ...]`` in a ``width`` x ``height`` image from a SALICON ``.mat``, and
    how many points fell outside the recorded resolution."""
    from scipy.io import loadmat

    try:
        m = loadmat(io.BytesIO(read_bytes(path)))
        res_h, res_w = (int(v) for v in np.asarray(m["resolution"]).ravel()[:2])
        gaze = m["gaze"]
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{path}: not a SALICON fixations file ({type(e).__name__}: {e})") from None
    sx, sy = width / res_w, height / res_h
    points: list[list[float]] = []
    dropped = 0
    for subject in range(gaze.shape[0]):
        fix = np.asarray(gaze["fixations"][subject, 0] if gaze.ndim == 2 else gaze["fixations"][subject], dtype=np.float64)
        for x, y in fix.reshape(-1, 2):
            if not (1 <= x <= res_w and 1 <= y <= res_h):
                dropped += 1
                continue
            points.append([round((x - 0.5) * sx, 2), round((y - 0.5) * sy, 2), subject])
    return points, dropped


class SaliconBuilder(ImageSampleBuilder):
    """A COCO image sample plus ``saliency.png`` (resized to the image) and fixations."""

    def extend(self, record: dict[str, Any], sample: dict[str, Any], meta: dict[str, Any], img: ImageBlob) -> None:
        sal = saliency_to_grey(read_bytes(record["saliency"]), record["saliency"])
        meta["saliency_source_size"] = list(sal.size)
        if sal.size != (img.width, img.height):
            sal = sal.resize((img.width, img.height), Image.BILINEAR)
        sample["saliency.png"] = png_bytes(sal)
        if record.get("fixations"):
            points, dropped = load_fixations(record["fixations"], img.width, img.height)
            meta["fixations"] = points
            if dropped:
                meta["fixations_dropped"] = dropped


def convert_salicon(
    out: str,
    salicon: str,
    coco_root: str,
    *,
    fixations: bool = True,
    images: str | None = None,
    opts: ConvertOptions | None = None,
) -> Manifest:
    """Convert SALICON maps (``salicon/maps/{train,val}``) joined with COCO under ``coco_root``
    (image folders found as in :func:`~xray_match.data.convert.coco.find_image_folder`)."""
    opts = opts or ConvertOptions()
    require_dir(join(salicon, "maps"), "SALICON maps/")
    require_dir(coco_root, "the COCO root")
    problems = Problems(DATASET)
    coco: dict[str, tuple[dict[int, dict[str, Any]], dict[int, list[str]], str, set[str]]] = {}

    def coco_part(part: str) -> tuple[dict[int, dict[str, Any]], dict[int, list[str]], str, set[str]]:
        """COCO ``part``: images by id, captions by id, the image folder and its file names."""
        if part not in coco:
            ann = join(coco_root, "annotations", f"captions_{part}.json")
            if not exists(ann):
                raise ConversionError(f"{ann}: no such file (SALICON maps name COCO {part} images)")
            doc = read_json(ann)
            by_id = {int(field_of(im, "id", ann)): im for im in field_of(doc, "images", ann)}
            caps: dict[int, list[tuple[int, str]]] = {}
            for i, a in enumerate(field_of(doc, "annotations", ann)):
                caps.setdefault(int(field_of(a, "image_id", ann)), []).append((int(a.get("id", i)), field_of(a, "caption", ann)))
            folder = find_image_folder(coco_root, part, images)
            coco[part] = (by_id, {k: [c for _, c in sorted(v)] for k, v in caps.items()}, folder, list_names(folder))
        return coco[part]

    plans: dict[str, SplitPlan] = {}
    for split in ("train", "val"):
        if not opts.wants(split):
            continue
        maps_dir = join(salicon, "maps", split)
        require_dir(maps_dir, f"SALICON maps/{split}")
        fix_dir = join(salicon, "fixations", split)
        fix_names = list_names(fix_dir) if fixations else set()
        use_fix = fixations and bool(fix_names)
        plan = SplitPlan([])
        seen: set[int] = set()
        for name in opts.limited(sorted(n for n in list_names(maps_dir) if not n.startswith("."))):
            m = MAP_NAME.match(name)
            if not m:
                problems.add(split, "bad_map_name", name, "expected COCO_<train|val><year>_<id>.png")
                continue
            part, cid = f"{m.group(1)}{m.group(2)}", int(m.group(3))
            if cid in seen:
                problems.add(split, "duplicate_id", cid)
                continue
            seen.add(cid)
            by_id, captions, folder, files = coco_part(part)
            if cid not in by_id or cid not in captions:
                problems.add(split, "map_for_unknown_image", cid, f"{name}: no COCO {part} image with captions")
                continue
            file_name = field_of(by_id[cid], "file_name", f"captions_{part}.json: image {cid}")
            if file_name not in files:
                problems.add(split, "missing_image", cid, join(part, file_name))
                continue
            stem = name[: -len(".png")]
            if use_fix and f"{stem}.mat" not in fix_names:
                problems.add(split, "missing_fixations", cid, join(fix_dir, f"{stem}.mat"))
                continue
            caps = take_captions(captions[cid], opts, problems, split, cid, plan.stats)
            if caps is None:
                continue
            plan.records.append({
                "key": safe_key(cid), "image_id": cid, "split": split, "path": join(folder, file_name),
                "captions": caps, "saliency": join(maps_dir, name),
                "fixations": join(fix_dir, f"{stem}.mat") if use_fix else None,
                "meta": {"file_name": file_name, "source_split": part},
            })
        plans[split] = plan
    if not plans:
        raise ConversionError(f"{DATASET}: none of the splits {list(opts.splits)} exists (SALICON splits: train, val)")
    verify_records(plans, problems, opts, DATASET)
    info = {
        "converter": "salicon", "source": {"salicon": salicon, "coco_root": coco_root, "images": images},
        "options": options_info(opts, fixations=fixations), "pixels": True, "split_scheme": "SALICON train / val",
        "saliency": "SALICON map resized (bilinear) to the COCO image size",
    }
    return write_plans(out, DATASET, plans, problems, SaliconBuilder(opts.max_side), opts, info)
