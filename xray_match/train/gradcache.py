"""Gradient caching: the loss over the whole batch, the encoders in chunks, the full-batch gradient
in the memory of one chunk.

GradCache: Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (RepL4NLP 2021), its method (the gradient cache). For a loss ``L(e_1, ..., e_B)`` of
per-sample embeddings ``e_i = f_theta(x_i)`` the chain rule splits the gradient over the samples:

    dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta)

- (a) every chunk's embeddings, without a graph;
- (b) the loss over all of them, backward to ``u_i = dL/de_i`` only (the cached embeddings are
  leaves; the encoders are not in this graph);
- (c) each chunk again with its graph, and backward from its embeddings with ``u_i`` as their
  gradient (the surrogate ``sum_i u_i . e_i``): the chunk's terms of the sum above.

Peak memory is one chunk's activations plus the batch's embeddings. What makes (c) recompute
exactly (a)'s embeddings, and what the step means:

- RNG: the torch RNG state (CPU and CUDA) at each chunk's start in (a) is restored before its
  re-run, so dropout draws the same masks (GradCache's ``RandContext``).
- BatchNorm: statistics per chunk, in (a) and (c) alike, as DDP gives statistics per GPU: the
  gradient is that of the loss over the batch of a model whose BatchNorm layers normalise each
  chunk (``moco.feature_norm`` too). (a) leaves the running averages as they were; (c) updates them
  once per chunk, as gradient accumulation does.
- What the loss reads beyond the embeddings (:meth:`Recipe.embed_once`: momentum keys) is computed
  once per step over the whole batch without gradient; the recipe's ``after_step`` (queue enqueue)
  runs once per step as without caching.
- The loss gathers across ranks as without caching (:func:`xray_match.distributed.all_gather_with_grad`),
  so (b) gives each rank ``u_i`` of the global batch's loss. Under DDP every chunk but the last
  runs (c) in ``no_sync``: gradients accumulate locally and are all-reduced once, at the last
  chunk's backward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from xray_match.train.recipe import Recipe

Outputs = dict[str, torch.Tensor]


def total_loss(losses: Outputs) -> torch.Tensor:
    """The sum of the ``*_loss`` entries: what a step minimises."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))


def split_batch(batch: dict[str, Any], size: int, item_fields: tuple[str, ...],
                caption_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The batch's items in chunks of ``size``: each chunk holds its items' rows of ``item_fields``
    and its items' captions' rows of ``caption_fields`` (captions are grouped by item:
    ``batch["caption_image"]`` is sorted), with ``caption_image`` counted from the chunk's start."""
    n = batch[item_fields[0]].shape[0]
    starts = list(range(0, n, size))
    chunks = [{f: batch[f][s : s + size] for f in item_fields} for s in starts]
    if caption_fields:
        owner = batch["caption_image"]
        if bool((owner[1:] < owner[:-1]).any()) or (owner.numel() and not 0 <= int(owner[0]) <= int(owner[-1]) < n):
            raise ValueError(f"gradient caching needs the batch's captions grouped by its {n} items (caption_image sorted, "
                             f"in [0, {n}))")
        bounds = torch.searchsorted(owner, torch.tensor(starts + [n], device=owner.device)).tolist()
        for c, s, lo, hi in zip(chunks, starts, bounds, bounds[1:]):
            c |= {f: batch[f][lo:hi] for f in caption_fields} | {"caption_image": owner[lo:hi] - s}
    return chunks


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by the batch's statistics as in training, but their running
    averages (and counters) are left as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for b, s in zip(m.buffers(), bufs):
                    b.copy_(s)


class RngState:
    """The torch RNG state (CPU, and the CUDA devices of ``tensors``) now, to :meth:`restore` later."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.cpu = torch.get_rng_state()
        self.devices, self.cuda = get_device_states(*tensors)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.cuda)


def cached_backward(recipe: Recipe, model: nn.Module, loss_fn: nn.Module, batch: dict[str, Any], size: int,
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[Outputs, Outputs, torch.Tensor]:
    """GradCache's step (module docstring): accumulate into every parameter's ``.grad`` the gradient
    of the batch's :func:`total_loss`, running ``recipe.embed`` over chunks of ``size`` items.

    Returns ``(outputs, losses, loss)`` as a plain step has them: the batch's outputs (detached, the
    cached embeddings and ``recipe.embed_once``'s), the loss module's dict and the summed loss."""
    chunks = split_batch(batch, size, recipe.item_fields, recipe.caption_fields)
    with torch.no_grad(), autocast():
        once = recipe.embed_once(model, batch)
    states, parts = [], []
    with torch.no_grad(), frozen_bn_stats(model):  # (a)
        for c in chunks:
            states.append(RngState([v for v in c.values() if torch.is_tensor(v)]))
            with autocast():
                parts.append(recipe.embed(model, c))
    cache = {k: torch.cat([p[k] for p in parts]).detach().requires_grad_() for k in parts[0]}
    with autocast():  # (b)
        losses = loss_fn(cache | once, batch)
    loss = total_loss(losses)
    loss.backward()
    # an embedding the loss does not read gets a zero gradient: every parameter still takes part (DDP)
    grads = {k: (e.grad if e.grad is not None else torch.zeros_like(e)).split([p[k].shape[0] for p in parts])
             for k, e in cache.items()}
    no_sync = model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext
    for i, (c, state) in enumerate(zip(chunks, states)):  # (c)
        state.restore()
        with no_sync() if i + 1 < len(chunks) else contextlib.nullcontext():
            with autocast():
                out = recipe.embed(model, c)
            torch.autograd.backward([out[k] for k in cache], [grads[k][i].to(out[k].dtype) for k in cache])
    return {k: e.detach() for k, e in cache.items()} | once, losses, loss
