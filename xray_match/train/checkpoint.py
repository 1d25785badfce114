"""Checkpoints, in one place: the file name, writing, opening, where runs are stored, and
rebuilding / evaluating the model a checkpoint holds.

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

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xray_match.config import Config, xray_home

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


# ----------------------------------------------------------------------------- where runs are stored


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint folder in a run's storage, named by the URL a user can type
    (``s3://bucket/runs/NAME/checkpoint_000002``; an absolute path for a local root). This, not
    the path Ray reports, is what the library hands out: what is printed, logged or tagged."""

    url: str

    def __str__(self) -> str:
        return self.url

    def ray(self) -> Any:
        """The ``ray.train.Checkpoint`` of the folder (its pyarrow file system from the URL)."""
        from ray.train import Checkpoint

        return Checkpoint(path=self.url)

    def as_directory(self) -> Any:
        """A local folder holding the checkpoint (downloaded from an object store) for a ``with``."""
        return self.ray().as_directory()

    def load(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The checkpoint's state (only :data:`CKPT_FILE` is read, not the whole folder)."""
        return load_checkpoint(self.url, map_location)


class Storage:
    """Where Ray stores runs and checkpoints: ``ray.storage_path``, or ``$XRAY_MATCH_HOME/runs``.

    ``root`` is what Ray's ``storage_path`` gets: an absolute local path (Ray needs one) or a URL
    (``s3://``, ``gs://``, ``file://``). Ray opens a URL root with pyarrow, which reads the same
    ``AWS_*`` variables as the package's fsspec file systems. Under a URL root Ray reports
    checkpoint paths without the scheme (``bucket/runs/...``, the path inside its pyarrow file
    system): :meth:`checkpoint` puts it back, so nothing handed on has lost it."""

    def __init__(self, storage_path: str):
        raw = storage_path or str(xray_home() / "runs")
        self.remote = "://" in raw
        self.root = raw if self.remote else os.path.abspath(os.path.expanduser(raw))
        self.scheme = self.root.split("://", 1)[0] if self.remote else ""

    def join(self, *parts: str) -> str:
        from xray_match.data.format import join

        return join(self.root, *parts)

    def url(self, path: str) -> str:
        """A path Ray reported under this root as a URL (unchanged when it is one already, or an
        absolute local path: Ray's paths inside a bucket never start with ``/``)."""
        if self.remote and "://" not in path and not os.path.isabs(path):
            return f"{self.scheme}://{path}"
        return path

    def checkpoint(self, path: str) -> StoredCheckpoint:
        """A checkpoint folder as Ray reported it, or as a URL or local folder."""
        return StoredCheckpoint(self.url(str(path)))


#: the config key of the run storage, as messages name it
STORAGE_KEY = "ray.storage_path"


def run_storage(cfg: Config) -> Storage:
    """The one reading of ``ray.storage_path`` (the worker, the tuner, the jobs and the studies use it)."""
    return Storage(cfg.ray.storage_path)


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


def evaluate_checkpoint(path: str, splits: Iterable[str] | None = None, *, storage: Storage | None = None,
                        device: "torch.device | None" = None) -> dict[str, float]:
    """Metrics of the checkpoint folder at ``path`` (as Ray reported it under ``storage``, or a local
    folder) on each split (default: its config's test split), in this process at world size 1."""
    import torch

    from xray_match.train.loop import autocast_for, evaluate_split, seed_everything

    state = (storage or Storage("")).checkpoint(path).load()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(int(state["config"]["train"]["seed"]))  # as a Trainer would, before building the model
    recipe, model = restore_model(state, device)
    out: dict[str, float] = {}
    for split in splits or [recipe.cfg.data.test_split]:
        metrics, _ = evaluate_split(recipe, model, split, device=device, autocast=autocast_for(recipe.cfg, device))
        out |= metrics
    return out
