"""The main job end to end on a real local Ray cluster and a real MLflow store (sqlite)."""


import pytest
import torch

from xray_match.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _cfg(tiny_scenes, tmp_path, mlflow_uri, *extra):
    return load_config("moco_cpu", [
        f"data.path={tiny_scenes}", "data.steps_per_epoch=3", "data.batch_size=16", "data.eval_batch_size=32",
        f"ray.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={mlflow_uri}", "ray.cpus_per_worker=1",
        "moco.teacher_hidden=[128]", "moco.lstm_hidden=128", "tune.trial_steps_per_epoch=0", *extra,
    ])


def test_two_workers_restart_after_a_lost_worker_and_resume_from_storage(ray_cluster, tiny_scenes, tmp_path,
                                                                        mlflow_uri, monkeypatch):
    """FailureConfig: worker 1 dies hard (os._exit) after training epoch 2, before reporting it; Ray
    Train restarts the worker group, which continues from the epoch-1 checkpoint, not from scratch.
    The same run name started again with 3 epochs resumes from the stored checkpoint and trains
    epoch 3 only."""
    from mlflow import MlflowClient

    from xray_match.driver.worker import FAULT_ENV, run_training

    marker = tmp_path / "worker-exited"
    monkeypatch.setenv(FAULT_ENV, f"1:epoch=2:{marker}")
    cfg = _cfg(tiny_scenes, tmp_path, mlflow_uri, "ray.name=resume-me", "train.epochs=2", "ray.max_failures=1",
               "moco.sampler=queue", "moco.queue_size=64")
    first = run_training(cfg, register=False)
    assert marker.exists()  # the worker did die
    state = first["checkpoint"].load()
    assert first["metrics"]["epoch"] == 2.0 and first["metrics"]["val/images"] == 60.0 and state["loop"]["resumes"] == 1
    assert state["loop"]["step"] == 6 and [h["epoch"] for h in state["loop"]["history"]] == [1.0, 2.0]
    assert int(state["loss"]["sampler.filled"]) == 64  # 6 global batches of 32 through a queue of 64
    monkeypatch.delenv(FAULT_ENV)
    second = run_training(cfg.with_overrides(["train.epochs=3"]), register=False)
    state = second["checkpoint"].load()
    assert second["metrics"]["epoch"] == 3.0 and state["loop"]["step"] == 9 and len(state["loop"]["history"]) == 3
    assert set(state) >= {"model", "optimizer", "scheduler", "loss", "rng", "loop", "config"}
    client = MlflowClient(mlflow_uri)
    hist = client.get_metric_history(first["run_id"], "val/rsum")
    assert sorted({m.step for m in hist}) == [1, 2]  # rank 0 logged epoch 2 before rank 1 died: it is logged twice
    assert client.get_run(first["run_id"]).data.params["moco.sampler"] == "queue"
    arts = [a.path for a in client.list_artifacts(first["run_id"])]
    assert "config.yaml" in arts and "git_sha.txt" in arts and "figures" in arts


def test_tune_registers_the_champion_and_it_loads_back(ray_cluster, tiny_scenes, tmp_path, mlflow_uri, monkeypatch):
    """The preset's study shape: one-worker trials in Tune's own trial actor. Its actor dies hard
    after training epoch 2, before reporting it: Tune restarts the trial from its epoch-1 checkpoint."""
    from mlflow import MlflowClient

    import xray_match
    from xray_match.driver.tuner import run_tune, runs_in_trial, trial_config
    from xray_match.driver.worker import FAULT_ENV
    from xray_match.tracking.models import ModelLookupError, load_inference

    marker = tmp_path / "trial-exited"
    monkeypatch.setenv(FAULT_ENV, f"0:epoch=2:{marker}")
    cfg = _cfg(tiny_scenes, tmp_path, mlflow_uri, "tune.trial_epochs=2", "tune.num_samples=1", "tune.time_budget_s=86400",
               "ray.max_failures=1", "ray.name=study")
    trial = trial_config(cfg)
    assert runs_in_trial(trial) and trial.data.batch_size == 32 and trial.train.epochs == 2  # the global batch kept
    out = run_tune(cfg, "moco")
    assert out["trials"] == 1 and out["model_version"] == 1 and marker.exists()
    state = out["best_checkpoint"].load()
    assert state["loop"]["resumes"] == 1 and [h["epoch"] for h in state["loop"]["history"]] == [1.0, 2.0]
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("xray-match-moco", "champion")
    assert str(version.version) == "1" and version.tags["metric"] == "val/rsum" and version.tags["dataset"] == "digit-scenes"
    children = client.search_runs([client.get_run(out["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 1 and all(c.data.metrics.get("val/rsum") is not None for c in children)

    model = xray_match.load_model("models:/xray-match-moco@champion", tracking_uri=mlflow_uri)
    direct = load_inference(out["best_checkpoint"].url)
    texts = ["a red seven left of a blue two", "three digits"]
    assert torch.allclose(model.encode_texts(texts), direct.encode_texts(texts), atol=1e-6)
    from PIL import Image

    imgs = [Image.new("RGB", (64, 64), "red")]
    assert torch.allclose(model.encode_images(imgs), direct.encode_images(imgs), atol=1e-6)
    # the CLI ranks a folder of images for a caption, and captions for an image
    from xray_match.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / name)
    assert main(["search", "--model", "models:/xray-match-moco@champion", "--tracking-uri", mlflow_uri,
                 "--text", "a red seven", "--images", str(folder)]) == 0
    assert main(["search", "--model", "models:/xray-match-moco@champion", "--tracking-uri", mlflow_uri,
                 "--image", str(folder / "a.png"), "--text", "a red seven", "--text", "a blue two"]) == 0
    assert main(["search", "--model", "models:/xray-match-moco@nope", "--tracking-uri", mlflow_uri,
                 "--text", "x", "--images", str(folder)]) == 2
    with pytest.raises(ModelLookupError, match="has no alias 'nope'"):
        xray_match.load_model("models:/xray-match-moco@nope", tracking_uri=mlflow_uri)
    with pytest.raises(ModelLookupError, match="no registered model 'missing'"):
        xray_match.load_model("models:/missing@champion", tracking_uri=mlflow_uri)
