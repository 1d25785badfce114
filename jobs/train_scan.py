"""One SCAN baseline run (stacked cross attention, the RDAN paper's main comparison) through the
shared loop on Ray Train, tracked in MLflow, registered as xray-match-scan (docs/rdan.md, "SCAN baseline").

    python jobs/train_scan.py                                  # digit scenes, 2 CPU workers, t-i AVG
    python jobs/train_scan.py scan.direction=i-t scan.lambda_1=4 scan.pooling=lse scan.lambda_2=5
"""

from xray_match.launch import train_main

if __name__ == "__main__":
    train_main("scan_cpu")
