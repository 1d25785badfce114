"""Ray Train glue: the only module that trains with ``ray.train`` (prepare, report, checkpoint;
reading a stored checkpoint folder is :mod:`xray_match.driver.storage`, the run's storage, MLflow
session and registration are its :class:`~xray_match.driver.context.RunContext`).

``run_training(cfg)`` prepares the data on the driver, starts a TorchTrainer whose workers run
the shared loop (:mod:`xray_match.train.loop`) with DDP through ``prepare_model``, reports every
epoch with a checkpoint from rank 0 (and, with ``train.checkpoint_every_steps``, a checkpoint
every N steps inside an epoch, reported with :data:`STEP_REPORT` set and no validation metrics),
logs to MLflow from rank 0, and resumes automatically: from the latest checkpoint after a worker
failure (FailureConfig), and from the run's storage when the same ``ray.name`` is started again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import torch

from xray_match.config import Config
from xray_match.driver.context import RunContext
from xray_match.driver.storage import Storage
from xray_match.registry import RECIPES
from xray_match.runtime_env import worker_env, worker_env_vars
from xray_match.train.checkpoint import CKPT_FILE, load_checkpoint, save_checkpoint
from xray_match.train.recipe import DataInfo

# Worker progress goes through logging, not print: Ray Train V2 patches print on its workers to tee
# into the root logger as well as the (Ray-wrapped) stdout, so every printed line reached the
# driver twice. A log record reaches it once, and Train's per-worker log files get it too.
_LOG = logging.getLogger("xray_match.train")


def _log(line: str) -> None:
    if _LOG.isEnabledFor(logging.INFO) and logging.getLogger().handlers:
        _LOG.info("[xray_match] %s", line)
    else:  # logging not set up for INFO here (Train's logging switched off): print instead
        print(f"[xray_match] {line}", flush=True)

#: fault injection for tests of FailureConfig: "RANK:epoch=E:MARKER" makes worker RANK exit hard once
#: (when MARKER does not exist yet; it is then created) after training epoch E, before reporting it
#: (the run's latest checkpoint is then that of epoch E - 1); "RANK:step=S:MARKER" after optimizer
#: step S, before any checkpoint of that step. "RANK:step=S:hold:FOLDER" (RANK may be ``*``) makes
#: the worker write ``FOLDER/rank<R>.json`` (its pid and Ray node id) once and wait there until
#: ``FOLDER/release`` exists: a test then kills its node, or stops a server, at a known point.
FAULT_ENV = "XRAY_MATCH_INJECT_WORKER_EXIT"
#: audit trail: a folder where every rank appends one JSON line per optimizer step,
#: ``{"step", "rank", "keys"}`` (the shard keys it trained on), to ``samples-rank<R>.jsonl``
SAMPLE_LOG_ENV = "XRAY_MATCH_SAMPLE_LOG"
#: the key a step checkpoint's report carries (value 1.0); epoch reports do not have it
STEP_REPORT = "step_checkpoint"


class _TrainSession:
    """What the shared worker body needs from Ray: inside a TorchTrainer's worker (``ray.train``)."""

    #: whether reports may carry step checkpoints (:data:`STEP_REPORT`): a Tune trial's reports
    #: all reach the searcher and the scheduler, which need the validation metric
    step_checkpoints = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self.api = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self) -> Any:
        return self.api.get_checkpoint()

    def report(self, metrics: dict[str, float], folder: str | None) -> None:
        checkpoint = self.api.Checkpoint.from_directory(folder) if folder else None
        self.api.report(metrics, checkpoint=checkpoint)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # find_unused_parameters: momentum/key branches and frozen encoders hold no gradients
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) \
            if any(p.requires_grad for p in model.parameters()) else model


class _TrialSession(_TrainSession):
    """The same inside a Tune trial's own actor (``ray.tune``): one worker, no process group."""

    step_checkpoints = False

    def __init__(self) -> None:
        import ray
        import ray.tune

        self.api = ray.tune
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def train_func(config: dict[str, Any]) -> None:
    """Per-worker entry point (``train_loop_per_worker``)."""
    _train(config, _TrainSession())


def train_in_trial(config: dict[str, Any]) -> None:
    """A one-worker trial's loop in the Tune trial's own actor: no TorchTrainer, no controller, no
    worker group, so a reused actor starts its next trial without new processes or imports. It
    reports (and checkpoints) each epoch to Tune; Tune's ``FailureConfig`` restarts it from the last."""
    _train(config, _TrialSession())


def _train(config: dict[str, Any], session: _TrainSession) -> None:
    """The worker body shared by both: resume, log from rank 0, run the loop, report each epoch
    with a checkpoint (and step checkpoints, under a TorchTrainer)."""
    from xray_match.tracking.runs import RankZeroLogger
    from xray_match.train.loop import run

    worker_env()
    cfg = Config.from_dict(config["cfg"])
    info = DataInfo(**config["info"])
    rank = session.rank
    start = None
    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_checkpoint(d)
    logger = RankZeroLogger(config.get("mlflow"), rank, cfg.tracking.flush_timeout_s)
    if start is None:
        logger.start(cfg, RECIPES.get(cfg.model.name).section)

    fault, sample_log = config.get("fault"), config.get("sample_log")

    def checkpoint_report(metrics: dict[str, float], trainer) -> None:
        with tempfile.TemporaryDirectory(prefix="xray-ckpt-") as d:
            if rank == 0:
                save_checkpoint(trainer.state_dict(), os.path.join(d, CKPT_FILE))
            session.report(metrics, d if rank == 0 else None)

    def report(metrics: dict[str, float], trainer, artifacts: list[str]) -> None:
        _maybe_exit(fault, rank, "epoch", int(metrics["epoch"]))
        logger.log_epoch(metrics, int(metrics["epoch"]), artifacts)
        checkpoint_report(metrics, trainer)

    def save(trainer) -> None:
        st = trainer.state
        checkpoint_report({"epoch": float(st.epoch), "step": float(st.step), STEP_REPORT: 1.0}, trainer)

    def on_step(trainer, keys: list[str]) -> None:
        if sample_log:
            with open(os.path.join(sample_log, f"samples-rank{rank}.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": trainer.state.step, "rank": rank, "keys": keys}) + "\n")
        _maybe_exit(fault, rank, "step", trainer.state.step)

    run(cfg, info, rank=rank, world_size=session.world, device=session.device, wrap_model=session.wrap,
        start_state=start, report=report, save=save if session.step_checkpoints else None,
        on_step=on_step if (fault or sample_log) else None, log=_log)
    logger.end()


def _maybe_exit(fault: str | None, rank: int, unit: str, count: int) -> None:
    if not fault:
        return
    r, when, marker = fault.split(":", 2)
    if r not in ("*", str(rank)) or when != f"{unit}={count}":
        return
    if marker.startswith("hold:"):
        folder = marker.removeprefix("hold:")
        mine = os.path.join(folder, f"rank{rank}.json")
        if os.path.exists(mine):
            return
        import ray

        with open(mine + ".tmp", "w") as fh:
            json.dump({"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}, fh)
        os.replace(mine + ".tmp", mine)
        while not os.path.exists(os.path.join(folder, "release")):
            time.sleep(0.2)
        return
    if not os.path.exists(marker):
        open(marker, "w").close()
        # Train V2's controller collects reports when it polls the workers (every 2 s by default); a
        # worker lost before that poll takes the previous epoch's report with it. Wait two polls, so
        # the test asserts the restart, not that race.
        time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1)
        os._exit(1)  # a lost worker: no exception, no cleanup, as when a node dies


def fault_hooks() -> dict[str, str | None]:
    """The fault-injection and audit hooks for tests (:data:`FAULT_ENV`, :data:`SAMPLE_LOG_ENV`) set in this process's environment."""
    return {"fault": os.environ.get(FAULT_ENV), "sample_log": os.environ.get(SAMPLE_LOG_ENV)}


def worker_config(cfg: Config, info: DataInfo, mlflow: dict[str, Any] | None,
                  hooks: dict[str, str | None] | None = None) -> dict[str, Any]:
    """What :func:`train_func` and :func:`train_in_trial` get: the config, the data, the MLflow
    worker spec and the test hooks (default: :func:`fault_hooks` of this process)."""
    return {"cfg": cfg.to_dict(), "info": vars(info), "mlflow": mlflow} | (fault_hooks() if hooks is None else hooks)


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker holds: ``ray.cpus_per_worker`` CPUs, and ``ray.gpus_per_worker`` GPUs."""
    return {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.gpus_per_worker > 0 else {})


def build_trainer(cfg: Config, info: DataInfo, storage: Storage, mlflow: dict[str, Any] | None = None,
                  callbacks: list | None = None, hooks: dict[str, str | None] | None = None):
    """A TorchTrainer of ``cfg`` writing under ``storage`` (the run's, or its study's), its rank-0
    worker logging to the MLflow run of ``mlflow`` (a worker spec of :mod:`xray_match.tracking.runs`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.ray.gpus_per_worker > 0
    resources = worker_resources(cfg)
    backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if use_gpu else "gloo")
    # read by Ray Train's controller, which gets it from the process that calls fit()
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.ray.worker_start_timeout_s)
    return TorchTrainer(
        train_func,
        train_loop_config=worker_config(cfg, info, mlflow, hooks),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(
            name=cfg.ray.name or None,
            storage_path=storage.root,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=None),
            callbacks=callbacks or [],
        ),
    )


def run_training(cfg: Config, *, info: DataInfo | None = None, register: bool | None = None,
                 context: RunContext | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """One training run on the current Ray cluster (started locally if none): returns the final
    metrics, the checkpoint (a :class:`~xray_match.driver.storage.StoredCheckpoint`), the MLflow
    run id, the registered model version, and the ``context`` it ran in (``context``: a study's,
    default: made from ``cfg``; ``parent_run_id``: a study's MLflow run, whose child this run is)."""
    from xray_match.driver.prepare import prepare_info

    if info is None:
        info = prepare_info(cfg)
    ensure_ray()
    start_train_coordinator()
    ctx = context or RunContext.from_config(cfg)
    run_id = ctx.tracking.start_run(run_name=cfg.ray.name or f"train-{cfg.model.name}", parent_run_id=parent_run_id)
    result = build_trainer(cfg, info, ctx.storage, mlflow=ctx.tracking.worker_spec(run_id)).fit()
    ckpt = ctx.checkpoint(result.checkpoint)
    out: dict[str, Any] = {"metrics": dict(result.metrics or {}), "checkpoint": ckpt, "run_id": run_id,
                           "storage": ctx.storage.root, "context": ctx}
    if (cfg.tracking.register if register is None else register) and ckpt is not None:
        out["model_version"] = ctx.register(ckpt, run_id, out["metrics"])
    ctx.tracking.end_run(run_id)
    return out


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Join the cluster at ``$RAY_ADDRESS``, or start a local one, unless Ray is up already (the
    package's one ``ray.init``). Returns whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=log_to_driver,
             runtime_env={"env_vars": worker_env_vars()})
    return True


def start_train_coordinator(timeout_s: float = 120.0) -> None:
    """Start Ray Train's autoscaling coordinator (one detached actor per cluster) and wait until it
    is up. Every TorchTrainer's controller asks it for resources with a 5 s timeout; the first ask
    on a cold cluster starts the actor, which takes longer than that on a busy small machine, and
    the controller then logs a ``GetTimeoutError`` traceback in a healthy run. Private Ray API:
    where it has moved, this does nothing."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=timeout_s)
