"""Helpers for the serving tests and benchmarks: a tiny trained model as a checkpoint folder and
as a registered MLflow model version (real training steps, real MLflow store)."""

from __future__ import annotations

import os

MOCO_TINY = ["data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=32", "train.epochs=1",
             "ray.num_workers=1", "moco.embed_dim=32", "moco.teacher_hidden=[64]", "moco.lstm_hidden=64"]


def train_checkpoint(data: str, out_dir: str, steps: int = 3, preset: str = "moco_cpu",
                     overrides: list[str] | None = None, seed: int = 0) -> str:
    """Train ``steps`` optimizer steps in this process (no Ray) and save a checkpoint folder."""
    import torch

    from xray_match.config import load_config
    from xray_match.train.loop import Trainer
    from xray_match.train.prepare import prepare_info
    from xray_match.train.worker import CKPT_FILE

    cfg = load_config(preset, [f"data.path={data}", f"data.steps_per_epoch={steps}", f"train.seed={seed}",
                               "tracking.enabled=false", *(MOCO_TINY if preset.startswith("moco") else []),
                               *(overrides or [])])
    trainer = Trainer(cfg, prepare_info(cfg, progress=False), log=lambda s: None)
    if steps:
        trainer.train_epoch()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(trainer.state_dict(), os.path.join(out_dir, CKPT_FILE))
    return out_dir


def register(mlflow_uri: str, checkpoint_dir: str, name: str, data: str) -> int:
    """Register ``checkpoint_dir`` as a new version of ``name`` (alias champion moves to it)."""
    from xray_match.config import load_config
    from xray_match.tracking.runs import TrackingSession
    from xray_match.train.recipe import DataInfo

    cfg = load_config("moco_cpu", [f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment_name=serve-tests"])
    session = TrackingSession(cfg)
    run_id = session.start_run(f"register-{os.path.basename(checkpoint_dir)}")
    version = session.register(checkpoint_dir, run_id, {}, DataInfo(root=data, dataset="digit-scenes", counts={}), name=name)
    session.end_run(run_id)
    return version
