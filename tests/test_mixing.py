"""Several shard folders read as one stream (issue 26, item 3): sources resampled by weight with no
epoch skew, each sample naming its source, exact mid-epoch resume, per-source validation, and the
gaze rule. Real tar shards written by the repo's own writer; no Ray."""

from __future__ import annotations

import copy
import functools
import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from xray_match.config import load_config
from xray_match.configfile import ConfigError
from xray_match.data.digit_scenes import SceneSpec, render_scene
from xray_match.data.reader import ShardStream, Source, batch_positions, make_loader, shard_urls
from xray_match.data.writer import write_splits


def _scene(split: str, index: int, name: str, seed: int, maps: bool) -> dict:
    """A digit scene of source ``name``: keys and image ids prefixed by it, with or without its map."""
    s = render_scene(split, index, SceneSpec(size=32, seed=seed))
    s["__key__"] = f"{name}-{s['__key__']}"
    s["json"]["image_id"] = s["__key__"]
    if not maps:
        del s["saliency.png"]
    return s


def _folder(root, name: str, train: int, val: int, maps: bool, seed: int, maxcount: int) -> str:
    render = functools.partial(_scene, name=name, seed=seed, maps=maps)
    write_splits(str(root), "digit-scenes", {"train": train, "val": val}, render,
                 maxcount=maxcount, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """``big`` (300 train / 40 val, 6 shards, no maps: COCO-like), ``small`` (30 / 20, 3 shards, with
    maps: SALICON-like), and ``plain`` (60 / 20, no maps)."""
    base = tmp_path_factory.mktemp("mix")
    return {
        "big": _folder(base / "big", "big", 300, 40, maps=False, seed=1, maxcount=50),
        "small": _folder(base / "small", "small", 30, 20, maps=True, seed=2, maxcount=10),
        "plain": _folder(base / "plain", "plain", 60, 20, maps=False, seed=3, maxcount=20),
    }


def _urls(folders, *names, split="train"):
    return {n: shard_urls(folders[n], split) for n in names}


def _sources_of(ds: ShardStream, n: int, workers: int = 0) -> list[str]:
    it = iter(DataLoader(ds, batch_size=None, num_workers=workers))
    return [next(it)["source"] for _ in range(n)]


def _collate(items):
    return {"x": torch.stack([it["x"] for it in items])}


def _key_only(sample):
    return {"x": torch.zeros(1)}


# ----------------------------------------------------------------------------- proportions


def test_proportions_hold_over_10000_samples_with_sizes_10x_apart(folders):
    """``big`` has 10x ``small``'s samples and 0.7 of the weight; the shares stay the weights over
    10,000 samples (no epoch skew: neither source runs dry or is read out first), and each source
    cycles through all of its samples evenly, the small one ~4x as often as the big one."""
    ds = ShardStream(_urls(folders, "big", "small"), train=True, seed=4, weights=[0.7, 0.3])
    items = [(r["__source__"], r["__key__"]) for r in itertools.islice(ds.raw(), 10_000)]  # what it decodes
    share = Counter(src for src, _ in items)
    assert share["big"] / 10_000 == pytest.approx(0.7, abs=0.02)
    assert share["small"] / 10_000 == pytest.approx(0.3, abs=0.02)
    for name, n in (("small", 30), ("big", 300)):
        times = Counter(key for src, key in items if src == name)
        assert len(times) == n and max(times.values()) - min(times.values()) <= 1, name  # passes, each sample once
    # the first 100 samples already hold both (a source is drawn, not read out in turn)
    assert {src for src, _ in items[:100]} == {"big", "small"}


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_the_weights_are_relative_and_a_lone_named_source_is_read_whole(folders):
    ds = ShardStream(_urls(folders, "big", "plain"), train=True, seed=1, weights=[3, 1])
    assert ds.weights == [0.75, 0.25]
    assert set(_sources_of(ShardStream(_urls(folders, "plain"), train=True, seed=1), 100)) == {"plain"}
    with pytest.raises(ValueError, match="one positive weight per source"):
        ShardStream(_urls(folders, "big", "plain"), train=True, weights=[1, 0])


# ----------------------------------------------------------------------------- source names, ranks, workers


def test_every_sample_carries_its_source_in_items_and_batches(folders):
    sources = [Source("big", folders["big"], 0.5), Source("small", folders["small"], 0.5)]
    loader = make_loader(sources, "train", _key_only, _collate, batch_size=8, train=True, num_workers=2,
                         shuffle_buffer=20, seed=0)
    for _, batch in zip(range(10), loader):
        assert batch["source"] == [k.split("-")[0] for k in batch["_keys"]]
    # evaluation: every source's every sample once, named, source after source
    val = list(make_loader(sources, "val", lambda s: {"key": s["key"]}, None, batch_size=16, train=False))
    items = [it for b in val for it in b]
    assert sorted(it["key"] for it in items) == sorted(
        [f"big-val-{i:07d}" for i in range(40)] + [f"small-val-{i:07d}" for i in range(20)])
    assert all(it["source"] == it["key"].split("-")[0] for it in items)
    # one folder (data.path): no names, the items as they always were
    one = next(iter(make_loader(folders["big"], "train", _key_only, _collate, batch_size=4, train=True)))
    assert "source" not in one


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 1)])
def test_ranks_and_workers_split_each_source_as_a_lone_folder_is_split(folders, world, workers):
    """Evaluation: each sample exactly once across ranks and workers; training: disjoint readers
    (``small``'s 3 shards are fewer than 4 readers: split by sample, as one folder's would be)."""
    urls = _urls(folders, "big", "small", split="val")
    seen = []
    for rank in range(world):
        ds = ShardStream(urls, lambda s: {"key": s["key"]}, train=False, rank=rank, world_size=world)
        part = [it["key"] for it in DataLoader(ds, batch_size=None, num_workers=workers)]
        assert len(part) == len(set(part))
        seen.append(set(part))
    assert sum(map(len, seen)) == 60 and len(set().union(*seen)) == 60
    for names in (("big", "small"), ("small",)):  # mixed, and the small folder alone
        train = []
        for rank in range(world):
            ds = ShardStream(_urls(folders, *names), lambda s: {"key": s["key"]}, train=True, rank=rank,
                             world_size=world, shuffle_buffer=10, seed=2)
            it = iter(DataLoader(ds, batch_size=None, num_workers=workers))
            train.append({next(it)["key"] for _ in range(200)})
        for a in range(world):
            for b in range(a + 1, world):
                assert train[a].isdisjoint(train[b]), names
        assert {k.split("-")[0] for part in train for k in part} == set(names)


# ----------------------------------------------------------------------------- exact resume


def test_a_mixed_stream_resumes_where_its_positions_say(folders):
    """As issue 16's reader test: a stream started at the positions after k batches continues with
    batch k + 1 (2 workers; after an odd k the rotated loader starts at the second worker)."""
    sources = [Source("big", folders["big"], 0.7), Source("small", folders["small"], 0.3)]

    def loader(**kw):
        return make_loader(sources, "train", _key_only, _collate, batch_size=7, train=True, num_workers=2,
                           shuffle_buffer=10, seed=3, epoch=1, **kw)

    first = [b["_keys"] for _, b in zip(range(8), loader())]
    assert {k.split("-")[0] for keys in first for k in keys} == {"big", "small"}
    for k in (4, 3):
        pos = {}
        for _, batch in zip(range(k), loader()):
            pos |= batch_positions(batch)
        resumed = loader(start=pos, taken=k)
        assert [b["_keys"] for _, b in zip(range(8 - k), resumed)] == first[k:]


def test_training_resumed_mid_epoch_takes_the_same_mixed_batches(folders):
    """The whole loop (moco, tiny): a run resumed from a step checkpoint inside an epoch trains on the
    same mixed batches, in the same order, as the run that was never stopped; validation is
    reported overall and per source."""
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import run

    cfg = _tiny_moco(folders, "data.steps_per_epoch=4", "train.epochs=2", "train.checkpoint_every_steps=3")
    info = prepare_info(cfg)
    steps, saved = {}, {}

    def on_step(trainer, keys):
        steps[trainer.state.step] = list(keys)

    trainer = run(cfg, info, on_step=on_step, save=lambda t: saved.setdefault(t.state.step, copy.deepcopy(t.state_dict())),
                  log=lambda s: None)
    assert sorted(saved) == [3, 6] and {k.split("-")[0] for keys in steps.values() for k in keys} == {"big", "small"}
    again = {}
    run(cfg, info, start_state=saved[6], on_step=lambda t, keys: again.setdefault(t.state.step, list(keys)),
        log=lambda s: None)
    assert sorted(again) == [7, 8] and {s: steps[s] for s in again} == again
    val = trainer.state.history[-1]
    assert {"val/rsum", "val/big/rsum", "val/small/rsum"} <= set(val)
    assert (val["val/images"], val["val/big/images"], val["val/small/images"]) == (60, 40, 20)


def _tiny_moco(folders, *extra):
    return load_config("moco_cpu", [
        "data.sources=[{path: %s, weight: 0.7}, {path: %s, weight: 0.3}]" % (folders["big"], folders["small"]),
        "data.batch_size=8", "data.eval_batch_size=30", "data.shuffle_buffer=20", "data.image_size=32",
        "data.num_workers=0", "data.scenes.size=32", "moco.teacher_hidden=[16]", "moco.embed_dim=16",
        "moco.lstm_hidden=16", "moco.vision_width=8", "ray.num_workers=1", "tracking.enabled=false", *extra,
    ])


# ----------------------------------------------------------------------------- config and gaze


@pytest.mark.parametrize("override, message", [
    ("data.sources=[{path: a, weight: 1}, {path: b, weight: 0}]", r"data.sources\[1\].weight: 0.0 is out of range \(must be > 0\)"),
    ("data.sources=[{path: a, weight: -2}]", r"data.sources\[0\].weight: -2.0 is out of range"),
    ("data.sources=[{weight: 1}]", r"data.sources\[0\].path: empty"),
    ("data.sources=[{path: s3://b/coco}, {path: /data/coco}]", r"data.sources\[1\].name: 'coco' also names data.sources\[0\]"),
    ("data.sources=[{path: a, name: 'x/y'}]", r"data.sources\[0\].name: 'x/y' must be letters"),
    ("data.sources=[{path: a, wieght: 1}]", r"unknown key 'data.sources\[0\].wieght'"),
    ("data.sources={path: a}", r"data.sources: expected a list"),
])
def test_sources_are_checked_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("moco_cpu", [override])


def test_sources_from_the_command_line_and_their_default_names():
    cfg = load_config("moco_cpu", ["data.sources=[{path: s3://b/coco, weight: 0.7}, {path: s3://b/salicon/, weight: 0.3, name: sal}]"])
    assert [(s.label, s.path, s.weight) for s in cfg.data.sources] == [("coco", "s3://b/coco", 0.7), ("sal", "s3://b/salicon/", 0.3)]
    assert cfg.flat()["data.sources"][1] == {"path": "s3://b/salicon/", "weight": 0.3, "name": "sal"}
    with pytest.raises(ConfigError, match="give data.path .* or data.sources .*, not both"):
        cfg.with_overrides(["data.path=/data/x"])


def test_gaze_needs_a_source_with_maps(folders):
    from xray_match.driver.prepare import prepare_info

    two = "data.sources=[{path: %s}, {path: %s}]"
    with pytest.raises(ConfigError, match=r"moco.gaze_prob: 0.5 applies gaze to samples with a saliency map, and no sample"):
        prepare_info(load_config("moco_cpu", [two % (folders["big"], folders["plain"]), "moco.gaze_prob=0.5"]))
    with pytest.raises(ConfigError, match="moco.gaze_prob"):  # one folder without maps, as data.path
        prepare_info(load_config("moco_cpu", [f"data.path={folders['plain']}", "moco.gaze_prob=0.3"]))
    info = prepare_info(load_config("moco_cpu", [two % (folders["big"], folders["small"]), "moco.gaze_prob=0.5"]))
    assert [(s["name"], s["weight"], s["counts"]["train"]) for s in info.sources] == [("big", 0.5, 300), ("small", 0.5, 30)]
    assert info.counts["train"] == 330 and info.dataset == "digit-scenes+digit-scenes"
    with pytest.raises(ConfigError, match="data.sources: rdan fits its text features on one folder"):
        prepare_info(load_config("rdan_cpu", [two % (folders["big"], folders["small"])]))


def test_gaze_touches_only_the_samples_that_have_a_map(folders):
    """With moco.gaze_prob=1 a sample with a map is multiplied by it (Eq. (2)); one without is not."""
    from xray_match.recipes.moco import MocoTransform

    cfg = _tiny_moco(folders, "moco.gaze_prob=1.0")
    plain, gazed = MocoTransform(_tiny_moco(folders), train=True), MocoTransform(cfg, train=True)
    ds = ShardStream(_urls(folders, "big", "small"), train=True, seed=0, weights=[0.5, 0.5])
    samples = _take(ds, 20)
    assert {s["source"] for s in samples} == {"big", "small"}
    for sample in samples:
        assert torch.equal(plain.image(sample), gazed.image(sample)) == (sample["source"] == "big"), sample["key"]
