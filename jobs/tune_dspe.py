"""Tune DSPE retrieval with Ray Tune + Optuna + ASHA over margin m, the weights lambda_1..3 of
Eq. (5), K and the learning rate (space "dspe"; "dspe_grid" is the structure-term ablation),
track in MLflow, register the best checkpoint as xray-match-dspe@champion.

    python jobs/tune_dspe.py --num-samples 8 --time-budget-s 3600
    python jobs/tune_dspe.py --space dspe_grid
"""

from xray_match.launch import tune_main

if __name__ == "__main__":
    tune_main("dspe_cpu", space="dspe")
