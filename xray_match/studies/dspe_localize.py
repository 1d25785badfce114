"""DSPE phrase localization in the paper's two stages (§4.3), as a driver of two training runs:
train the region-phrase embedding (stage 1), mine hard-negative boxes with it, continue training
from it on the augmented set with the ranking terms only (stage 2). ``jobs/localize_dspe.py`` runs
:func:`localize_two_stage`; the recipe both stages train is :mod:`xray_match.recipes.dspe_phrase`.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from xray_match.config import Config, ConfigError
from xray_match.driver.storage import StoredCheckpoint
from xray_match.metrics.localization import IOU_HIT
from xray_match.models.dspe import DSPE
from xray_match.recipes.dspe_phrase import DSPEPhraseRecipe, PhraseTransform, collate_phrase_eval, localize_batch
from xray_match.train.recipe import DataInfo


@torch.no_grad()
def mine_hard_negatives(model: DSPE, cfg: Config, info: DataInfo, out_path: str, *, max_images: int | None = None,
                        device: torch.device | None = None, seed: int = 0) -> dict[str, Any]:
    """§4.3 negative mining with a stage-1 model, on the TRAINING split.

    For each unique phrase (by :func:`~xray_match.recipes.dspe_phrase.phrase_key`) and each training image it is linked in, the
    candidate boxes of that image that do not overlap any of the phrase's ground-truth boxes (IoU <
    0.5) and lie closer to the phrase than its nearest ground-truth box are hard negatives. At most
    ``dspe.hard_negatives_per_phrase`` of them are kept per unique phrase, sampled uniformly
    (seeded). Writes ``{"boxes": {image key: {phrase key: [box, ...]}}, "stats": {...}}`` to
    ``out_path`` and returns it.
    """
    from torchvision.ops import box_iou

    from xray_match.data.reader import make_loader

    d = cfg.dspe
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    max_images = d.mine_max_images if max_images is None else max_images
    recipe = DSPEPhraseRecipe(cfg, info)
    loader = make_loader(info.root, cfg.data.train_split, PhraseTransform(cfg, recipe.text_state(), train=False),
                         collate_phrase_eval, batch_size=cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers)
    found: dict[str, list[tuple[str, list[float]]]] = defaultdict(list)
    n_img = n_occ = 0
    for batch in loader:
        r = localize_batch(model, batch, device)
        keys = batch["text_keys"]
        for img_i, img_key in enumerate(batch["keys"]):
            cand = (batch["cand_image"] == img_i).nonzero().squeeze(1)  # this image's candidates
            phr = (batch["phrase_image"] == img_i).nonzero().squeeze(1)
            by_key: dict[str, list[int]] = defaultdict(list)
            for p in phr.tolist():
                by_key[keys[p]].append(p)
            boxes = batch["boxes"][cand]  # (C_i, 4)
            for k, ps in by_key.items():
                gt = batch["gt"][ps].unique(dim=0)  # the phrase's ground-truth boxes in this image
                overlap = box_iou(boxes, gt).max(1).values >= IOU_HIT  # (C_i,)
                # one row per wording of the phrase in this image ("a red seven", "red seven")
                dist = r["dist"][ps][:, cand]  # (n_ps, C_i)
                d_gt = dist[:, overlap].min(1, keepdim=True).values if bool(overlap.any()) \
                    else torch.full((len(ps), 1), float("inf"))
                hard = (~overlap) & (dist < d_gt).any(0)  # (C_i,)
                found[k] += [(img_key, boxes[j].tolist()) for j in hard.nonzero().squeeze(1).tolist()]
                n_occ += 1
            n_img += 1
            if max_images and n_img >= max_images:
                break
        if max_images and n_img >= max_images:
            break
    rng = random.Random(seed)
    out: dict[str, dict[str, list[list[float]]]] = defaultdict(dict)
    kept = 0
    for k, lst in sorted(found.items()):
        if len(lst) > d.hard_negatives_per_phrase:
            lst = rng.sample(lst, d.hard_negatives_per_phrase)
        for img_key, box in lst:
            out[img_key].setdefault(k, []).append([round(v, 2) for v in box])
            kept += 1
    result = {"boxes": dict(out), "stats": {"images": n_img, "phrase_occurrences": n_occ, "unique_phrases": len(found),
                                            "found": sum(len(v) for v in found.values()), "kept": kept}}
    from xray_match.data.io import atomic_write_bytes

    atomic_write_bytes(out_path, json.dumps(result).encode())
    return result


def mine_from_checkpoint(checkpoint: StoredCheckpoint, out_path: str, max_images: int | None = None) -> dict[str, Any]:
    """Rebuild a stage-1 ``dspe_phrase`` model from its checkpoint and mine its hard negatives."""
    from xray_match.train.checkpoint import restore_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe, model = restore_model(checkpoint.load(), device, overrides={"dspe.init_checkpoint": ""})
    return mine_hard_negatives(model, recipe.cfg, recipe.info, out_path, max_images=max_images, device=device,
                               seed=recipe.cfg.train.seed)


def localize_two_stage(cfg: Config, *, stage2_epochs: int, stage2_lr_mult: float = 0.1,
                       test_eval: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """§4.3: train the region-phrase embedding (stage 1), mine at most
    ``dspe.hard_negatives_per_phrase`` hard-negative boxes per unique training phrase with it, then
    continue training from it on the augmented set with the ranking terms only (stage 2:
    lambda_2 = lambda_3 = 0). Each stage is a ``run_training`` run (Ray Train, MLflow); stage 2 is
    the one registered. Returns both runs and, with ``test_eval``, test accuracy before and after."""
    from xray_match.driver.context import RunContext
    from xray_match.driver.worker import run_training

    if cfg.model.name != "dspe_phrase":
        raise ConfigError(f"model.name: two-stage localization needs 'dspe_phrase', got {cfg.model.name!r}")
    name = cfg.ray.name or f"dspe-phrase-{time.strftime('%Y%m%d-%H%M%S')}"
    ctx = RunContext.from_config(cfg)  # both stages': their storage, MLflow session and registered name
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    s1 = cfg.with_overrides({"ray.name": f"{name}-stage1", "dspe.hard_negatives": ""})
    out["stage1"] = run_training(s1, register=False, context=ctx)
    out["stage1"]["wall_s"] = time.perf_counter() - t0
    ckpt1 = out["stage1"]["checkpoint"]
    if not ckpt1:
        raise RuntimeError("stage 1 produced no checkpoint")
    if test_eval:
        out["test_before"] = ctx.evaluate(ckpt1)
        log(f"stage 1 test: {out['test_before']}")
    t1 = time.perf_counter()
    hard_path = ctx.storage.join(f"{name}-hard-negatives.json")
    mined = mine_from_checkpoint(ckpt1, hard_path, max_images=cfg.dspe.mine_max_images)
    out["mining"] = mined["stats"] | {"path": hard_path, "wall_s": time.perf_counter() - t1}
    log(f"mined hard negatives: {out['mining']}")
    t2 = time.perf_counter()
    s2 = cfg.with_overrides({"ray.name": f"{name}-stage2", "dspe.hard_negatives": hard_path,
                             "dspe.init_checkpoint": ckpt1.url, "dspe.lambda_2": 0.0, "dspe.lambda_3": 0.0,
                             "train.epochs": stage2_epochs, "optim.lr": cfg.optim.lr * stage2_lr_mult})
    out["stage2"] = run_training(s2, context=ctx)
    out["stage2"]["wall_s"] = time.perf_counter() - t2
    if test_eval and out["stage2"]["checkpoint"]:
        out["test_after"] = ctx.evaluate(out["stage2"]["checkpoint"])
        log(f"stage 2 test: {out['test_after']}")
        before = {f"test/before_{k.split('/')[-1]}": v for k, v in out["test_before"].items()}
        ctx.tracking.log_metrics(out["stage2"]["run_id"], before | out["test_after"])
    return out
