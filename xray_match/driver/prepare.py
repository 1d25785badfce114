"""Driver-side preparation before any worker starts: resolve (or build) the data, read the
manifests (one folder's, or each of ``data.sources``), check them against the config, and run the
recipe's train-split-only ``prepare``."""

from __future__ import annotations

import functools

from xray_match.config import Config, ConfigError, xray_home
from xray_match.data.format import Manifest, ShardFormatError, read_manifest
from xray_match.data.reader import has_saliency
from xray_match.registry import RECIPES
from xray_match.train.recipe import DataInfo, Recipe


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
    """The data a run reads (``data.path``, the digit scenes, or the ``data.sources`` mixed by
    weight), checked against what the config asks of it, and the recipe's ``prepare``."""
    recipe = RECIPES.get(cfg.model.name)
    if cfg.data.sources and recipe.fits_train_split:
        raise ConfigError(f"data.sources: {cfg.model.name} fits its text features on one folder's train split, so it "
                          f"reads one folder (data.path); mixing sources is for moco and grounding")
    folders = [(s.label, s.path, s.weight) for s in cfg.data.sources] or [("", resolve_data(cfg, progress), 1.0)]
    manifests = [read_manifest(root) for _, root, _ in folders]
    for (_, root, _), manifest in zip(folders, manifests):
        _check_folder(cfg, recipe, root, manifest)
    sources = [{"name": name, "root": root, "weight": weight / sum(w for *_, w in folders),
                "counts": {sp: m.count(sp) for sp in m.splits}} for (name, root, weight), m in zip(folders, manifests)]
    counts: dict[str, int] = {}
    for s in sources:
        for sp, n in s["counts"].items():
            counts[sp] = counts.get(sp, 0) + n
    n_shards = sum(len(m.shards(cfg.data.train_split)) for m in manifests)
    if cfg.data.steps_per_epoch == 0 and counts[cfg.data.train_split] < cfg.data.batch_size * cfg.ray.num_workers:
        raise ConfigError(f"data.batch_size: the train split ({counts[cfg.data.train_split]}) is smaller than one global batch")
    gaze = recipe.saliency_field(cfg)
    if gaze and not any(has_saliency(root, cfg.data.train_split, m) for (_, root, _), m in zip(folders, manifests)):
        value = functools.reduce(getattr, gaze.split("."), cfg)
        raise ConfigError(f"{gaze}: {value} applies gaze to samples with a saliency map, and no sample of "
                          f"{', '.join(root for _, root, _ in folders)} has one (add a source with maps, e.g. "
                          f"SALICON, or set {gaze}=0)")
    if cfg.data.sources:
        info = DataInfo(root=", ".join(s["root"] for s in sources), dataset="+".join(m.dataset for m in manifests),
                        counts=counts, sources=sources)
    else:
        info = DataInfo(root=folders[0][1], dataset=manifests[0].dataset, counts=counts)
    info.prepared = recipe.prepare(cfg, info.root)
    info.prepared.setdefault("train_shards", n_shards)
    return info


def _check_folder(cfg: Config, recipe: type[Recipe], root: str, manifest: Manifest) -> None:
    """One folder against the config: pixels where the run decodes images, the train and val splits."""
    needs = recipe.pixels_field(cfg)
    if needs and not manifest.has_pixels:
        value = functools.reduce(getattr, needs.split("."), cfg)
        raise ConfigError(f"{needs}: {root} holds precomputed features without pixels (manifest info.convert.pixels "
                          f"= false), and {needs}={value!r} reads images")
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        if split not in manifest.splits:
            raise ConfigError(f"data.{key}: split {split!r} not in {root} (have: {', '.join(sorted(manifest.splits))})")
