"""Steps/s of the shared loop inside one Ray Train worker vs the same loop in plain PyTorch.

Same model (moco_cpu preset), same shards, same number of steps; both time steady-state steps
after a warm-up inside the process that trains (Ray's worker start-up is reported separately: it
is paid once per run, not per step). Goal: ratio >= 0.95.

    uv run python benchmarks/train_overhead.py [--steps 30] [--warmup 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from xray_match.config import load_config
from xray_match.data.digit_scenes import build_digit_scenes
from xray_match.runtime_env import worker_env_vars
from xray_match.train.recipe import DataInfo


def timed_steps(config: dict) -> dict:
    """Runs in either process: build the Trainer, warm up, time ``steps`` optimizer steps."""
    from xray_match.config import Config
    from xray_match.train.loop import Trainer

    cfg = Config.from_dict(config["cfg"])
    info = DataInfo(**config["info"])
    wrap = lambda m: m
    rank, world = 0, 1
    if config.get("ray"):
        import ray.train
        import ray.train.torch

        wrap = ray.train.torch.prepare_model
        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(config["threads"])
    trainer = Trainer(cfg, info, rank=rank, world_size=world, wrap_model=wrap, log=lambda s: None)
    batches = iter(trainer.loader(cfg.data.train_split, True))
    steps, warm = config["steps"], config["warmup"]

    def take(n):
        for _ in range(n):
            yield next(batches)

    trainer.steps_per_epoch = warm
    trainer.train_epoch(take(warm))
    trainer.steps_per_epoch = steps
    t0 = time.perf_counter()
    trainer.train_epoch(take(steps))
    out = {"steps_per_s": steps / (time.perf_counter() - t0)}
    if config.get("ray"):
        import json

        import ray.train

        # Train V2 keeps metrics with checkpoints: report a tiny one carrying the figure
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "steps.json"), "w") as fh:
                json.dump(out, fh)
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = os.path.join(tempfile.gettempdir(), "xray-bench-train-scenes")
    build_digit_scenes(root, train=2000, val=10, test=10, maxcount=250, progress=False)
    cfg = load_config("moco_cpu", ["ray.num_workers=1", "data.num_workers=1", *args.overrides])
    threads = max(1, (os.cpu_count() or 2) - 1)  # one core left for the DataLoader worker
    config = {"cfg": cfg.to_dict(), "info": vars(DataInfo(root, "digit-scenes", {"train": 2000})),
              "steps": args.steps, "warmup": args.warmup, "threads": threads}

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env_vars()})
    plain, in_ray, startup = [], [], []
    for _ in range(args.repeats):
        plain.append(timed_steps(config)["steps_per_s"])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as store:
            trainer = TorchTrainer(
                timed_steps, train_loop_config=config | {"ray": True},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                torch_config=TorchConfig(backend="gloo"), run_config=RunConfig(storage_path=store),
            )
            result = trainer.fit()
        total = time.perf_counter() - t0
        in_ray.append(result.metrics["steps_per_s"])
        startup.append(total - (args.steps + args.warmup) / in_ray[-1])
    ray.shutdown()
    p, r = max(plain), max(in_ray)
    print(f"moco_cpu, batch {cfg.data.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}")
    print(f"{'':>22} {'steps/s':>8}")
    print(f"{'plain PyTorch loop':>22} {p:>8.3f}")
    print(f"{'one Ray Train worker':>22} {r:>8.3f}")
    print(f"{'Ray start-up + fit overhead (s, once per run)':>22}: {min(startup):.1f}")
    print(f"ray/plain steps-per-second ratio: {r / p:.3f}")


if __name__ == "__main__":
    main()
