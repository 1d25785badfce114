"""Evaluating a model that embeds images and captions into one space (moco, dspe), written once:
the split is embedded batch by batch, gathered across ranks, and ranked by dot product in chunks
(:func:`xray_match.metrics.retrieval.chunked_ranks`)."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

from xray_match.metrics.plots import save_recall_curve
from xray_match.metrics.retrieval import chunked_ranks, summarize
from xray_match.train.recipe import EvalContext, unwrap

#: ``(net, batch, device) -> (image_emb (B, D), caption_emb (M, D))`` of one evaluation batch
Encode = Callable[[nn.Module, dict[str, Any], torch.device], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def embed_split(model: nn.Module, batches: Iterable[dict[str, Any]], ctx: EvalContext, encode: Encode,
                dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_emb (N, D), caption_emb (M, D), caption_image (M,))`` of the whole split, on the CPU,
    in rank order. A batch holds ``image`` (B, ...) and ``caption_image`` (M,), the row of each
    caption's image; ``dim`` (D) shapes the part of a rank that had no batch."""
    net = unwrap(model)
    imgs, txts, counts = [], [], []
    for batch in batches:
        with ctx.autocast():
            img, txt = encode(net, batch, ctx.device)
        imgs.append(img.float())
        txts.append(txt.float())
        counts.append(torch.bincount(batch["caption_image"].cpu(), minlength=batch["image"].shape[0]))
    img = ctx.gather(torch.cat(imgs) if imgs else torch.zeros(0, dim, device=ctx.device))
    txt = ctx.gather(torch.cat(txts) if txts else torch.zeros(0, dim, device=ctx.device))
    cnt = ctx.gather((torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)).to(ctx.device))
    return img.cpu(), txt.cpu(), torch.repeat_interleave(torch.arange(len(cnt)), cnt.cpu())


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, caption_image: torch.Tensor, ctx: EvalContext,
                      title: str) -> dict[str, float]:
    """Recall@K both ways and rsum (:func:`~xray_match.metrics.retrieval.summarize`) of the embedded
    split, scored by dot product, with its image and caption counts. On rank 0 with an
    ``ctx.out_dir`` the recall curve (titled ``title``) goes to ``ctx.artifacts``."""
    r_i2t, r_t2i = chunked_ranks(lambda rows: img[rows] @ txt.T, img.shape[0], caption_image)
    out = summarize(r_i2t, r_t2i)
    out["images"], out["captions"] = float(img.shape[0]), float(txt.shape[0])
    if ctx.is_main and ctx.out_dir:
        ctx.artifacts.append(save_recall_curve(r_i2t, r_t2i, os.path.join(ctx.out_dir, "recall_curve.png"), title=title))
    return out
