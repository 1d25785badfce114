"""The driver's context of one run or one study: :class:`RunContext`, made once from the Config.

It owns what the driver side of a run or a study needs and each caller used to work out again:
where Ray stores it (:class:`~xray_match.driver.storage.Storage`), its MLflow session
(:class:`~xray_match.tracking.runs.TrackingSession`: the experiment, the run or the study's parent
run, what the workers and trials log with) and the name its models are registered under. It hands
out :class:`~xray_match.driver.storage.StoredCheckpoint` objects, not the paths Ray reports, and
does the two things that follow a run, each written here only: evaluating a checkpoint
(:meth:`RunContext.evaluate`) and registering one (:meth:`RunContext.register`).

``run_training`` and ``run_tune`` make one (a study that starts several runs passes its own) and
return it as ``out["context"]``; the jobs and the studies evaluate, register and log through it.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable

from xray_match.config import Config
from xray_match.driver.storage import Storage, StoredCheckpoint, run_storage
from xray_match.tracking.store import CHAMPION, registered_model_name

if TYPE_CHECKING:
    from xray_match.tracking.runs import TrackingSession


class RunContext:
    """One run's or one study's context on the driver (:meth:`from_config`): ``storage`` (where Ray
    writes its runs and checkpoints), :attr:`tracking` (its MLflow session; ``tracking.enabled``
    is False with ``tracking.enabled=false``) and ``model_name`` (what :meth:`register` registers as).
    ``cfg`` is the run's or the study's config, not a trial's."""

    def __init__(self, cfg: Config, storage: Storage):
        self.cfg = cfg
        self.storage = storage
        self.model_name = registered_model_name(cfg)

    @classmethod
    def from_config(cls, cfg: Config) -> "RunContext":
        """The context of ``cfg``: its run storage (:func:`~xray_match.driver.storage.run_storage`);
        the MLflow session follows on first use."""
        return cls(cfg, run_storage(cfg))

    @cached_property
    def tracking(self) -> "TrackingSession":
        """The MLflow session, made on first use (it creates the experiment when it is new): a job
        that stops on a bad ``--resume`` has written nothing."""
        from xray_match.tracking.runs import TrackingSession

        return TrackingSession(self.cfg)

    def checkpoint(self, found: Any) -> StoredCheckpoint | None:
        """A checkpoint as Ray or Tune reported it (a ``ray.train.Checkpoint``, or its path: under an
        ``s3://`` root without the scheme), or a URL or local folder, as a :class:`StoredCheckpoint`
        (none: None)."""
        if not found:
            return None
        if isinstance(found, StoredCheckpoint):
            return found
        return self.storage.checkpoint(str(getattr(found, "path", found)))

    def evaluate(self, checkpoint: StoredCheckpoint, splits: Iterable[str] | None = None, *,
                 log_to: Iterable[str | None] = ()) -> dict[str, float]:
        """The checkpoint's metrics on ``splits`` (default: the config's test split), computed in this
        process; logged onto each MLflow run in ``log_to`` (None entries and repeats skipped)."""
        from xray_match.train.checkpoint import evaluate_checkpoint

        metrics = evaluate_checkpoint(checkpoint.url, list(splits or [self.cfg.data.test_split]))
        for run_id in dict.fromkeys(r for r in log_to if r):
            self.tracking.log_metrics(run_id, metrics)
        return metrics

    def register(self, checkpoint: StoredCheckpoint, run_id: str | None, metrics: dict[str, Any],
                 **tags: str) -> int | None:
        """Log ``checkpoint`` as a model of ``run_id`` and register it as a new version of
        :attr:`model_name` with alias ``champion``; returns the version (None with tracking off).

        What the model is comes from the checkpoint, not from this context's config (a trial's
        config differs from its study's): its recipe names the metric whose value in ``metrics`` is
        tagged, its data info the ``dataset`` and ``data_path`` tags. ``checkpoint`` (its URL) and
        ``run_id`` are tagged too, and then ``tags``."""
        if not self.tracking.enabled:
            return None
        from xray_match.registry import RECIPES
        from xray_match.train.checkpoint import load_checkpoint

        with checkpoint.as_directory() as folder:  # one download from an object store, read twice
            state = load_checkpoint(folder)
            metric = RECIPES.get(state["recipe"]).metric
            info = state["info"]
            tags = {"metric": metric, "metric_value": str(metrics.get(metric, "")), "dataset": info["dataset"],
                    "data_path": info["root"], "run_id": run_id, "checkpoint": checkpoint.url} | tags
            return self.tracking.register(folder, run_id, self.model_name, tags)

    def model_ref(self, version: int | None) -> str | None:
        """How a user names a registered version, and the alias that moved to it."""
        if version is None:
            return None
        return f"models:/{self.model_name}/{version} (alias: models:/{self.model_name}@{CHAMPION})"
