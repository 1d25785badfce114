"""Checkpoints, in one place: the file name, writing, opening, and rebuilding / evaluating the
model a checkpoint holds. Plain PyTorch: where Ray stores runs is
:mod:`xray_match.driver.storage`.

A checkpoint is one file, :data:`CKPT_FILE`, holding a dict of plain data only: tensors, numbers,
strings, booleans, None, and lists / tuples / dicts of them (:func:`check_plain`).
:func:`save_checkpoint` writes it whole before it has its name (a rename locally, one upload on
an object store), so a reader sees the old file or the whole new one; :func:`load_checkpoint`
opens it with ``torch.load(weights_only=True)`` (the only ``torch.load`` in the package), which
refuses anything else, so opening a checkpoint never runs code from the file. Checkpoints written
before this format (a numpy RNG state inside) do not open: train them again.

The training loop's state (:meth:`xray_match.train.loop.Trainer.state_dict`) has the keys
``model``, ``loss``, ``optimizer``, ``scheduler``, ``loop``, ``rng``, ``config``, ``info`` and
``recipe``; :func:`restore_model` and :func:`evaluate_checkpoint` need only the model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from xray_match.config import Config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from xray_match.train.recipe import Recipe

CKPT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """No checkpoint at a path, or a file that is not a plain-data checkpoint (the message says which)."""


# ----------------------------------------------------------------------------- the file


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value (by its key path) that ``torch.load`` with
    ``weights_only=True`` would refuse to open."""
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not a str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} is not plain data "
                    "(tensors, numbers, strings and lists / dicts of them)")


def save_checkpoint(state: Mapping[str, Any], path: str) -> None:
    """Write ``state`` (plain data, checked first) to ``path`` (a local path or a URL) atomically:
    readers see the old file or the whole new one (:func:`~xray_match.data.io.write_atomic`: a
    rename locally; on an object store one upload, which makes the object appear whole)."""
    import torch

    from xray_match.data.io import write_atomic

    check_plain(state)
    write_atomic(path, lambda fh: torch.save(state, fh))


def checkpoint_file(path: str) -> str:
    """``path`` itself when it is a file; else the :data:`CKPT_FILE` in the folder ``path``, or the
    first one below it (a registered model's artifacts nest it). Local paths and URLs (a URL gives
    a URL)."""
    from xray_match.data.io import filesystem, unstrip

    fs, p = filesystem(path)
    if fs.isfile(p):
        return path
    if fs.isdir(p):
        direct = f"{p.rstrip('/')}/{CKPT_FILE}"
        hits = [direct] if fs.isfile(direct) else sorted(fs.glob(f"{p.rstrip('/')}/**/{CKPT_FILE}"))
        if hits:
            return unstrip(fs, hits[0], like=path)
    raise CheckpointError(f"{path!r} is not a {CKPT_FILE} file or a folder holding one")


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The plain-data dict saved at ``path``: a checkpoint file or a folder holding one (local or URL)."""
    import torch

    from xray_match.data.io import open_url

    file = checkpoint_file(path)
    try:
        with open_url(file, "rb") as fh:
            state = torch.load(fh, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt, foreign or old-format file: one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: not a readable plain-data checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a dict")
    return state


# ----------------------------------------------------------------------------- the model inside


def restore_model(state: Mapping[str, Any], device: Any = "cpu",
                  overrides: dict[str, Any] | None = None) -> tuple["Recipe", "nn.Module"]:
    """The checkpoint's recipe and its model with the saved weights on ``device``, in eval mode:
    no optimizer, scheduler or loss is built. ``overrides`` change the saved config first."""
    from xray_match.registry import RECIPES
    from xray_match.train.recipe import DataInfo

    cfg = Config.from_dict(state["config"])
    if overrides:
        cfg = cfg.with_overrides(overrides)
    recipe = RECIPES.get(state["recipe"])(cfg, DataInfo(**state["info"]))
    model = recipe.build_model()
    model.load_state_dict(state["model"])
    return recipe, model.to(device).eval()


def load_inference(path: str, device: Any = "cpu") -> Any:
    """A checkpoint folder or file -> the recipe's inference object (preprocessing included)."""
    recipe, model = restore_model(load_checkpoint(path), device)
    return recipe.inference(model)


def evaluate_checkpoint(path: str, splits: Iterable[str] | None = None, *,
                        device: "torch.device | None" = None) -> dict[str, float]:
    """Metrics of the checkpoint at ``path`` (a file, or a folder holding one; local or a URL such as
    the ones :mod:`xray_match.driver` hands out) on each split (default: its config's test split),
    in this process at world size 1."""
    import torch

    from xray_match.train.loop import autocast_for, evaluate_split, seed_everything

    state = load_checkpoint(path)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(int(state["config"]["train"]["seed"]))  # as a Trainer would, before building the model
    recipe, model = restore_model(state, device)
    out: dict[str, float] = {}
    for split in splits or [recipe.cfg.data.test_split]:
        metrics, _ = evaluate_split(recipe, model, split, device=device, autocast=autocast_for(recipe.cfg, device))
        out |= metrics
    return out
