"""One training run of weakly supervised MCB attention grounding (grounding-mcb-attention) on
multi-MNIST, through the shared Ray Train loop with MLflow tracking and the model registry; then
the test split (Table 1's Avg IoU) and the 2x2 / 3x3 grids (Table 2), logged to the same run.

    python jobs/pretrain_mnist.py                          # stage 1 once (grounding.init=pretrained)
    python jobs/train_grounding.py                         # grounding_cpu; builds multi-MNIST on first use
    python jobs/train_grounding.py grounding.beta=0.05 grounding.init=scratch
    python jobs/train_grounding.py --config grounding_full --num-workers 4 --gpus-per-worker 1
"""

import sys

from xray_match.launch import train_main
from xray_match.recipes.grounding import GRID_SPLITS, evaluate_checkpoint, job_argv, log_to_run, table2_markdown
from xray_match.tracking.runs import resolve_tracking_uri

PRESET = "grounding_cpu"


def main(argv=None) -> dict:
    argv, cfg = job_argv(PRESET, sys.argv[1:] if argv is None else argv, tune=False)
    out = train_main(PRESET, argv)
    if out.get("checkpoint") and "--no-test-eval" not in argv:
        out["grids"] = evaluate_checkpoint(out["checkpoint"], GRID_SPLITS, cfg.ray.storage_path)
        table = table2_markdown(out["grids"])
        if cfg.tracking.enabled:
            log_to_run(resolve_tracking_uri(cfg), out.get("run_id"), out.get("test", {}) | out["grids"], {"table2.md": table})
        print("\n=== Table 2 ===\n" + table)
    return out


if __name__ == "__main__":
    main()
