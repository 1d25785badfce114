"""One RDAN training run through the shared loop on Ray Train, tracked in MLflow, registered as
xray-match-rdan (see jobs/tune_rdan.py for the study; docs/rdan.md for the model).

    python jobs/train_rdan.py                                  # digit scenes, 2 CPU workers
    python jobs/train_rdan.py rdan.ablation=no-cnn             # a Table 3 row
    ray job submit --working-dir . -- python jobs/train_rdan.py --config rdan_gpu \
        --data s3://bucket/coco-shards rdan.region_source=precomputed rdan.eval_folds=5
"""

from xray_match.launch import train_main

if __name__ == "__main__":
    train_main("rdan_cpu")
