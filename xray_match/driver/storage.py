"""Where Ray stores runs and checkpoints: ``ray.storage_path`` is read here only (:func:`run_storage`).

Ray Train and Tune write each run under the storage root and report its checkpoint folders by
Ray's own paths; :class:`Storage` turns them into :class:`StoredCheckpoint` URLs, which is what the
library hands out (printed, logged, tagged, evaluated). A run or a study holds its storage in its
:class:`~xray_match.driver.context.RunContext`. The file inside a checkpoint folder is
:mod:`xray_match.train.checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from xray_match.config import Config, xray_home
from xray_match.train.checkpoint import load_checkpoint


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
        """The checkpoint's state (only :data:`~xray_match.train.checkpoint.CKPT_FILE` is read, not the
        whole folder)."""
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
    """The one reading of ``ray.storage_path`` (a run's or a study's context, and the jobs' preflight)."""
    return Storage(cfg.ray.storage_path)
