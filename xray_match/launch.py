"""Job entry points: ``train_main(preset)`` and ``tune_main(preset, space)`` parse the common
flags plus dotted overrides (``optim.lr=3e-4``), validate the config before any compute, run, and
print where the results are. ``jobs/*.py`` are one-line calls of these."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Callable

from xray_match.config import Config, ConfigError, load_config
from xray_match.preflight import EXPECTED, first_line, preflight

FLAG_KEYS = {
    "data": "data.path",
    "storage_path": "ray.storage_path",
    "tracking_uri": "tracking.tracking_uri",
    "experiment_name": "tracking.experiment_name",
    "num_workers": "ray.num_workers",
    "cpus_per_worker": "ray.cpus_per_worker",
    "gpus_per_worker": "ray.gpus_per_worker",
    "epochs": "train.epochs",
    "name": "ray.name",
    "num_samples": "tune.num_samples",
    "max_concurrent": "tune.max_concurrent",
    "time_budget_s": "tune.time_budget_s",
    "model_name": "tracking.registered_model_name",
}


def build_parser(description: str, preset: str, tune: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=3e-4 moco.sampler=queue")
    p.add_argument("--config", default=preset, help="preset name in xray_match/configs or a YAML path")
    p.add_argument("--data", help="shard folder or URL (s3://, gs://); default: the embedded digit scenes")
    p.add_argument("--storage-path", help="Ray storage_path for checkpoints and results (local or s3://)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a local sqlite)")
    p.add_argument("--experiment-name", help="MLflow experiment")
    p.add_argument("--num-workers", type=int, help="Ray Train workers per run/trial")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--name", help="run/study name (re-using a name resumes it from its storage)")
    p.add_argument("--model-name", help="registered model name (default xray-match-<model>)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    if tune:
        p.add_argument("--num-samples", type=int, help="trials")
        p.add_argument("--max-concurrent", type=int, help="concurrent trials")
        p.add_argument("--time-budget-s", type=float, help="stop the study after this many seconds")
        p.add_argument("--space", help="registered search space (default: the model's)")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted study (--name, else this model's newest) from its storage: "
                            "finished trials are kept, unfinished ones continue from their checkpoints")
    p.add_argument("--no-test-eval", action="store_true", help="skip evaluating the result on the test split")
    return p


def command_line_keys(args: argparse.Namespace) -> list[str]:
    """The config keys given on the command line, as flags or dotted overrides (a tune job fixes
    them for every trial)."""
    from xray_match.configfile import split_override as _split_override

    keys = [FLAG_KEYS[k] for k, v in vars(args).items() if k in FLAG_KEYS and v is not None]
    return keys + [_split_override(o)[0] for o in args.overrides]


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {FLAG_KEYS[k]: v for k, v in vars(args).items() if k in FLAG_KEYS and v is not None}
    cfg = load_config(args.config, flags)
    return cfg.with_overrides(args.overrides) if args.overrides else cfg


def expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A job entry point: an expected failure (:data:`xray_match.preflight.EXPECTED`) is one line
    ``error: ...`` on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            print(f"error: {'config: ' if isinstance(e, ConfigError) else ''}{first_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def argv_with_data(preset: str, argv: list[str], tune: bool, build_data: Callable[[Config], str]) -> list[str]:
    """``argv`` with ``--data`` set to the folder ``build_data(cfg)`` returns (a data set the config
    describes, built on first use) unless the caller passed ``--data``."""
    args = build_parser(preset, preset, tune).parse_intermixed_args(argv)
    if args.data or args.print_config:
        return list(argv)
    return ["--data", build_data(config_from_args(args)), *argv]


def _parse(description: str, preset: str, tune: bool, argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    args = build_parser(description, preset, tune).parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        raise SystemExit(0)
    return args, prepare_job(cfg)


def prepare_job(cfg: Config) -> Config:
    """Before Ray starts: pin the model references the workers load (a ``models:/`` alias is read
    once, here), check the config's paths and servers (a wrong one fails in seconds), and keep a
    local cluster's workers on this interpreter. Returns the pinned config."""
    if cfg.rdan.shortlist_model.startswith("models:/"):
        from xray_match.tracking.models import checkpoint_url
        from xray_match.tracking.store import resolve_tracking_uri

        url = checkpoint_url(cfg.rdan.shortlist_model, resolve_tracking_uri(cfg))
        print(f"[xray_match] rdan.shortlist_model: {cfg.rdan.shortlist_model} -> {url}", flush=True)
        cfg = cfg.with_overrides({"rdan.shortlist_model": url})
    preflight(cfg)
    if not os.environ.get("RAY_ADDRESS"):
        # this job starts a local cluster whose workers run this very interpreter: Ray's `uv run`
        # hook would instead build a virtual environment per worker process (a minute or two on
        # 2 cores, and worker-start timeouts). Read when ray is imported, so set it first.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return cfg


def _print_summary(title: str, items: dict[str, Any]) -> None:
    print(f"\n=== {title} ===")
    for k, v in items.items():
        if v is not None:
            print(f"{k:>18}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


@expected_errors
def train_main(preset: str, argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = _parse(f"Train one {preset} run on Ray", preset, tune=False, argv=argv)
    from xray_match.driver.worker import run_training

    out = run_training(cfg)
    ctx = out["context"]
    if not args.no_test_eval and out["checkpoint"]:
        out["test"] = ctx.evaluate(out["checkpoint"])
    _print_summary("xray_match train", {
        "checkpoint": out["checkpoint"], "tracking_uri": ctx.tracking.uri, "mlflow_run": out.get("run_id"),
        "registered_model": ctx.model_ref(out.get("model_version")),
        "val": {k: round(v, 3) for k, v in out["metrics"].items() if k.startswith("val/")},
        "test": {k: round(v, 3) for k, v in out.get("test", {}).items()} or None,
    })
    return out


@expected_errors
def tune_main(preset: str, space: str | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    args, cfg = _parse(f"Tune {preset} with Ray Tune + Optuna", preset, tune=True, argv=argv)
    from xray_match.driver.tuner import run_tune

    out = run_tune(cfg, args.space or space, resume=args.resume, fixed=command_line_keys(args))
    ctx = out["context"]
    if not args.no_test_eval and out["best_checkpoint"]:
        out["test"] = ctx.evaluate(out["best_checkpoint"], log_to=(out.get("best_run_id"), out["parent_run_id"]))
    _print_summary("xray_match tune", {
        "study": out["study"], "trials": out["trials"], "results": out["storage"],
        "best_checkpoint": out["best_checkpoint"], "tracking_uri": ctx.tracking.uri,
        "parent_run": out.get("parent_run_id"), "best_run": out.get("best_run_id"),
        "registered_model": ctx.model_ref(out.get("model_version")),
        "fixed": out.get("fixed") or None, "best_config": out.get("best_config"),
        "best_val": {k: round(v, 3) for k, v in out.get("best_metrics", {}).items() if k.startswith("val/")},
        "test": {k: round(v, 3) for k, v in out.get("test", {}).items()} or None,
    })
    if out.get("table"):
        print(out["table"], flush=True)
    return out
