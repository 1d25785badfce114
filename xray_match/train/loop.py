"""The training loop: plain PyTorch, shared by every method, no Ray inside.

:func:`run` drives epochs of a fixed number of steps over an endless shard stream, evaluates on
the whole validation split, and hands each epoch's metrics and the trainer to a ``report``
function; with ``train.checkpoint_every_steps`` it also hands the trainer to a ``save`` function
every N steps inside an epoch. :mod:`xray_match.driver.worker` passes Ray Train's prepare/report;
the benchmarks and tests call it directly with world size 1.

Resuming in the middle of an epoch is exact: the checkpoint holds the epoch's step, its partial
metric sums, every rank's RNG state and every reader's data position
(:mod:`xray_match.data.reader`), so the resumed run takes the same batches, in the same order,
with the same augmentations, as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config
from xray_match.data.reader import make_loader, take_bookkeeping
from xray_match.distributed import all_gather_objects, all_reduce_mean
from xray_match.registry import RECIPES
from xray_match.train.gradcache import cached_backward, total_loss
from xray_match.train.recipe import DataInfo, EvalContext, Recipe, move_to, unwrap


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    skipped: int = 0  # corrupt samples skipped (skip mode)
    resumes: int = 0  # times this run continued from a checkpoint (worker failure or a re-run)
    history: list[dict[str, float]] = field(default_factory=list)
    # inside an epoch (a step checkpoint): steps done in it, its metric sums and samples so far, and
    # the data position of every reader ({slot: raw items taken}) for a world of data_world ranks
    epoch_step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_seen: int = 0
    data_pos: dict[int, int] = field(default_factory=dict)
    data_world: int = 0


def build_optimizer(params: Any, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warm, kind = cfg.optim.warmup_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            t = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def steps_per_epoch(cfg: Config, info: DataInfo, world_size: int) -> int:
    if cfg.data.steps_per_epoch:
        return cfg.data.steps_per_epoch
    n = info.counts.get(cfg.data.train_split, 0)
    return max(1, n // (cfg.data.batch_size * world_size))


def autocast_for(cfg: Config, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast on GPU (``precision: auto|bf16``); a no-op context on CPU or with fp32."""
    use = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    if cfg.train.precision == "bf16" and device.type != "cuda":
        use = device.type == "cpu"  # explicit request: CPU bf16 autocast also exists
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain data (numpy's key array as a list), so a checkpoint holds no
    numpy object and opens with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    """Holds what one worker trains; ``train_epoch`` and ``evaluate`` are the whole loop body."""

    def __init__(self, cfg: Config, info: DataInfo, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
                 log: Callable[[str], None] = print):
        self.cfg, self.info = cfg, info
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.log = log if rank == 0 else (lambda s: None)
        seed_everything(cfg.train.seed + rank)
        self.recipe: Recipe = RECIPES.get(cfg.model.name)(cfg, info)
        model = self.recipe.build_model().to(self.device)
        self.loss_fn = self.recipe.build_loss().to(self.device)
        self.model = wrap_model(model)
        self.optimizer = build_optimizer(self.recipe.param_groups(unwrap(self.model)), cfg)
        self.steps_per_epoch = steps_per_epoch(cfg, info, world_size)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch * cfg.train.epochs)
        self.autocast = autocast_for(cfg, self.device)
        self.state = LoopState()
        self.rank_rng: list[Any] = []  # every rank's RNG state, gathered by sync_resume_state
        self._rank_pos: dict[int, int] = {}  # this rank's readers' positions in the current epoch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loop": vars(self.state),
            "rng": rng_state(),
            "rank_rng": self.rank_rng,
            "config": self.cfg.to_dict(),
            "info": vars(self.info),
            "recipe": self.cfg.model.name,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(s["model"])
        self.loss_fn.load_state_dict(s["loss"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.state = LoopState(**s["loop"])
        ranks = s.get("rank_rng") or []
        if len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        elif self.rank == 0 and "rng" in s:
            set_rng_state(s["rng"])
        else:  # other ranks of an older checkpoint or another world size: distinct, reproducible streams
            seed_everything(self.cfg.train.seed + self.rank + 1000 * self.state.epoch + self.state.step)
        if self.state.epoch_step and self.state.data_world != self.world_size:
            self.log(f"warning: the checkpoint's data position is for {self.state.data_world} ranks, this run has "
                     f"{self.world_size}: the rest of epoch {self.state.epoch + 1} reads a fresh order")
            self.state.data_pos = {}

    def sync_resume_state(self) -> None:
        """Collective (every rank calls it): gather every rank's data position and RNG state, so
        that rank 0's :meth:`state_dict` can resume all of them."""
        mine = self._rank_pos if self.state.epoch_step else {}  # at an epoch's end the next one starts afresh
        gathered = all_gather_objects([(mine, rng_state())])
        self.state.data_pos = {slot: n for pos, _ in gathered for slot, n in pos.items()}
        self.state.data_world = self.world_size
        self.rank_rng = [rng for _, rng in gathered]

    # ------------------------------------------------------------------ data
    def loader(self, split: str, train: bool, epoch: int = 0, start: dict[int, int] | None = None,
               taken: int = 0) -> Iterable[dict[str, Any]]:
        return split_loader(self.recipe, split, train, rank=self.rank, world_size=self.world_size, epoch=epoch,
                            start=start, taken=taken)

    # ------------------------------------------------------------------ loop body
    def train_epoch(self, batches: Iterable[dict[str, Any]] | None = None, *,
                    save: Callable[["Trainer"], None] | None = None,
                    on_step: Callable[["Trainer", list[str]], None] | None = None) -> dict[str, float]:
        """The epoch's remaining optimizer steps (all ``steps_per_epoch`` of them, unless a step
        checkpoint resumed it half-way); returns the epoch's mean of every logged scalar.

        ``on_step(trainer, keys)`` runs after every step with the shard keys the step trained on;
        ``save(trainer)`` every ``train.checkpoint_every_steps`` steps (not at the epoch's last step,
        which the caller checkpoints), after :meth:`sync_resume_state` on every rank."""
        self.model.train()
        self.loss_fn.train()
        st = self.state
        every = self.cfg.train.checkpoint_every_steps
        if batches is None:
            # this rank's readers only: a resumed epoch skips what the checkpoint's readers had taken
            batches = self.loader(self.cfg.data.train_split, True, st.epoch, start=dict(st.data_pos),
                                  taken=st.epoch_step if st.data_pos else 0)
        self._rank_pos: dict[int, int] = {}
        sums, seen = dict(st.epoch_sums), st.epoch_seen
        t0, seen_here = time.perf_counter(), 0
        it = iter(batches)
        for i in range(st.epoch_step, self.steps_per_epoch):
            batch = next(it)
            skipped, pos, keys = take_bookkeeping(batch)
            st.skipped += skipped
            self._rank_pos |= pos
            batch = move_to(batch, self.device)
            outputs, losses, loss = self.backward(batch)
            if self.cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.recipe.after_step(self.model, self.loss_fn, outputs, batch)
            st.step += 1
            n = _batch_size(batch)
            seen, seen_here = seen + n, seen_here + n
            logged = {"loss": float(loss.detach())} | {k: float(v.detach()) for k, v in losses.items()}
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            if (i + 1) % self.cfg.train.log_every == 0 or i + 1 == self.steps_per_epoch:
                rate = seen_here * self.world_size / (time.perf_counter() - t0)
                self.log(f"epoch {st.epoch + 1} step {i + 1}/{self.steps_per_epoch} "
                         f"loss {logged['loss']:.4f} lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.1f} samples/s")
            if on_step:
                on_step(self, keys)
            if save and every and st.step % every == 0 and i + 1 < self.steps_per_epoch:
                st.epoch_step, st.epoch_sums, st.epoch_seen = i + 1, dict(sums), seen
                self.sync_resume_state()
                save(self)
        del it
        st.epoch_step, st.epoch_sums, st.epoch_seen, st.data_pos = 0, {}, 0, {}
        out = {f"train/{k}": all_reduce_mean(v / self.steps_per_epoch, self.device) for k, v in sums.items()}
        out["train/samples_per_s"] = seen_here * self.world_size / max(time.perf_counter() - t0, 1e-9)
        out["train/skipped"] = float(self.state.skipped)
        return out

    def backward(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """The step's gradient in every parameter's ``.grad`` (zeroed first), and its outputs, named
        losses and summed loss: in one pass, or with ``train.micro_batch_size`` chunk by chunk by
        gradient caching (:mod:`xray_match.train.gradcache`: the same gradient, BatchNorm per chunk)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.micro_batch_size:
            return cached_backward(self.recipe, self.model, self.loss_fn, batch, self.cfg.train.micro_batch_size,
                                   self.autocast)
        with self.autocast():
            outputs = self.recipe.forward(self.model, batch)
            losses = self.loss_fn(outputs, batch)
        loss = total_loss(losses)
        loss.backward()
        return outputs, losses, loss

    @torch.no_grad()
    def recompute_bn_stats(self, n_batches: int) -> None:
        """Precise BN: replace every BatchNorm's running averages by the plain mean over
        ``n_batches`` fresh training batches, with the weights as they are now.

        The running averages follow the weights with an EMA (momentum 0.1, about ten steps). At a high
        learning rate the weights move faster than that, and the averages describe weights that no
        longer exist: the moco_cpu model trained at lr 2e-3 scored val rsum 30 in eval mode and 231
        after this recomputation (docs/moco.md). Runs on each rank with its own data and no
        collective; DDP broadcasts rank 0's buffers at the next forward, and rank 0 checkpoints."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms or n_batches <= 0:
            return
        net = unwrap(self.model)
        was_training = net.training
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        net.train()
        # a shuffle stream of its own (epoch tag far from the training epochs): the training
        # iterator and its position are untouched
        batches = self.loader(self.cfg.data.train_split, True, epoch=1_000_000 + self.state.epoch)
        with self.autocast():
            for i, batch in enumerate(batches):
                if i == n_batches:
                    break
                take_bookkeeping(batch)
                self.recipe.forward(net, move_to(batch, self.device))
        for m, mom in zip(norms, saved):
            m.momentum = mom
        net.train(was_training)

    @torch.no_grad()
    def evaluate(self, split: str | None = None, out_dir: str | None = None) -> tuple[dict[str, float], list[str]]:
        return evaluate_split(self.recipe, self.model, split or self.cfg.data.val_split, rank=self.rank,
                              world_size=self.world_size, device=self.device, autocast=self.autocast, out_dir=out_dir)


def split_loader(recipe: Recipe, split: str, train: bool, *, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, start: dict[int, int] | None = None, taken: int = 0,
                 source: str | None = None) -> Iterable[dict[str, Any]]:
    """Batches of ``split`` for this rank through the recipe's transform and collate: of the run's
    folder, of its sources mixed, or (``source``) of the one source of that name."""
    cfg, d = recipe.cfg, recipe.cfg.data
    data = recipe.info.stream()
    if source is not None:
        data = [s for s in data if s.name == source]
    return make_loader(
        data, split, recipe.transform(train), recipe.collate,
        batch_size=d.batch_size if train else d.eval_batch_size, train=train, rank=rank,
        world_size=world_size, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
        seed=cfg.train.seed, epoch=epoch, skip_corrupt=d.skip_corrupt, start=start, taken=taken,
    )


@torch.no_grad()
def evaluate_split(recipe: Recipe, model: nn.Module, split: str, *, rank: int = 0, world_size: int = 1,
                   device: torch.device | None = None, autocast: Callable[[], Any] = contextlib.nullcontext,
                   out_dir: str | None = None) -> tuple[dict[str, float], list[str]]:
    """The recipe's metrics of ``model`` over the whole split, prefixed ``val/`` for the validation
    split and ``<split>/`` otherwise, and the figures rank 0 wrote into ``out_dir``.

    A mixed run's split is every source's samples together (``val/rsum``: retrieval among all of
    them), and then each source's on its own (``val/<source>/rsum``), without figures."""
    device = device or torch.device("cpu")
    model.eval()
    prefix = "val" if split == recipe.cfg.data.val_split else split
    out: dict[str, float] = {}
    artifacts: list[str] = []
    for source in [None, *(s["name"] for s in recipe.info.sources)]:
        ctx = EvalContext(rank, world_size, device, autocast, out_dir if source is None else None, split=split)
        batches = (move_to(b, device) for b in split_loader(recipe, split, train=False, rank=rank,
                                                            world_size=world_size, source=source))
        metrics = recipe.evaluate(model, batches, ctx)
        out |= {f"{prefix}/{source + '/' if source else ''}{k}": float(v) for k, v in metrics.items()}
        artifacts += ctx.artifacts
    return out, artifacts


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if torch.is_tensor(v) and v.dim() > 0:
                return v.shape[0]
    return len(batch) if hasattr(batch, "__len__") else 0


def run(cfg: Config, info: DataInfo, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
        start_state: dict[str, Any] | None = None,
        report: Callable[[dict[str, float], Trainer, list[str]], None] | None = None,
        save: Callable[[Trainer], None] | None = None,
        on_step: Callable[[Trainer, list[str]], None] | None = None,
        log: Callable[[str], None] = print) -> Trainer:
    """Train ``cfg.train.epochs`` epochs (continuing from ``start_state``), evaluating after each;
    ``save`` and ``on_step`` as in :meth:`Trainer.train_epoch`."""
    trainer = Trainer(cfg, info, rank=rank, world_size=world_size, device=device, wrap_model=wrap_model, log=log)
    if start_state is not None:
        trainer.load_state_dict(start_state)
        trainer.state.resumes += 1
        within = f", step {trainer.state.epoch_step} of epoch {trainer.state.epoch + 1}" if trainer.state.epoch_step else ""
        trainer.log(f"resumed at epoch {trainer.state.epoch} (step {trainer.state.step}{within})")
    with tempfile.TemporaryDirectory(prefix="xray-eval-") as out_dir:
        while trainer.state.epoch < cfg.train.epochs:
            t0 = time.perf_counter()
            metrics = trainer.train_epoch(save=save, on_step=on_step)
            trainer.recompute_bn_stats(cfg.train.bn_recompute_batches)
            trainer.state.epoch += 1
            epoch_dir = os.path.join(out_dir, f"epoch{trainer.state.epoch:03d}")
            val, artifacts = trainer.evaluate(out_dir=epoch_dir)
            metrics |= val
            metrics |= {"epoch": float(trainer.state.epoch), "step": float(trainer.state.step),
                        "epoch_time_s": time.perf_counter() - t0}
            trainer.state.history.append(metrics)
            trainer.log(f"epoch {trainer.state.epoch}: " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val/")))
            if report:
                trainer.sync_resume_state()
                report(metrics, trainer, artifacts)
    return trainer
