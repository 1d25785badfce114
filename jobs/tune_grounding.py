"""The grounding study (grounding-mcb-attention): by default Table 1 — a Ray Tune grid over
β ∈ {0, 0.05, 0.1, 0.2} x {fine-tune the stage-1 backbone, train from scratch} — through the shared
loop, MLflow (one parent run, a child per trial) and the registry (best trial -> champion). Each
trial's final checkpoint is then scored on the test split (Table 1) and the paper's configuration
(β = 0.1, fine-tuned) on the 2x2 / 3x3 grids (Table 2); both tables go to the parent run and
``<study folder>/tables.md``. ``--space grounding`` searches λ, β and the margin instead (Optuna + ASHA).

    python jobs/pretrain_mnist.py && python jobs/tune_grounding.py
    python jobs/tune_grounding.py --space grounding --num-samples 12
"""

import sys

from xray_match.launch import argv_with_data, tune_main
from xray_match.studies.grounding import ensure_data, report_study

PRESET = "grounding_cpu"


def main(argv=None) -> dict:
    argv = argv_with_data(PRESET, sys.argv[1:] if argv is None else argv, tune=True, build_data=ensure_data)
    out = tune_main(PRESET, "grounding_table1", argv)
    if "--no-test-eval" not in argv:
        out["tables"] = report_study(out)
        print(out["tables"])
    return out


if __name__ == "__main__":
    main()
