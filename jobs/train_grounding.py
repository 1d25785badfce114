"""One training run of weakly supervised MCB attention grounding (grounding-mcb-attention) on
multi-MNIST, through the shared Ray Train loop with MLflow tracking and the model registry; then
the test split (Table 1's Avg IoU) and the 2x2 / 3x3 grids (Table 2), logged to the same run.

    python jobs/pretrain_mnist.py                          # stage 1 once (grounding.init=pretrained)
    python jobs/train_grounding.py                         # grounding_cpu; builds multi-MNIST on first use
    python jobs/train_grounding.py grounding.beta=0.05 grounding.init=scratch
    python jobs/train_grounding.py --config grounding_full --num-workers 4 --gpus-per-worker 1
"""

import sys

from xray_match.launch import argv_with_data, train_main
from xray_match.studies.grounding import ensure_data, report_run

PRESET = "grounding_cpu"


def main(argv=None) -> dict:
    argv = argv_with_data(PRESET, sys.argv[1:] if argv is None else argv, tune=False, build_data=ensure_data)
    out = train_main(PRESET, argv)
    if out["checkpoint"] and "--no-test-eval" not in argv:
        print("\n=== Table 2 ===\n" + report_run(out))
    return out


if __name__ == "__main__":
    main()
