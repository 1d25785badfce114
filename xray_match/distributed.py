"""Collectives that work with world size 1 (no process group) as well as under DDP."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_gather_varsize(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` along dim 0 across ranks in rank order; first dims may differ."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    pad = max(sizes_i) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t.contiguous()
    out = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)])


def all_gather_objects(items: list[Any]) -> list[Any]:
    if not is_dist():
        return list(items)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def all_gather_nograd(t: torch.Tensor) -> torch.Tensor:
    """Same-size gather without gradient (keys for a queue)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: the gathered gradient summed over ranks (all-reduce, which
    gloo and NCCL both have), then this rank's rows — a reduce-scatter."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = slice(dist.get_rank() * t.shape[0], (dist.get_rank() + 1) * t.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Same-size gather for a loss over the global batch whose backward returns to each rank the
    gradient of its rows from every rank's loss. With each rank's loss over its own queries and
    DDP averaging, the update is exactly that of the loss over the global batch (tested).
    Gathering without gradient instead loses the push on keys from other ranks' queries while every
    pull is kept: InfoNCE then collapses (all embeddings equal; we saw it with 2 workers)."""
    if not is_dist():
        return t
    return _GatherWithGrad.apply(t)


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
