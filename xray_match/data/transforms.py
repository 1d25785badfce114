"""Image transforms shared by the recipes (torchvision v2)."""

from __future__ import annotations

import hashlib

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(size: int, hflip: bool = False) -> v2.Compose:
    """PIL -> float tensor in [0, 1], (3, size, size); normalisation comes after gaze (Eq. (2))."""
    ops = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def normalize() -> v2.Normalize:
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def saliency_to_tensor(size: int) -> v2.Compose:
    """PIL "L" -> (1, size, size) in [0, 1]."""
    return v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])


def stable_id(image_id: str | int) -> int:
    """A non-negative int64 from an image id (strings hashed stably across processes)."""
    if isinstance(image_id, int) and image_id >= 0:
        return image_id
    return int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8).digest(), "little") & (2**62 - 1)
