"""Losing at most a few steps of work (issue 16, item 4): step checkpoints hold the data position,
and a run resumed from one in the middle of an epoch trains on exactly the batches, in exactly the
order, that an undisturbed run trains on, and ends with the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from xray_match.config import load_config

pytestmark = pytest.mark.timeout(600)


def _cfg(tiny_scenes, *extra):
    return load_config("moco_cpu", [
        f"data.path={tiny_scenes}", "data.steps_per_epoch=5", "data.batch_size=8", "data.eval_batch_size=30",
        "data.shuffle_buffer=20", "train.epochs=2", "train.checkpoint_every_steps=3", "train.bn_recompute_batches=2",
        "moco.teacher_hidden=[64]", "ray.num_workers=1", "tracking.enabled=false", "data.hflip=true", "moco.gaze_prob=0.5", *extra,
    ])


def _train(cfg, info, start=None):
    """One in-process run: the shard keys of every step, the step checkpoints, the final weights."""
    from xray_match.train.loop import run

    steps: dict[int, list[str]] = {}
    saved: dict[int, dict] = {}

    def on_step(trainer, keys):
        steps[trainer.state.step] = list(keys)

    def save(trainer):
        saved[trainer.state.step] = copy.deepcopy(trainer.state_dict())

    trainer = run(cfg, info, start_state=start, save=save, on_step=on_step, log=lambda s: None)
    return steps, saved, trainer.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_sees_the_same_samples_and_ends_with_the_same_weights(tiny_scenes, num_workers, tmp_path):
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.checkpoint import CKPT_FILE, load_checkpoint, save_checkpoint

    cfg = _cfg(tiny_scenes, f"data.num_workers={num_workers}")
    info = prepare_info(cfg)
    steps, saved, final = _train(cfg, info)
    assert sorted(steps) == list(range(1, 11)) and all(len(k) == 8 for k in steps.values())
    # steps 3 and 9 are inside epochs 1 and 2; step 6 is inside epoch 2 as well (5 steps an epoch)
    assert sorted(saved) == [3, 6, 9]
    assert {s: saved[s]["loop"]["epoch_step"] for s in saved} == {3: 3, 6: 1, 9: 4}
    for at in (3, 9):
        path = str(tmp_path / f"step{at}" / CKPT_FILE)
        save_checkpoint(saved[at], path)  # through the file: plain data, weights_only
        again, _, final2 = _train(cfg, info, start=load_checkpoint(path))
        assert sorted(again) == list(range(at + 1, 11))
        assert {s: steps[s] for s in again} == again  # the same batches in the same order: none repeated or skipped
        assert final2["loop"]["step"] == 10 and final2["loop"]["epoch"] == 2
        for k, v in final["model"].items():
            assert torch.equal(v, final2["model"][k]), k
        h1, h2 = final["loop"]["history"], final2["loop"]["history"]
        assert h1[-1]["train/loss"] == pytest.approx(h2[-1]["train/loss"], rel=1e-6)  # the epoch's mean, across the cut
        assert h1[-1]["val/rsum"] == pytest.approx(h2[-1]["val/rsum"])


def test_the_data_position_skips_exactly_what_was_taken(tiny_scenes):
    """The reader alone: a stream started at the positions after k batches continues with batch k + 1."""
    from xray_match.data.reader import batch_positions, make_loader

    def dict_collate(items):
        return {"x": torch.stack([it["x"] for it in items])}

    loader = make_loader(tiny_scenes, "train", lambda s: {"x": torch.zeros(1)}, dict_collate, batch_size=7, train=True,
                         num_workers=2, shuffle_buffer=10, seed=3, epoch=1)
    first, pos = [], {}
    for i, batch in zip(range(8), loader):
        first.append(batch["_keys"])
        if i < 4:
            pos |= batch_positions(batch)
    assert set(pos) == {0, 1} and sum(pos.values()) == 4 * 7  # two readers, 2 batches of 7 each
    resumed = make_loader(tiny_scenes, "train", lambda s: {"x": torch.zeros(1)}, dict_collate, batch_size=7,
                          train=True, num_workers=2, shuffle_buffer=10, seed=3, epoch=1, start=pos)
    assert [b["_keys"] for _, b in zip(range(4), resumed)] == first[4:]
    # after an odd number of batches the next batch is the second worker's: the stream is rotated
    pos3 = {}
    loader = make_loader(tiny_scenes, "train", lambda s: {"x": torch.zeros(1)}, dict_collate, batch_size=7, train=True,
                         num_workers=2, shuffle_buffer=10, seed=3, epoch=1)
    for i, batch in zip(range(3), loader):
        pos3 |= batch_positions(batch)
    resumed = make_loader(tiny_scenes, "train", lambda s: {"x": torch.zeros(1)}, dict_collate, batch_size=7,
                          train=True, num_workers=2, shuffle_buffer=10, seed=3, epoch=1, start=pos3, taken=3)
    assert [b["_keys"] for _, b in zip(range(5), resumed)] == first[3:]
