"""Driver-side preparation before any worker starts: resolve (or build) the data, read the
manifest, and run the recipe's train-split-only ``prepare``."""

from __future__ import annotations

import functools

from xray_match.config import Config, ConfigError, xray_home
from xray_match.data.format import ShardFormatError, read_manifest
from xray_match.registry import RECIPES
from xray_match.train.recipe import DataInfo


def default_data_path(cfg: Config) -> str:
    s = cfg.data.scenes
    return str(xray_home() / "data" / f"digit-scenes-{s.size}px-s{s.seed}-{s.train}-{s.val}-{s.test}")


def resolve_data(cfg: Config, progress: bool = True) -> str:
    """``data.path``, or the embedded digit scenes, built on first use."""
    if cfg.data.path:
        return cfg.data.path
    root = default_data_path(cfg)
    s = cfg.data.scenes
    try:
        m = read_manifest(root)
        if (m.count("train"), m.count("val"), m.count("test")) == (s.train, s.val, s.test):
            return root
    except ShardFormatError:
        pass
    from xray_match.data.digit_scenes import build_digit_scenes

    print(f"building the embedded digit-scenes data set in {root} (first use)", flush=True)
    build_digit_scenes(root, train=s.train, val=s.val, test=s.test, size=s.size, seed=s.seed, progress=progress)
    return root


def prepare_info(cfg: Config, progress: bool = True) -> DataInfo:
    root = resolve_data(cfg, progress)
    manifest = read_manifest(root)
    recipe = RECIPES.get(cfg.model.name)
    needs = recipe.pixels_field(cfg)
    if needs and not manifest.has_pixels:
        value = functools.reduce(getattr, needs.split("."), cfg)
        raise ConfigError(f"{needs}: {root} holds precomputed features without pixels (manifest info.convert.pixels "
                          f"= false), and {needs}={value!r} reads images")
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        if split not in manifest.splits:
            raise ConfigError(f"data.{key}: split {split!r} not in {root} (have: {', '.join(sorted(manifest.splits))})")
    counts = {sp: manifest.count(sp) for sp in manifest.splits}
    n_shards = len(manifest.shards(cfg.data.train_split))
    if cfg.data.steps_per_epoch == 0 and counts[cfg.data.train_split] < cfg.data.batch_size * cfg.ray.num_workers:
        raise ConfigError(f"data.batch_size: the train split ({counts[cfg.data.train_split]}) is smaller than one global batch")
    info = DataInfo(root=root, dataset=manifest.dataset, counts=counts)
    info.prepared = recipe.prepare(cfg, root)
    info.prepared.setdefault("train_shards", n_shards)
    return info
