"""``xray-match data coco|flickr30k|entities|salicon|scan``: convert published data sets to shards.

``xray_match/cli.py`` hooks these in with one call on its ``data`` sub-parsers::

    add_convert_commands(data_subparsers)

Each sub-command sets ``func`` on the parsed namespace; ``args.func(args)`` runs it and returns
the exit code (0 done, 2 bad input: the message names files, ids and counts). Without cli.py,
``python -m xray_match.cli_data coco ...`` runs the same commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

FORMATTER = argparse.ArgumentDefaultsHelpFormatter
COCO_IMAGES_HELP = ("folder holding the COCO image folders train2014/ and val2014/ (default: found in --coco-root "
                    "or --coco-root/images)")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output and execution")
    g.add_argument("--out", required=True, help="shard folder or fsspec URL (s3://bucket/coco, gs://...)")
    g.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="process pool size")
    g.add_argument("--ray", action="store_true",
                   help="write each shard as a Ray task across the cluster (inputs and --out must be visible to every node)")
    g.add_argument("--ray-address", default=None, help="Ray cluster address; unset: $RAY_ADDRESS, a running cluster, or a new local one")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out images whose annotations and files disagree (counted, listed in the manifest) instead of failing")
    g.add_argument("--splits", default="", help="comma-separated output splits to write (default: all)")
    g.add_argument("--limit", type=int, default=0, help="only the first N images of each split (smoke runs)")
    g.add_argument("--captions-per-image", type=int, default=5,
                   help="captions kept per image (extras dropped and counted; fewer is a mismatch); 0 = all")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(stores={"out": "--out"})  # checked by xray-match before the command runs
    return p


def _pixels() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("images")
    g.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (boxes and maps follow); 0 = keep the files byte for byte")
    g.add_argument("--verify-images", action="store_true",
                   help="decode every image while planning; unreadable files become mismatches")
    return p


def _options(args: argparse.Namespace) -> Any:
    from xray_match.data.convert.plan import ConvertOptions

    return ConvertOptions(
        maxcount=args.maxcount, workers=args.workers, use_ray=args.ray, ray_address=args.ray_address,
        skip_bad=args.skip_bad, splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        limit=args.limit, captions_per_image=args.captions_per_image,
        max_side=getattr(args, "max_side", 0), verify_images=getattr(args, "verify_images", False),
        progress=not args.no_progress,
    )


def _run(convert: Callable[[argparse.Namespace, Any], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from xray_match.data.convert.plan import ConversionError
        from xray_match.data.format import ShardFormatError

        try:
            manifest = convert(args, _options(args))
        except (ConversionError, ShardFormatError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(summary(args.out, manifest))
        return 0

    return run


def summary(out: str, manifest: Any) -> str:
    """What was written, per split: images, shards, and what was skipped."""
    conv = manifest.info.get("convert", {})
    lines = [f"{manifest.dataset} -> {out}" + ("" if manifest.has_pixels else "  (no pixels: precomputed regions)")]
    for split in sorted(manifest.splits):
        s = conv.get("splits", {}).get(split, {})
        skipped = s.get("skipped", {})
        skip = f", skipped {sum(skipped.values())} ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if skipped else ""
        stats = s.get("stats", {})
        extra = f", {', '.join(f'{k} {v}' for k, v in stats.items())}" if stats else ""
        lines.append(f"  {split}: {manifest.count(split)} images in {len(manifest.splits[split])} shards{skip}{extra}")
    for where, s in conv.get("skipped_outside_splits", {}).items():
        lines.append(f"  {where}: skipped {', '.join(f'{k} {v}' for k, v in s['skipped'].items())}")
    return "\n".join(lines)


def _coco(args: argparse.Namespace, opts: Any) -> Any:
    from xray_match.data.convert.coco import convert_coco

    return convert_coco(args.out, args.coco_root, karpathy=args.karpathy, keep_restval=args.keep_restval,
                        year=args.year, images=args.images, opts=opts)


def _flickr30k(args: argparse.Namespace, opts: Any) -> Any:
    from xray_match.data.convert.flickr30k import convert_flickr30k

    return convert_flickr30k(args.out, args.images, karpathy=args.karpathy, token=args.token,
                             split_lists=args.split_lists, opts=opts)


def _entities(args: argparse.Namespace, opts: Any) -> Any:
    from xray_match.data.convert.entities import convert_entities

    return convert_entities(args.out, args.images, args.entities, split_lists=args.split_lists, opts=opts)


def _salicon(args: argparse.Namespace, opts: Any) -> Any:
    from xray_match.data.convert.salicon import convert_salicon

    return convert_salicon(args.out, args.salicon, args.coco_root, fixations=not args.no_fixations, images=args.images,
                           opts=opts)


def _scan(args: argparse.Namespace, opts: Any) -> Any:
    from xray_match.data.convert.scan_features import convert_scan

    return convert_scan(args.out, args.precomp, allow_pickle=args.allow_pickle, opts=opts)


def add_convert_commands(subparsers: Any) -> None:
    """Register ``coco``, ``flickr30k``, ``entities``, ``salicon`` and ``scan`` on ``subparsers``
    (the object ``add_subparsers()`` returned for ``xray-match data``)."""
    common, pixels = _common(), _pixels()

    p = subparsers.add_parser(
        "coco", parents=[common, pixels], formatter_class=FORMATTER,
        help="MS-COCO captions (official annotations or Karpathy split) -> shards",
        description="Official: DIR/annotations/captions_{train,val}2014.json + DIR/{train,val}2014/*.jpg -> "
                    "splits train, val. With --karpathy dataset_coco.json: splits train (+restval), val, test.",
    )
    p.add_argument("--coco-root", required=True, help="folder with annotations/ and train2014/, val2014/ (or images/train2014/, ...)")
    p.add_argument("--images", help=COCO_IMAGES_HELP)
    p.add_argument("--karpathy", help="Karpathy's dataset_coco.json (image paths relative to --coco-root)")
    p.add_argument("--keep-restval", action="store_true", help="write Karpathy's restval as its own split instead of into train")
    p.add_argument("--year", type=int, default=2014, choices=(2014, 2017), help="official annotation year")
    p.set_defaults(func=_run(_coco))

    p = subparsers.add_parser(
        "flickr30k", parents=[common, pixels], formatter_class=FORMATTER,
        help="Flickr30k (Karpathy split or results_20130124.token) -> shards",
        description="Images from flickr30k-images/; captions from --karpathy dataset_flickr30k.json (splits "
                    "train/val/test) or --token results_20130124.token (splits from --split-lists, else one split 'all').",
    )
    p.add_argument("--images", required=True, help="the flickr30k-images folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--karpathy", help="Karpathy's dataset_flickr30k.json")
    src.add_argument("--token", help="the original results_20130124.token")
    p.add_argument("--split-lists", help="folder with train.txt/val.txt/test.txt of Flickr ids (with --token)")
    p.set_defaults(func=_run(_flickr30k))

    p = subparsers.add_parser(
        "entities", parents=[common, pixels], formatter_class=FORMATTER,
        help="Flickr30k Entities (phrase -> box links) -> shards",
        description="Annotations/*.xml boxes + Sentences/*.txt phrase markup + Flickr30k images -> captions "
                    "with phrase spans linked to boxes; splits from train.txt/val.txt/test.txt, without them one "
                    "split 'all'.",
    )
    p.add_argument("--images", required=True, help="the flickr30k-images folder")
    p.add_argument("--entities", required=True, help="folder with Annotations/, Sentences/ and (optionally) train/val/test.txt")
    p.add_argument("--split-lists", help="folder with train.txt/val.txt/test.txt (default: --entities; none there: one split 'all')")
    p.set_defaults(func=_run(_entities))

    p = subparsers.add_parser(
        "salicon", parents=[common, pixels], formatter_class=FORMATTER,
        help="SALICON saliency maps joined to COCO images and captions -> shards",
        description="SALICON/maps/{train,val}/COCO_*.png (+ fixations/{train,val}/*.mat) joined by COCO id with "
                    "the official COCO layout; each map is resized to its COCO image.",
    )
    p.add_argument("--salicon", required=True, help="SALICON folder with maps/ (and optionally fixations/)")
    p.add_argument("--coco-root", required=True, help="COCO folder with annotations/ and train2014/, val2014/ (or images/train2014/, ...)")
    p.add_argument("--images", help=COCO_IMAGES_HELP)
    p.add_argument("--no-fixations", action="store_true", help="ignore fixations/*.mat")
    p.set_defaults(func=_run(_salicon))

    p = subparsers.add_parser(
        "scan", parents=[common], formatter_class=FORMATTER,
        help="SCAN / bottom-up precomputed region features (*_precomp) -> shards without pixels",
        description="<split>_ims.npy (N, 36, 2048) + <split>_caps.txt (5 lines per image) [+ _ids.txt, _boxes.npy / "
                    "_ims_bbx.npy, _img_sizes.npy] -> regions.npy (+ boxes.npy) per image; dev becomes val.",
    )
    p.add_argument("--precomp", required=True, help="e.g. data/f30k_precomp or data/coco_precomp")
    p.add_argument("--allow-pickle", action="store_true", help="read <split>_ims_size.npy object arrays (pickled)")
    p.set_defaults(func=_run(_scan))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xray-match data", description="Convert published data sets to xray_match shards.")
    add_convert_commands(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
