"""The main job: tune the intermodal contrastive model (InfoNCE with batch / queue / rerank
negatives and gaze) with Ray Tune + Optuna + ASHA, track in MLflow, register the best model.

    python jobs/tune_moco.py                                   # embedded digit scenes, local Ray
    ray job submit --working-dir . -- python jobs/tune_moco.py --data s3://bucket/coco-shards \
        --storage-path s3://bucket/ray --num-workers 4 --gpus-per-worker 1 --config moco_gpu
"""

from xray_match.launch import tune_main

if __name__ == "__main__":
    tune_main("moco_cpu", space="moco")
