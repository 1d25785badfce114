"""Stage 1 of grounding-mcb-attention (§3): train the stride-1 ResNet-18 on single MNIST digits
(the paper: 99.40% test accuracy) and save the backbone for ``jobs/train_grounding.py`` /
``jobs/tune_grounding.py`` (``grounding.init=pretrained``).

    python jobs/pretrain_mnist.py                          # grounding_cpu: width 8
    python jobs/pretrain_mnist.py --config grounding_full  # width 64: on the GPU when there is one
    python jobs/pretrain_mnist.py grounding.pretrain_epochs=5 --out /tmp/backbone.pt
"""

import argparse
import sys

from xray_match.config import load_config
from xray_match.configfile import ConfigError


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. grounding.pretrain_epochs=5")
    p.add_argument("--config", default="grounding_cpu", help="preset name or YAML path")
    p.add_argument("--out", help="where to save (default: grounding.backbone_checkpoint or its default path)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from xray_match.studies.grounding_stage1 import pretrain_backbone

    return pretrain_backbone(cfg, args.out, log=lambda s: print(f"[xray_match] {s}", flush=True))


if __name__ == "__main__":
    main()
