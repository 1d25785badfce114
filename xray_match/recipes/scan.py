"""SCAN recipe: the stacked cross attention baseline of the RDAN paper (Lee et al., ECCV 2018; model
in :mod:`xray_match.models.scan`, docs/rdan.md "SCAN baseline").

Everything but the model and its loss is RDAN's recipe, reading the ``scan`` section: the vocabulary
from the training captions, the transforms and collate (one random caption per training image,
duplicate pairs ignored), the all-pairs evaluation (gathered features, each rank a band of image rows,
Recall@K, the 5-fold protocol) and the inference object. Training scores the B x B batch in one
batched call and applies the hardest-negative hinge loss (VSE++ max of hinges), optionally after a
warm-up on all negatives, with the margin alpha of ``scan.margin``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from xray_match.config import Config
from xray_match.models.scan import build_scan
from xray_match.recipes.rdan import RDANLoss, RDANRecipe
from xray_match.registry import RECIPES, SPACES


@RECIPES.register("scan")
class SCANRecipe(RDANRecipe):
    section = "scan"

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Every SCANConfig is runnable (the dataclass checks the ranges)."""

    @property
    def hardest(self) -> bool:
        return self.opts.hardest

    @property
    def rerank_top_k(self) -> int:
        return 0  # SCAN has no trained shortlist embedding: every pair is scored exactly

    def title(self) -> str:
        return f"scan ({self.opts.direction} {self.opts.pooling.upper()})"

    def build_model(self) -> nn.Module:
        o = self.opts
        return build_scan(
            len(self.vocab), region_source=o.region_source, backbone=o.backbone, backbone_width=o.backbone_width,
            grid=o.grid, region_dim=o.region_dim, embed_dim=o.embed_dim, word_dim=o.word_dim, gru_layers=o.gru_layers,
            direction=o.direction, pooling=o.pooling, lambda_1=o.lambda_1, lambda_2=o.lambda_2,
            feature_norm=o.feature_norm,
        )

    def build_loss(self) -> nn.Module:
        o = self.opts
        return RDANLoss(o.margin, o.hardest, o.loss_reduction, o.hardest_warmup_steps)


@SPACES.register("scan")
def scan_space(cfg: Config) -> dict[str, Any]:
    """lambda_1 (attention), lambda_2 (LSE), the margin alpha and the learning rate."""
    from ray import tune

    return {
        "scan.lambda_1": tune.loguniform(1.0, 20.0),
        "scan.lambda_2": tune.loguniform(1.0, 20.0),
        "scan.margin": tune.uniform(0.05, 0.5),
        "optim.lr": tune.loguniform(cfg.optim.lr / 10, cfg.optim.lr * 10),
    }


@SPACES.register("scan_variants")
def scan_variants_space(cfg: Config) -> dict[str, Any]:
    """SCAN's four models as a grid: t-i / i-t x AVG / LSE (lambda_1 as set; SCAN used 9 for t-i, 4 for i-t)."""
    from ray import tune

    return {"scan.direction": tune.grid_search(["t-i", "i-t"]), "scan.pooling": tune.grid_search(["avg", "lse"])}
