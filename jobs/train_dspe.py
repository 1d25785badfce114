"""One training run of DSPE image-sentence retrieval (see jobs/tune_dspe.py for the study and
jobs/localize_dspe.py for phrase localization).

    python jobs/train_dspe.py                                  # embedded digit scenes, local Ray
    python jobs/train_dspe.py dspe.text_features=fisher dspe.fv_pca_dim=512
    ray job submit --working-dir . -- python jobs/train_dspe.py --config dspe_paper \
        --data s3://bucket/shards/flickr30k --storage-path s3://bucket/ray --gpus-per-worker 1
"""

from xray_match.launch import train_main

if __name__ == "__main__":
    train_main("dspe_cpu")
