"""``xray-match index`` and ``xray-match serve``: build a search index with Ray Data, serve it on Ray Serve.

``xray_match/cli.py`` hooks these in with one call, ``add_serve_commands(subparsers)``. The flags
of the settings are generated from :class:`~xray_match.serve.config.IndexConfig` and
:class:`~xray_match.serve.config.ServeConfig` (``--nprobe`` sets ``IndexConfig.nprobe``), so their
defaults and help live in the dataclasses only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from xray_match.serve.config import IndexConfig, ServeConfig

FORMATTER = argparse.HelpFormatter


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) for a boolean setting."""
    value = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
             "off": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def _add_settings(p: argparse.ArgumentParser, cls: type, title: str) -> None:
    g = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        kw: dict[str, Any] = {"default": None, "dest": f"setting_{f.name}", "metavar": f.name.upper(),
                              "help": f"{f.metadata.get('help', '')} (default: {f.default})".strip()}
        if typing.get_origin(tp) is typing.Literal:
            kw |= {"choices": typing.get_args(tp), "metavar": "{" + ",".join(typing.get_args(tp)) + "}"}
        elif tp in (int, float):
            kw |= {"type": tp}
        elif tp is bool:
            kw |= {"type": parse_bool, "metavar": "{true,false}"}
        g.add_argument(f"--{f.name.replace('_', '-')}", **kw)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k.removeprefix("setting_"): v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}


def _index(args: argparse.Namespace) -> int:
    from xray_match.configfile import ConfigError
    from xray_match.data.format import ShardFormatError
    from xray_match.serve.config import build_settings
    from xray_match.serve.index_build import build_index
    from xray_match.serve.index_store import IndexFormatError

    try:
        cfg = build_settings(IndexConfig, _settings(args), "index.")
        out = build_index(args.model, args.data, args.out, cfg, tracking_uri=args.tracking_uri,
                          progress=not args.no_progress)
    except (ConfigError, LookupError, ShardFormatError, IndexFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"index: {out['path']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from xray_match.configfile import ConfigError
    from xray_match.serve.index_store import IndexFormatError

    try:
        from xray_match.serve.app import preflight, ray_env
        from xray_match.serve.config import build_settings

        settings = _settings(args)
        ray_env(build_settings(ServeConfig, settings, "serve."))  # ingress haproxy without the binary: an error now
        ref, index = preflight(args.model, args.index, args.tracking_uri)  # resolved once; the replicas get it
    except (ConfigError, LookupError, IndexFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray import serve

    from xray_match.serve.app import run

    url = run(ref, index, settings)
    print(f"serving {ref} at {url}/ (JSON: POST {url}/api/search/text, {url}/api/search/image); Ctrl-C stops",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    ix = sub.add_parser("index", help="embed a shard folder's images and captions (Ray Data) into a faiss index",
                        formatter_class=FORMATTER)
    ix.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder")
    ix.add_argument("--data", required=True, help="shard folder or URL (s3://, gs://)")
    ix.add_argument("--out", required=True, help="index folder to write (replaced atomically if it is an index)")
    ix.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)")
    ix.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_settings(ix, IndexConfig, "index settings")
    ix.set_defaults(func=_index, stores={"data": "--data", "out": "--out"})

    sv = sub.add_parser("serve", help="the search service and web page on Ray Serve", formatter_class=FORMATTER)
    sv.add_argument("--model", required=True, help="models:/NAME@ALIAS (followed when it moves), models:/NAME/VERSION or a checkpoint")
    sv.add_argument("--index", help="index folder (default: the one tagged on the model version by `xray-match index`)")
    sv.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local store)")
    _add_settings(sv, ServeConfig, "service settings")
    sv.set_defaults(func=_serve, stores={"index": "--index"})
