"""The RDAN paper's Table 3 on our data: the full model, each ablation switch (mu0, mu1, one-path,
no-cnn, no-res, no-hard) and the SCAN baseline, each trained for every seed at one budget on Ray
Train and scored on the 1K test split; prints the table (mean R@1/5/10 both ways and rsum, each
seed's rsum, the difference from the full model). docs/rdan.md, "Table 3".

    python jobs/table3_rdan.py                                  # 8 rows x 2 seeds at rdan_cpu's budget
    python jobs/table3_rdan.py train.epochs=2 --name t3         # a shorter budget; again with --name t3 resumes
    python jobs/table3_rdan.py --rows none,no-cnn,scan --seeds 0

Every override applies to the RDAN rows and the SCAN row alike (both configs hold both sections).
"""

import argparse

from xray_match.launch import build_parser, config_from_args, expected_errors, prepare_job


@expected_errors
def main(argv=None):
    from xray_match.config import ConfigError
    from xray_match.studies.rdan_table3 import ROWS, ablation_table, cell_configs

    p = build_parser("The RDAN paper's Table 3 (ablations and SCAN) on Ray", "rdan_cpu", tune=False)
    p.add_argument("--scan-config", default="scan_cpu", help="the SCAN row's preset (or YAML path)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to train, comma-separated")
    p.add_argument("--seeds", default="0,1", help="train.seed values, comma-separated")
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    scan_cfg = config_from_args(argparse.Namespace(**{**vars(args), "config": args.scan_config}))
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give integers, comma-separated") from None
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    cell_configs(cfg, scan_cfg, rows, seeds)  # every cell valid before any compute
    cfg = prepare_job(cfg)
    out = ablation_table(cfg, scan_cfg, rows=rows, seeds=seeds)
    print(f"\n=== xray_match Table 3 ({out['study']}) ===\nresults: {out['results_path']}\n")
    print(out["table"], flush=True)
    return out


if __name__ == "__main__":
    main()
