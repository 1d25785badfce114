"""Images as shard files: kept byte for byte or downscaled, probed for their size, boxes scaled into
the output image, and the builder that turns a record with pixels into a shard sample."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from xray_match.data.convert.inputs import read_bytes
from xray_match.data.convert.plan import ConversionError, ConvertOptions, Problems, SplitPlan, pool_map
from xray_match.data.io import open_url, png_bytes


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


def probe_images(paths: Sequence[str], workers: int, full_decode: bool, progress: bool, desc: str) -> list[tuple[int, int] | str]:
    """Per path its (width, height), or the error text if it is unreadable."""
    return pool_map(_probe_one, [(p, full_decode) for p in paths], workers, progress, desc)


def _probe_one(job: tuple[str, bool]) -> tuple[int, int] | str:
    path, full = job
    try:
        return image_size(path, full_decode=full)
    except ConversionError as e:
        return str(e)


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
