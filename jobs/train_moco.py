"""One training run of the intermodal contrastive model (see jobs/tune_moco.py for the study)."""

from xray_match.launch import train_main

if __name__ == "__main__":
    train_main("moco_cpu")
