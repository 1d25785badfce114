"""Helpers for the serving tests and benchmarks: a tiny trained model as a checkpoint folder and
as a registered MLflow model version (real training steps, real MLflow store)."""

from __future__ import annotations

import os

from xray_match.devcluster import free_port  # noqa: F401 (the tests' port picker)

MOCO_TINY = ["data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=32", "train.epochs=1",
             "ray.num_workers=1", "moco.embed_dim=32", "moco.teacher_hidden=[64]", "moco.lstm_hidden=64"]


def train_checkpoint(data: str, out_dir: str, steps: int = 3, preset: str = "moco_cpu",
                     overrides: list[str] | None = None, seed: int = 0) -> str:
    """Train ``steps`` optimizer steps in this process (no Ray) and save a checkpoint folder."""
    from xray_match.config import load_config
    from xray_match.train.loop import Trainer
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.checkpoint import CKPT_FILE, save_checkpoint

    cfg = load_config(preset, [f"data.path={data}", f"data.steps_per_epoch={steps}", f"train.seed={seed}",
                               "tracking.enabled=false", *(MOCO_TINY if preset.startswith("moco") else []),
                               *(overrides or [])])
    trainer = Trainer(cfg, prepare_info(cfg, progress=False), log=lambda s: None)
    if steps:
        trainer.train_epoch()
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(trainer.state_dict(), os.path.join(out_dir, CKPT_FILE))
    return out_dir


def register(mlflow_uri: str, checkpoint_dir: str, name: str) -> int:
    """Register ``checkpoint_dir`` as a new version of ``name`` (alias champion moves to it), as a
    run's context does."""
    from xray_match.config import load_config
    from xray_match.driver.context import RunContext

    cfg = load_config("moco_cpu", [f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment_name=serve-tests",
                                   f"tracking.registered_model_name={name}"])
    ctx = RunContext.from_config(cfg)
    run_id = ctx.tracking.start_run(f"register-{os.path.basename(checkpoint_dir)}")
    version = ctx.register(ctx.checkpoint(checkpoint_dir), run_id, {})
    ctx.tracking.end_run(run_id)
    return version


def index_cli(model: str, data: str, out: str, tracking_uri: str, *flags: str) -> str:
    """``xray-match index`` on the test split, in this process (joins the running Ray cluster)."""
    from xray_match.cli import main

    rc = main(["index", "--model", model, "--data", data, "--out", out, "--tracking-uri", tracking_uri,
               "--splits", "test", "--batch-size", "16", "--num-cpus", "0.5", "--no-progress", *flags])
    assert rc == 0
    return out


def http(method: str, url: str, body: bytes | None = None, content_type: str = "application/json",
         timeout: float = 60.0) -> tuple[int, bytes, str]:
    """One real HTTP request -> (status, body, content type); error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def post_json(url: str, obj, timeout: float = 60.0):
    import json

    status, body, _ = http("POST", url, json.dumps(obj).encode(), timeout=timeout)
    return status, json.loads(body) if body else None


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail (never hang) after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # e.g. connection refused while a server starts
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def shard_images(data: str, split: str) -> dict[str, bytes]:
    """``key -> image bytes`` read straight from the shards (the reference for served images)."""
    from xray_match.data.format import image_key
    from xray_match.data.reader import iter_raw, shard_urls

    out = {}
    for url in shard_urls(data, split):
        for raw in iter_raw(url):
            out[raw["__key__"]] = raw[image_key(raw)]
    return out
