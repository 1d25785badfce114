"""``xray-match``: data preparation, training, tuning and model lookups.

    xray-match data digit-scenes --out DIR [--train N --val N --test N --size PX --seed S]
    xray-match data verify DIR
    xray-match data coco|flickr30k|entities|salicon|scan ...      (published layouts -> shards)
    xray-match train [--config PRESET] [flags] [key=value ...]
    xray-match tune  [--config PRESET] [flags] [key=value ...]
    xray-match search --model models:/xray-match-moco@champion --text "a red seven" --images DIR
    xray-match search --model URI --image FILE --texts FILE|--text T ...
    xray-match index --model models:/xray-match-moco@champion --data SHARDS --out DIR   (faiss index, Ray Data)
    xray-match serve --model models:/xray-match-moco@champion [--index DIR]            (search app, Ray Serve)
    xray-match config [PRESET] [key=value ...]                    (print the merged, validated config)
    eval "$(xray-match dev-cluster up)"    (S3, PostgreSQL, MLflow with auth, 3 Ray nodes on loopback)
    xray-match dev-cluster env|status|down
"""

from __future__ import annotations

import argparse
import os
import sys

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _digit_scenes(args: argparse.Namespace) -> int:
    from xray_match.data.digit_scenes import build_digit_scenes
    from xray_match.data.format import ShardFormatError

    try:
        build_digit_scenes(args.out, train=args.train, val=args.val, test=args.test, size=args.size, seed=args.seed,
                           maxcount=args.maxcount, workers=args.workers, progress=not args.no_progress)
    except ShardFormatError as e:  # e.g. --out is a folder with someone else's files
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"digit scenes written to {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from xray_match.data.verify import verify

    problems = verify(args.dir, checksums=not args.no_checksums, progress=not args.no_progress)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: ok")
    return 0


def _load_images(folder: str):
    from PIL import Image

    if not os.path.isdir(folder):
        raise SystemExit(f"error: --images {folder!r} is not a folder")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths, [Image.open(p).convert("RGB") for p in paths]


def _search(args: argparse.Namespace) -> int:
    from PIL import Image

    from xray_match.tracking.models import ModelLookupError, load_model

    try:
        model = load_model(args.model, tracking_uri=args.tracking_uri)
    except ModelLookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not hasattr(model, "rank_images"):
        print(f"error: {args.model} is not an image-text retrieval model", file=sys.stderr)
        return 2
    if args.text is not None and args.images:
        paths, images = _load_images(args.images)
        for rank, (i, score) in enumerate(model.rank_images(args.text[0], images)[: args.top], 1):
            print(f"{rank:3d}  {score:+.4f}  {paths[i]}")
        return 0
    if args.image:
        texts = list(args.text or [])
        if args.texts:
            with open(args.texts) as fh:
                texts += [line.strip() for line in fh if line.strip()]
        if not texts:
            print("error: --image needs captions to rank (--text ... or --texts FILE)", file=sys.stderr)
            return 2
        for rank, (i, score) in enumerate(model.rank_texts(Image.open(args.image).convert("RGB"), texts)[: args.top], 1):
            print(f"{rank:3d}  {score:+.4f}  {texts[i]}")
        return 0
    print("error: give --text T --images DIR (rank images) or --image FILE --texts FILE (rank captions)", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> int:
    import yaml

    from xray_match.config import load_config, preset_names
    from xray_match.configfile import ConfigError

    if args.list:
        print("\n".join(preset_names()))
        return 0
    try:
        cfg = load_config(args.preset, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _dev_cluster(args: argparse.Namespace) -> int:
    from xray_match import devcluster

    try:
        if args.action == "up":
            return devcluster.main_up(args.dir, args.workers, args.cpus_per_node, args.bucket)
        if args.action == "down":
            return devcluster.main_down(args.dir, args.purge)
        return {"env": devcluster.main_env, "status": devcluster.main_status}[args.action](args.dir)
    except devcluster.DevClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from xray_match.config import DigitScenesConfig  # the generator's defaults live there

    p = argparse.ArgumentParser(prog="xray-match", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, convert and verify shard data sets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    ds = dsub.add_parser("digit-scenes", help="the embedded captioned data set from real MNIST",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ds.add_argument("--out", required=True)
    ds.add_argument("--train", type=int, default=DigitScenesConfig.train)
    ds.add_argument("--val", type=int, default=DigitScenesConfig.val)
    ds.add_argument("--test", type=int, default=DigitScenesConfig.test)
    ds.add_argument("--size", type=int, default=DigitScenesConfig.size, help="image side in pixels")
    ds.add_argument("--seed", type=int, default=DigitScenesConfig.seed)
    ds.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    ds.add_argument("--workers", type=int, default=None, help="processes (default: min(4, cores))")
    ds.add_argument("--no-progress", action="store_true")
    ds.set_defaults(func=_digit_scenes, stores={"out": "--out"})
    ver = dsub.add_parser("verify", help="read every sample; exit 1 naming each bad shard and key")
    ver.add_argument("dir")
    ver.add_argument("--no-checksums", action="store_true")
    ver.add_argument("--no-progress", action="store_true")
    ver.set_defaults(func=_verify, stores={"dir": "data verify"})
    from xray_match.cli_data import add_convert_commands

    add_convert_commands(dsub)

    for name in ("train", "tune"):
        sp = sub.add_parser(name, help=f"{name} a model (see jobs/); flags as the job scripts", add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=lambda a, _n=name: _job(_n, a.rest))

    se = sub.add_parser("search", help="rank images for a caption, or captions for an image, with a registered model")
    se.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder")
    se.add_argument("--text", action="append", help="a caption (repeatable with --image)")
    se.add_argument("--texts", help="file with one caption per line (with --image)")
    se.add_argument("--images", help="folder of images to rank (with --text)")
    se.add_argument("--image", help="image whose captions to rank")
    se.add_argument("--top", type=int, default=10)
    se.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)")
    se.set_defaults(func=_search)
    from xray_match.cli_serve import add_serve_commands

    add_serve_commands(sub)

    dc = sub.add_parser("dev-cluster", help="the cluster path on one machine: S3, PostgreSQL, MLflow server, Ray nodes",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dc.add_argument("action", choices=["up", "down", "env", "status"],
                    help="up: start and print the exports; env: print them again; down: stop everything up started")
    dc.add_argument("--dir", help="state folder (default: $XRAY_MATCH_HOME/dev-cluster)")
    dc.add_argument("--workers", type=int, default=2, help="Ray worker nodes beside the head")
    dc.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs each Ray node offers")
    dc.add_argument("--bucket", default="xray-bucket")
    dc.add_argument("--purge", action="store_true", help="down: also delete the data and keys (bucket, PostgreSQL)")
    dc.set_defaults(func=_dev_cluster)

    co = sub.add_parser("config", help="print the merged, validated config of a preset")
    co.add_argument("preset", nargs="?", default=None)
    co.add_argument("overrides", nargs="*")
    co.add_argument("--list", action="store_true", help="list presets")
    co.set_defaults(func=_config)
    return p


def _job(kind: str, argv: list[str]) -> int:
    from xray_match.launch import train_main, tune_main

    preset = "moco_cpu"
    if "--config" in argv:
        preset = argv[argv.index("--config") + 1]
    if kind == "train":
        train_main(preset, argv=argv)
    else:
        tune_main(preset, None, argv=argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    from xray_match.preflight import EXPECTED, check_store, first_line

    args = build_parser().parse_args(argv)
    try:
        # the object stores a command names answer, and hold their buckets, before any work
        for attr, label in getattr(args, "stores", {}).items():
            if getattr(args, attr, None):
                check_store(getattr(args, attr), label)
        return int(args.func(args) or 0)
    except EXPECTED as e:  # one line, exit 2, as the jobs do
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
