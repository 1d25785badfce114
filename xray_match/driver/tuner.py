"""Ray Tune driver: OptunaSearch (TPE) + ASHA over a registered search space, or a grid.

Train V2 refuses a TorchTrainer inside ``Tuner``; each trial is therefore a function trainable
that builds and fits a TorchTrainer whose ``TuneReportCallback`` forwards every epoch's report
(and checkpoint path) to Tune. MLflow: one parent run per study, one child run per trial (logged
by the trial's rank-0 worker); the best trial's checkpoint is registered with alias champion.

A study killed part-way (the driver lost, a preemptible head node) continues with ``resume=True``
(``--resume``): Tune restores the study from its storage, trials that finished are not run again,
and an unfinished trial's TorchTrainer continues from its own latest checkpoint (a step checkpoint
with ``train.checkpoint_every_steps``), logging into the same MLflow child run.
``tune.time_budget_s`` counts across the sessions: Tune restores what was left of it. Restoring
reads Tune's experiment state, which Tune pickles: resume only studies your own runs wrote.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

from xray_match.config import Config, ConfigError
from xray_match.driver.context import RunContext
from xray_match.driver.storage import Storage
from xray_match.registry import RECIPES, SPACES
from xray_match.train.recipe import DataInfo

TRIAL_CPU = 0.1  # the trial's own actor only waits on its TorchTrainer
_SEP = "__"  # dotted config keys are flattened for Tune/Optuna parameter names


def encode_keys(space: dict[str, Any]) -> dict[str, Any]:
    return {k.replace(".", _SEP): v for k, v in space.items()}


def decode_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {k.replace(_SEP, "."): v for k, v in config.items()}


def grid_keys(space: dict[str, Any]) -> list[str]:
    """The keys of ``space`` given as a grid (``tune.grid_search``), in order."""
    return [k for k, v in space.items() if isinstance(v, dict) and "grid_search" in v]


def is_grid(space: dict[str, Any]) -> bool:
    return bool(grid_keys(space))


def grid_table(rows: list[tuple[dict[str, Any], dict[str, Any]]], keys: list[str], columns: tuple[str, ...]) -> str:
    """A grid study as a markdown table: one row per trial (its config values, then its last
    reported metrics), in grid order. A metric a trial did not report is left blank."""
    head = keys + list(columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for values, metrics in rows:
        cells = [str(values.get(k, "")) for k in keys]
        cells += [f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_space(cfg: Config, space: dict[str, Any]) -> None:
    """Every key must be a config key and every sampled value valid — before any compute."""
    from ray.tune.search.sample import Domain

    probe: dict[str, Any] = {}
    for k, v in space.items():
        if isinstance(v, dict) and "grid_search" in v:
            probe[k] = v["grid_search"][0]
        elif isinstance(v, Domain):
            probe[k] = v.sample()
        else:
            probe[k] = v
    try:
        cfg.with_overrides(probe)
    except ConfigError as e:
        raise ConfigError(f"search space: {e}") from None


def hold_fixed(space: dict[str, Any], fixed: Iterable[str], space_name: str) -> tuple[dict[str, Any], list[str]]:
    """The search space without the keys in ``fixed`` (given on the command line: the same value in
    every trial), and the keys it held; a space left with nothing to search is an error."""
    held = [k for k in space if k in set(fixed)]
    rest = {k: v for k, v in space.items() if k not in held}
    if held and not rest:
        raise ConfigError(f"search space {space_name!r}: every key is fixed on the command line "
                          f"({', '.join(held)}); nothing is left to search (a train job runs one config)")
    return rest, held


def default_point(cfg: Config, space: dict[str, Any]) -> dict[str, Any]:
    """The preset's own values as the study's first trial (clipped into each domain), so a search
    never does worse than the defaults it started from."""
    from ray.tune.search.sample import Categorical, Float, Integer

    flat = cfg.flat()
    point: dict[str, Any] = {}
    for k, dom in space.items():
        v = flat[k]
        if isinstance(dom, Categorical):
            v = v if v in dom.categories else dom.categories[0]
        elif isinstance(dom, (Float, Integer)):
            v = min(max(v, dom.lower), dom.upper - (1 if isinstance(dom, Integer) else 0))
        else:
            return {}
        point[k] = v
    return point


def epoch_report_callback() -> Any:
    """A ``TuneReportCallback`` that forwards epoch reports only: a step checkpoint's report
    (:data:`~xray_match.driver.worker.STEP_REPORT`) has no validation metric for the searcher and
    scheduler, and the TorchTrainer resumes from it by itself."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from xray_match.driver.worker import STEP_REPORT

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metrics[0].get(STEP_REPORT):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochReportCallback()


def trial_config(cfg: Config) -> Config:
    """The config every trial starts from: ``tune.trial_epochs``, ``tune.trial_steps_per_epoch`` and
    ``tune.trial_workers`` applied, the global batch (``data.batch_size`` x ``ray.num_workers``) kept."""
    over: dict[str, Any] = {}
    if cfg.tune.trial_epochs:
        over["train.epochs"] = cfg.tune.trial_epochs
    if cfg.tune.trial_steps_per_epoch:
        over["data.steps_per_epoch"] = cfg.tune.trial_steps_per_epoch
    if cfg.tune.trial_workers and cfg.tune.trial_workers != cfg.ray.num_workers:
        over |= {"ray.num_workers": cfg.tune.trial_workers,
                 "data.batch_size": cfg.data.batch_size * cfg.ray.num_workers // cfg.tune.trial_workers}
    return cfg.with_overrides(over) if over else cfg


def runs_in_trial(cfg: Config) -> bool:
    """Whether a trial trains in Tune's own trial actor (:func:`~xray_match.driver.worker.train_in_trial`)
    rather than through a TorchTrainer: one worker, and no step checkpoints (each of a trial's
    reports reaches the searcher and the scheduler, which need its validation metric)."""
    return cfg.ray.num_workers == 1 and cfg.train.checkpoint_every_steps == 0


def _trial(config: dict[str, Any], base: Config, info: dict[str, Any], storage: Storage,
           tracking: dict[str, Any] | None, study: str, hooks: dict[str, str | None]) -> None:
    """One Tune trial: merge the sampled values, start a child MLflow run, train (in this actor, or
    with a TorchTrainer: :func:`runs_in_trial`)."""
    import ray.tune

    from xray_match.driver.worker import build_trainer, train_in_trial, worker_config
    from xray_match.tracking.runs import end_run, start_trial_run

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = base.with_overrides(decode_keys(config) | {"ray.name": f"{study}-{trial_id}"})
    mlflow_spec = None
    if tracking:
        mlflow_spec = start_trial_run(tracking, f"trial-{trial_id}",
                                      {"ray_trial_id": trial_id, "study": study, "model": cfg.model.name})
    status = "FAILED"
    try:
        if runs_in_trial(cfg):
            train_in_trial(worker_config(cfg, DataInfo(**info), mlflow_spec, hooks))
        else:
            build_trainer(cfg, DataInfo(**info), storage, mlflow=mlflow_spec, callbacks=[epoch_report_callback()],
                          hooks=hooks).fit()
        status = "FINISHED"
    finally:
        end_run(mlflow_spec, status)


def fit_local_resources(cfg: Config, concurrent: int) -> Config:
    """On a small cluster, shrink per-worker CPU shares so ``concurrent`` trials fit (logical
    CPUs only; e.g. 2 cores: 0.1 for the trial + 2 x 0.95 for its workers)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    own = 0.0 if runs_in_trial(cfg) else TRIAL_CPU
    need = concurrent * (own + cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    if total and need > total:
        share = round((total / concurrent - own) / cfg.ray.num_workers, 3)
        if share <= 0:
            raise ConfigError(f"tune.max_concurrent: {concurrent} trials of {cfg.ray.num_workers} workers do not fit in {total} CPUs")
        print(f"[xray_match] {total:g} CPUs: ray.cpus_per_worker {cfg.ray.cpus_per_worker} -> {share} so trials fit", flush=True)
        cfg = cfg.with_overrides({"ray.cpus_per_worker": share})
    return cfg


def latest_study(root: str, model: str) -> str | None:
    """The newest ``tune-<model>-<timestamp>`` study folder under a storage root (local or URL)."""
    from xray_match.data.io import filesystem

    fs, path = filesystem(root)
    if not fs.isdir(path):
        return None
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    names = [n for n in names if n.startswith(f"tune-{model}-")]
    return names[-1] if names else None


def run_tune(cfg: Config, space: str | None = None, *, info: DataInfo | None = None,
             resume: bool = False, fixed: Iterable[str] = ()) -> dict[str, Any]:
    """Run a study, or continue an interrupted one (``resume``: the study ``ray.name``, else the
    newest of this model under the storage path); returns the best trial's metrics and config, and
    the registered version; its checkpoint (a :class:`~xray_match.driver.storage.StoredCheckpoint`) and
    the study's ``context``. Keys in ``fixed`` (the command line's) leave the search space: every
    trial runs with the config's value."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from xray_match.driver.prepare import prepare_info
    from xray_match.driver.worker import ensure_ray, fault_hooks, start_train_coordinator, worker_resources

    recipe = RECIPES.get(cfg.model.name)
    cfg = trial_config(cfg)  # the spaces read it (grids split global batches over the trial's workers)
    space_name = space or cfg.tune.space or cfg.model.name
    search_space, held = hold_fixed(SPACES.get(space_name)(cfg), fixed, space_name)
    check_space(cfg, search_space)
    held_values = {k: cfg.flat()[k] for k in held}
    if held:
        print("[xray_match] fixed for every trial (given on the command line): "
              + ", ".join(f"{k}={v}" for k, v in held_values.items()), flush=True)
    ctx = RunContext.from_config(cfg)
    storage = ctx.storage
    if resume:
        study = cfg.ray.name or latest_study(storage.root, cfg.model.name) or ""
        if not study or not tune.Tuner.can_restore(storage.join(study)):
            raise ConfigError(f"--resume: no interrupted study {study or f'tune-{cfg.model.name}-*'!r} "
                              f"under {storage.root} (name one with --name)")
        print(f"[xray_match] resuming study {storage.join(study)}", flush=True)
    else:
        study = cfg.ray.name or f"tune-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = info or prepare_info(cfg)
    ensure_ray()
    start_train_coordinator()
    grid = is_grid(search_space)
    n_trials = math.prod(len(search_space[k]["grid_search"]) for k in grid_keys(search_space)) if grid \
        else cfg.tune.num_samples
    concurrent = min(cfg.tune.max_concurrent, n_trials)
    cfg = fit_local_resources(cfg, concurrent)
    metric = cfg.tune.metric if cfg.tune.metric != "val/rsum" else recipe.metric
    mode = cfg.tune.mode if cfg.tune.metric != "val/rsum" else recipe.mode

    session = ctx.tracking
    parent = session.find_run({"study": study, "space": space_name}) if resume else None  # the parent, not a trial
    if parent is None:
        parent = session.start_run(study, tags={"study": study, "space": space_name})
        session.log_params(parent, {"space": space_name, "model": cfg.model.name}
                           | {f"fixed.{k}": str(v)[:500] for k, v in held_values.items()}
                           | {f"space.{k}": str(v)[:500] for k, v in search_space.items()})

    in_trial = runs_in_trial(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg, info=vars(info), storage=storage, tracking=session.study_spec(parent),
                             study=study, hooks=fault_hooks()),
        worker_resources(cfg) if in_trial else {"CPU": TRIAL_CPU},
    )
    if resume:  # the searcher, the scheduler and the finished trials come back from the study's own state
        tuner = tune.Tuner.restore(storage.join(study), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=encode_keys(search_space))
    else:
        if grid:
            search_alg, scheduler = None, FIFOScheduler()
        else:
            first = default_point(cfg, search_space)
            search_alg = ConcurrencyLimiter(
                OptunaSearch(seed=cfg.tune.seed, points_to_evaluate=[encode_keys(first)] if first else None),
                max_concurrent=concurrent)
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                      grace_period=min(cfg.tune.grace_period, cfg.train.epochs))
        tuner = tune.Tuner(
            trainable,
            param_space=encode_keys(search_space),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                num_samples=1 if grid else cfg.tune.num_samples,
                max_concurrent_trials=concurrent if grid else None,  # else the ConcurrencyLimiter's
                time_budget_s=cfg.tune.time_budget_s,
                reuse_actors=in_trial,
                trial_name_creator=lambda t: f"{cfg.model.name}-{t.trial_id}",
                trial_dirname_creator=lambda t: f"{cfg.model.name}-{t.trial_id}",
            ),
            # a trial in its own actor restarts from its last epoch's checkpoint, as a TorchTrainer's
            # workers do (whose own FailureConfig covers them: Tune's would restart it whole)
            run_config=tune.RunConfig(name=study, storage_path=storage.root, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures if in_trial else 0)),
        )
    results = tuner.fit()
    # Tune stops a trial's actor once its last result is in, often before the trial's own
    # end_run runs: each trial's child run gets its final status here, from Tune's verdict
    session.end_trial_runs(parent, {str(r.metrics["trial_id"]): "FAILED" if r.error else "FINISHED"
                                    for r in results if r.metrics and "trial_id" in r.metrics})
    out: dict[str, Any] = {"study": study, "parent_run_id": parent, "trials": len(results), "fixed": held_values,
                           "storage": storage.join(study), "context": ctx}
    try:
        best = results.get_best_result(metric=metric, mode=mode)
    except RuntimeError as e:
        best, why = None, str(e)
    else:  # with one trial, Tune returns it whether it reported or not
        why = "" if best.config is not None and metric in (best.metrics or {}) else "its only trial never reported"
    if best is None or why:
        session.end_run(parent, "FAILED")
        raise RuntimeError(f"study {study}: no trial reported {metric!r} ({why}); a study's tune.time_budget_s "
                           f"counts across --resume") from None
    if grid:
        keys = grid_keys(search_space)
        rows = [(decode_keys(r.config), r.metrics or {}) for r in results]
        out["table"] = grid_table(rows, keys, recipe.table_columns)
        session.log_texts(parent, {"grid.md": out["table"]}, artifact_path="tables")
    out |= {"best_config": decode_keys(best.config),
            "best_metrics": {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))},
            "best_checkpoint": ctx.checkpoint(best.metrics.get("checkpoint_path")
                                              or (best.checkpoint.path if best.checkpoint else None))}
    ckpt = out["best_checkpoint"]
    if session.enabled:
        session.log_metrics(parent, {f"best/{k}": v for k, v in out["best_metrics"].items() if k.startswith("val/")})
        out["best_run_id"] = session.find_child_run(parent, {"ray_trial_id": str(best.metrics.get("trial_id", ""))}) \
            or parent
        if cfg.tracking.register and ckpt is not None:  # what the champion is, it reads from its checkpoint
            out["model_version"] = ctx.register(ckpt, out["best_run_id"], best.metrics,
                                                trial_id=str(best.metrics.get("trial_id", "")), study=study)
        session.end_run(parent)
    return out
