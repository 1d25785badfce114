"""Stage 1 of grounding-mcb-attention (§3): the stride-1 ResNet-18 trained as a digit classifier on
single MNIST digits, in one process (no Ray: minutes on a GPU), saved for the grounding recipe's
``grounding.init=pretrained`` (:func:`xray_match.recipes.grounding.load_backbone_checkpoint` reads it).
``jobs/pretrain_mnist.py`` runs :func:`pretrain_backbone`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from xray_match.config import Config
from xray_match.models.backbones import DigitClassifier, resnet18_stride1
from xray_match.recipes.grounding import CKPT_FORMAT, IN_CHANNELS, MNIST_MEAN, MNIST_STD, default_backbone_path


def _digit_batches(images: np.ndarray, labels: np.ndarray, batch: int, rng: np.random.Generator | None,
                   noise_std: float) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(images)) if rng is not None else np.arange(len(images))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        x = images[idx].astype(np.float32)
        if rng is not None and noise_std > 0:
            # the multi-MNIST noise, at a random strength per image, so stage 1 sees it too
            std = rng.uniform(0, noise_std, size=(len(idx), 1, 1)).astype(np.float32)
            x = np.clip(x + rng.normal(size=x.shape).astype(np.float32) * std, 0, 255)
        x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
        yield torch.from_numpy(x)[:, None], torch.from_numpy(labels[idx].astype(np.int64))


@torch.no_grad()
def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, autocast: Callable[[], Any],
              device: torch.device) -> float:
    model.eval()
    hits = 0
    for x, y in _digit_batches(images, labels, 500, None, 0.0):
        with autocast():
            hits += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return 100.0 * hits / len(labels)


def pretrain_backbone(cfg: Config, out: str | None = None, log: Callable[[str], None] = print,
                      max_steps: int | None = None, eval_limit: int | None = None) -> dict[str, Any]:
    """Stage 1 (§3): the stride-1 ResNet-18 (``grounding.backbone_width``) + a linear classifier on
    single MNIST digits — MNIST-train 0..53999 to train, 54000..59999 to watch, MNIST-test to report
    (the paper: 99.40%). SGD (Nesterov) under a one-cycle schedule (15% warm-up, then cosine
    annealing; momentum cycled 0.85-0.95); the multi-MNIST Gaussian noise as augmentation. Runs on
    the GPU when there is one (bf16 autocast there with ``train.precision`` auto/bf16). Saves ``{format, backbone, width, in_channels, val_acc, test_acc, ...}`` to ``out``.
    ``max_steps`` / ``eval_limit`` cut the run short (tests)."""
    from xray_match.data.mnist import load_mnist
    from xray_match.train.checkpoint import save_checkpoint
    from xray_match.train.loop import autocast_for, seed_everything

    g = cfg.grounding
    out = out or default_backbone_path(cfg)
    seed_everything(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    images, labels = load_mnist("train")
    test_images, test_labels = load_mnist("test")
    tr, va = slice(0, 54000), slice(54000, 60000 if eval_limit is None else 54000 + eval_limit)
    test_images, test_labels = test_images[:eval_limit], test_labels[:eval_limit]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DigitClassifier(resnet18_stride1(g.backbone_width, IN_CHANNELS), g.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=g.pretrain_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = g.pretrain_epochs * math.ceil(54000 / g.pretrain_batch_size)
    steps = min(steps, max_steps) if max_steps else steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=g.pretrain_lr, total_steps=steps, pct_start=0.15)
    autocast = autocast_for(cfg, device)
    t0, step = time.perf_counter(), 0
    for epoch in range(g.pretrain_epochs):
        model.train()
        for x, y in _digit_batches(images[tr], labels[tr], g.pretrain_batch_size, rng, g.data.noise_std):
            if step >= steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"stage 1 epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")
        val_acc = _accuracy(model, images[va], labels[va], autocast, device)
        log(f"stage 1 epoch {epoch + 1}: val acc {val_acc:.2f}%")
    test_acc = _accuracy(model, test_images, test_labels, autocast, device)
    model.cpu()
    result = {"format": CKPT_FORMAT, "backbone": model.backbone.state_dict(), "classifier": model.fc.state_dict(),
              "width": g.backbone_width, "in_channels": IN_CHANNELS, "val_acc": val_acc, "test_acc": test_acc,
              "epochs": g.pretrain_epochs, "seed": cfg.train.seed, "wall_s": time.perf_counter() - t0}
    save_checkpoint(result, out)  # atomic: a killed run never leaves a half-written backbone
    log(f"stage 1: MNIST-test accuracy {test_acc:.2f}% (val {val_acc:.2f}%) in {result['wall_s']:.0f}s -> {out}")
    return {k: v for k, v in result.items() if k not in ("backbone", "classifier")} | {"path": out}
