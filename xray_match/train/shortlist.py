"""A two-stage shortlist from another embedding model (``rdan.shortlist_model``): that model's image
and caption vectors for the samples an evaluation ranks, in the evaluation's own order.

The other model (a checkpoint of any recipe whose inference object embeds both sides, e.g. the
contrastive one) reads the split's shards itself, through its own preprocessing, so its inputs need
not be the cross-attention model's. :mod:`xray_match.metrics.two_stage` then shortlists by these
vectors and reranks exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as Fn

from xray_match.data.format import ShardFormatError
from xray_match.data.reader import decode_sample, iter_raw, shard_urls
from xray_match.train.checkpoint import CheckpointError, load_inference


def _vectors(x: Any, what: str, where: str) -> torch.Tensor:
    t = torch.as_tensor(x.numpy() if hasattr(x, "numpy") else x, dtype=torch.float32)
    if t.ndim != 2:
        raise CheckpointError(f"{where}: {what} returned shape {tuple(t.shape)}, not (N, D): a shortlist "
                              "model must embed each side (a cross-attention model scores pairs)")
    return t


@torch.no_grad()
def embed_samples(checkpoint: str, root: str, split: str, keys: Sequence[str], counts: Sequence[int], *,
                  device: Any = "cpu", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised vectors of the checkpoint's model: (len(keys), E) images in ``keys`` order and
    (sum(counts), E) captions, each image's ``counts[i]`` captions in its json order after those of
    the images before it. Reads split ``split`` of the shard folder ``root``; a key that is not
    there, or whose caption count differs, is an error naming it."""
    model = load_inference(checkpoint, device)
    if not (hasattr(model, "encode_images") and hasattr(model, "encode_texts")):
        raise CheckpointError(f"{checkpoint}: {type(model).__name__} does not embed images and texts")
    want = set(keys)
    img: dict[str, torch.Tensor] = {}
    txt: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, Any, list[str]]] = []

    def flush() -> None:
        if not pending:
            return
        iv = _vectors(model.encode_images([p[1] for p in pending]), "encode_images", checkpoint)
        tv = _vectors(model.encode_texts([c for p in pending for c in p[2]]), "encode_texts", checkpoint)
        start = 0
        for (key, _, caps), v in zip(pending, iv):
            img[key], txt[key] = v, tv[start : start + len(caps)]
            start += len(caps)
        pending.clear()

    for url in shard_urls(root, split):
        for raw in iter_raw(url):
            if raw["__key__"] in want and raw["__key__"] not in img:
                s = decode_sample(raw, parts=frozenset())
                pending.append((s["key"], s["image"], list(s["meta"]["captions"])))
                if len(pending) >= batch_size:
                    flush()
    flush()
    for key, n in zip(keys, counts):
        if key not in img:
            raise ShardFormatError(f"{root}: split {split!r} has no sample {key!r} for the shortlist model")
        if len(txt[key]) != n:
            raise ShardFormatError(f"{root}: sample {key!r} has {len(txt[key])} captions, the evaluation ranks {n}")
    images = torch.stack([img[k] for k in keys])
    captions = torch.cat([txt[k] for k in keys])
    if images.shape[1] != captions.shape[1]:
        raise CheckpointError(f"{checkpoint}: image vectors of {images.shape[1]} and caption vectors of "
                              f"{captions.shape[1]} dimensions cannot be compared")
    return Fn.normalize(images, dim=-1), Fn.normalize(captions, dim=-1)
