"""xray_match.train.checkpoint: plain-data files written atomically and opened with
weights_only=True, the storage root and a run's context, and evaluating a checkpoint equal to the trainer's evaluation."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from xray_match.config import load_config
from xray_match.driver.storage import Storage
from xray_match.train.checkpoint import (CKPT_FILE, CheckpointError, check_plain, evaluate_checkpoint, load_checkpoint,
                                         save_checkpoint)


def test_only_plain_data_is_saved(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\]: a numpy.ndarray is not plain data"):
        save_checkpoint({"rng": {"numpy": np.zeros(3)}}, str(tmp_path / CKPT_FILE))
    assert not os.listdir(tmp_path)  # refused before anything was written
    check_plain({"a": [1, 2.0, "x", None, True, (torch.ones(2),)], 3: {"b": torch.zeros(1)}})


def test_round_trip_with_the_loops_rng_state(tmp_path):
    from xray_match.train.loop import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"model": {"w": torch.arange(4.0)}, "rng": rng_state(), "loop": {"epoch": 2, "history": [{"val/x": 1.5}]}}
    expect = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(state, str(tmp_path / "run" / CKPT_FILE))
    assert os.listdir(tmp_path / "run") == [CKPT_FILE]  # the temporary name is gone
    back = load_checkpoint(str(tmp_path / "run"))  # a folder holding the file
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["loop"] == state["loop"]
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


def test_old_format_and_missing_checkpoints_are_clear_errors(tmp_path):
    old = tmp_path / "old" / CKPT_FILE
    old.parent.mkdir()
    torch.save({"rng": {"numpy": np.random.get_state()}}, str(old))  # what checkpoints held before
    with pytest.raises(CheckpointError, match="not a readable plain-data checkpoint"):
        load_checkpoint(str(old))
    (tmp_path / "junk.pt").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="junk.pt: not a readable plain-data checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match=f"is not a {CKPT_FILE} file or a folder holding one"):
        load_checkpoint(str(tmp_path / "nope"))
    nested = tmp_path / "artifacts" / "model" / "checkpoint"
    save_checkpoint({"x": torch.ones(1)}, str(nested / CKPT_FILE))  # a registered model's layout
    assert load_checkpoint(str(tmp_path / "artifacts"))["x"].item() == 1.0


def test_storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_MATCH_HOME", str(tmp_path / "home"))
    assert Storage("").root == str(tmp_path / "home" / "runs")
    monkeypatch.chdir(tmp_path)
    local = Storage("runs")
    assert local.root == str(tmp_path / "runs") and not local.remote
    remote = Storage("s3://bucket/ray")
    assert remote.root == "s3://bucket/ray" and remote.join("study") == "s3://bucket/ray/study"
    # under a URL root Ray reports paths without the scheme: the storage hands out the URL
    assert remote.checkpoint("bucket/ray/run/checkpoint_000001").url == "s3://bucket/ray/run/checkpoint_000001"
    assert str(remote.checkpoint("s3://bucket/ray/x")) == "s3://bucket/ray/x"  # a URL stays one
    assert local.checkpoint(str(tmp_path / "runs" / "c")).url == str(tmp_path / "runs" / "c")
    folder = tmp_path / "ckpt"
    save_checkpoint({"x": torch.ones(1)}, str(folder / CKPT_FILE))
    ckpt = Storage(f"file://{tmp_path}").checkpoint(str(folder))  # a local folder stays one
    assert ckpt.url == str(folder) and ckpt.load()["x"].item() == 1.0
    with ckpt.as_directory() as d:
        assert load_checkpoint(d)["x"].item() == 1.0


def test_a_runs_context_hands_out_stored_checkpoints(tmp_path, monkeypatch):
    """RunContext: the storage of the config, Ray's reports as StoredCheckpoints (a scheme-less path
    under a URL root gets the scheme back), the registered name, and no registration with tracking off."""
    from types import SimpleNamespace

    from xray_match.driver.context import RunContext

    monkeypatch.setenv("XRAY_MATCH_HOME", str(tmp_path / "home"))
    ctx = RunContext.from_config(load_config("moco_cpu", {"ray.storage_path": "s3://bucket/ray",
                                                          "tracking.enabled": False}))
    assert ctx.storage.root == "s3://bucket/ray" and ctx.model_name == "xray-match-moco"
    reported = SimpleNamespace(path="bucket/ray/run/checkpoint_000001")  # a ray.train.Checkpoint's path
    ckpt = ctx.checkpoint(reported)
    assert ckpt.url == "s3://bucket/ray/run/checkpoint_000001" and ctx.checkpoint(ckpt) is ckpt
    assert ctx.checkpoint("bucket/ray/run/checkpoint_000001") == ckpt
    assert ctx.checkpoint(None) is None and ctx.checkpoint("") is None
    assert ctx.register(ckpt, None, {}) is None  # tracking off: nothing registered, nothing read
    assert ctx.model_ref(None) is None
    assert ctx.model_ref(3) == "models:/xray-match-moco/3 (alias: models:/xray-match-moco@champion)"


@pytest.mark.slow
def test_evaluating_a_checkpoint_equals_the_trainers_evaluation(tiny_scenes, tmp_path):
    """No optimizer, scheduler or loss is built, and the metrics are the trainer's own."""
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import Trainer

    cfg = load_config("dspe_cpu", {"data.path": tiny_scenes, "data.steps_per_epoch": 1, "data.batch_size": 8,
                                   "ray.num_workers": 1, "dspe.text_features": "tfidf", "dspe.image_hidden": 32,
                                   "dspe.text_hidden": 32, "dspe.embed_dim": 16})
    trainer = Trainer(cfg, prepare_info(cfg, progress=False), log=lambda s: None)
    trainer.train_epoch()
    save_checkpoint(trainer.state_dict(), str(tmp_path / CKPT_FILE))
    expect, _ = trainer.evaluate("test")
    got = evaluate_checkpoint(str(tmp_path), ["test"], device=torch.device("cpu"))
    assert got.keys() == expect.keys() and all(got[k] == pytest.approx(expect[k], abs=1e-6) for k in expect)


class _Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    """Issue 16 (1): ``xray_match.load_model(folder)`` on a checkpoint whose pickle runs code."""
    import xray_match
    from xray_match.tracking.models import ModelLookupError

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "shared-checkpoint"
    folder.mkdir()
    torch.save({"model": {}, "config": _Payload(str(marker))}, str(folder / CKPT_FILE))
    with pytest.raises(ModelLookupError, match=f"{folder / CKPT_FILE}: not a readable plain-data checkpoint"):
        xray_match.load_model(str(folder))
    with pytest.raises(CheckpointError, match=CKPT_FILE):
        load_checkpoint(str(folder))
    assert not marker.exists()
