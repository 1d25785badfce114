"""DSPE phrase localization, the paper's two stages (§4.3): train the region-phrase embedding, mine
at most 50 hard-negative boxes per unique training phrase that lie closer to it than its ground
truth, continue training with the ranking constraints only; reports test accuracy (IoU >= 0.5)
before and after. Both stages run on Ray Train and log to MLflow; stage 2 is registered as
xray-match-dspe_phrase@champion.

    python jobs/localize_dspe.py                              # digit scenes, 2 CPU workers
    python jobs/localize_dspe.py --stage2-epochs 1 dspe.text_features=fisher dspe.fv_pca_dim=256
"""

import sys

from xray_match.configfile import ConfigError
from xray_match.launch import build_parser, config_from_args, prepare_job


def main(argv=None):
    p = build_parser("DSPE phrase localization with hard-negative mining", "dspe_phrase_cpu", tune=False)
    p.add_argument("--stage2-epochs", type=int, default=1, help="epochs of the hard-negative stage")
    p.add_argument("--stage2-lr-mult", type=float, default=0.1, help="stage-2 lr = optim.lr x this")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg = prepare_job(cfg)
    from xray_match.studies.dspe_localize import localize_two_stage

    out = localize_two_stage(cfg, stage2_epochs=args.stage2_epochs, stage2_lr_mult=args.stage2_lr_mult,
                             test_eval=not args.no_test_eval)
    print("\n=== xray_match localize (DSPE) ===")
    for stage in ("stage1", "stage2"):
        print(f"{stage:>12}: checkpoint {out[stage]['checkpoint']}  val {out[stage]['metrics'].get('val/phrase_acc')}"
              f"  wall {out[stage]['wall_s']:.0f}s")
    print(f"{'mining':>12}: {out['mining']}")
    for k in ("test_before", "test_after"):
        if k in out:
            print(f"{k:>12}: {out[k]}")
    return out


if __name__ == "__main__":
    main()
