"""Tune RDAN with Ray Tune + Optuna + ASHA over mu, lambda, the margin m and the learning rate;
one MLflow parent run with a child run per trial; the best checkpoint is registered as
xray-match-rdan@champion.

    python jobs/tune_rdan.py                                   # digit scenes, local Ray
    python jobs/tune_rdan.py --space rdan_ablation             # Table 3 as a grid
    ray job submit --working-dir . -- python jobs/tune_rdan.py --config rdan_gpu --data s3://bucket/f30k
"""

from xray_match.launch import tune_main

if __name__ == "__main__":
    tune_main("rdan_cpu", space="rdan")
