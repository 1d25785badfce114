"""Two-stage retrieval vs exact all-pairs scoring for RDAN on the digit-scenes 1K test.

Exact evaluation scores every test image against every test caption with the cross-attention
model (1,000 x 5,000 pairs). Two-stage (``rdan.rerank_top_k``, :mod:`xray_match.metrics.two_stage`)
shortlists each image's K captions and each caption's K images by the model's pooled region/word
features and reranks only those exactly, batched (:func:`xray_match.metrics.xattn.score_pairs`).
All rank the same encoded test split; printed per K: seconds, pairs scored, seconds per pair, rsum
and its loss against exact, speed-up; then how much of the exact top-1/5/10 and of the ground truth
each shortlist holds. "pooled only" ranks by the shortlist's similarity alone. With
``--shortlist-model`` the same rows follow for a shortlist by another embedding model's vectors
("other": e.g. the contrastive champion, as ``rdan.shortlist_model`` does in evaluation).

    uv run python benchmarks/two_stage_eval.py --checkpoint RUN/checkpoint_xxx   # a trained RDAN
    uv run python benchmarks/two_stage_eval.py --train-epochs 5                  # train one here first
    uv run python benchmarks/two_stage_eval.py --checkpoint RUN/checkpoint_xxx \
        --shortlist-model models:/xray-match-moco@champion

Training here uses ``rdan_cpu`` with the auxiliary embedding loss (``rdan.embed_loss_weight``),
which trains the pooled features that shortlist. Last line: ``speed-up <X>x at rsum loss <L>`` for
--report-k (default: the smallest K whose rsum loss <= 1, else the largest K) of the pooled
shortlist (the line before it: the other model's). Goal: X >= 20, L <= 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def train(epochs: int, overrides: list[str], out: str) -> str:
    from xray_match.config import load_config
    from xray_match.driver.prepare import prepare_info
    from xray_match.train.loop import Trainer

    cfg = load_config("rdan_cpu", ["tracking.enabled=false", "ray.num_workers=1", f"train.epochs={epochs}",
                                   "rdan.embed_loss_weight=1.0", *overrides])
    trainer = Trainer(cfg, prepare_info(cfg))
    for _ in range(epochs):
        trainer.train_epoch()
        trainer.state.epoch += 1
    os.makedirs(out, exist_ok=True)
    from xray_match.train.checkpoint import CKPT_FILE, save_checkpoint

    save_checkpoint(trainer.state_dict(), os.path.join(out, CKPT_FILE))
    return out


def shortlist_recall(mask: torch.Tensor, exact: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """How much of what the exact ranking needs the shortlist ``mask`` (N_i, N_c) holds, in percent:
    each image's exact top-m captions ("i2t topm") and each caption's exact top-m images ("t2i topm"),
    and the ground truth ("i2t gt": images with at least one of their captions inside, "t2i gt":
    captions with their image inside). A ground-truth pair outside the shortlist is what costs
    recall; exact neighbours left outside can only move the truth up."""
    out = {}
    for d, m_, s_ in (("i2t", mask, exact), ("t2i", mask.T, exact.T)):
        for m in (1, 5, 10):
            out[f"{d} top{m}"] = 100.0 * m_.gather(1, s_.topk(m, dim=1).indices).float().mean().item()
    gt = mask[caption_image, torch.arange(len(caption_image))]  # (N_c,) the caption's image shortlisted
    hit = torch.zeros(mask.shape[0], dtype=torch.bool)
    hit[caption_image[gt]] = True
    out["i2t gt"], out["t2i gt"] = 100.0 * hit.float().mean().item(), 100.0 * gt.float().mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained RDAN checkpoint folder (default: train one with --train-epochs)")
    p.add_argument("--train-epochs", type=int, default=5)
    p.add_argument("--top-k", default="5,10,20,50", help="shortlist sizes to compare")
    p.add_argument("--report-k", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shortlist-model", help="also shortlist by this embedding model's vectors: models:/NAME@ALIAS "
                                             "(e.g. models:/xray-match-moco@champion) or a checkpoint folder")
    p.add_argument("overrides", nargs="*", help="config overrides for training and for evaluating the checkpoint "
                                                "(data.path=..., rdan.eval_cell_budget=...)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from xray_match.config import Config
    from xray_match.metrics.retrieval import ranks_i2t, ranks_t2i, summarize
    from xray_match.metrics.two_stage import pooled_embeddings, shortlist, two_stage_scores
    from xray_match.metrics.xattn import score_all_pairs
    from xray_match.train.loop import Trainer
    from xray_match.train.recipe import DataInfo, EvalContext, unwrap
    from xray_match.train.checkpoint import load_checkpoint

    from xray_match.config import xray_home

    ckpt = a.checkpoint or train(a.train_epochs, a.overrides, str(xray_home() / "runs" / "two_stage_rdan"))
    print(f"checkpoint: {ckpt}")
    state = load_checkpoint(ckpt)  # the project's checkpoint loader (config and vocabulary ride along)
    cfg = Config.from_dict(state["config"]).with_overrides(["data.num_workers=0", *a.overrides])
    trainer = Trainer(cfg, DataInfo(**state["info"]), log=lambda s: None)
    trainer.model.load_state_dict(state["model"])
    trainer.model.eval()
    net = unwrap(trainer.model)
    split = cfg.data.test_split
    v, words, lengths, caption_image, keys = trainer.recipe.encode_split(trainer.model, trainer.loader(split, train=False),
                                                                       EvalContext())
    print(f"{split}: {v.shape[0]} images x {len(lengths)} captions, k = {v.shape[1]} regions, D = {v.shape[2]}")

    def rsum(scores: torch.Tensor) -> float:
        return summarize(ranks_i2t(scores, caption_image), ranks_t2i(scores, caption_image))["rsum"]

    t0 = time.perf_counter()
    with torch.no_grad():
        exact = score_all_pairs(net.pair_scores, v, words, lengths, caption_block=cfg.rdan.eval_caption_block,
                                cell_budget=cfg.rdan.eval_cell_budget)
    t_exact = time.perf_counter() - t0
    r_exact = rsum(exact)
    rows = [("exact", t_exact, exact.numel(), r_exact, 0.0, 1.0)]
    # the shortlists: the model's own pooled features, and another embedding model's vectors
    t0 = time.perf_counter()
    shortlists = {"pooled": (*pooled_embeddings(v, words, lengths), time.perf_counter() - t0)}
    if a.shortlist_model:
        from xray_match.tracking.models import checkpoint_url
        from xray_match.train.shortlist import embed_samples

        url = checkpoint_url(a.shortlist_model)
        print(f"shortlist model: {a.shortlist_model} -> {url}")
        t0 = time.perf_counter()
        counts = torch.bincount(caption_image, minlength=len(keys)).tolist()
        img, txt = embed_samples(url, state["info"]["root"], split, keys, counts)
        shortlists["other"] = (img, txt, time.perf_counter() - t0)
        print(f"embedding the split with it: {shortlists['other'][2]:.1f} s (not counted below: an index holds it)")
    recall, picks = [], []
    for name, (img, txt, _) in shortlists.items():
        t0 = time.perf_counter()
        sim = img @ txt.T  # the shortlist's similarity alone: what reranking adds to it
        t = time.perf_counter() - t0 + (shortlists[name][2] if name == "pooled" else 0.0)
        r = rsum(sim)
        rows.append((f"{name} only", t, 0, r, r_exact - r, t_exact / t))
        mine = []
        for k in [int(x) for x in a.top_k.split(",")]:
            t0 = time.perf_counter()
            if name == "pooled":
                img, txt = pooled_embeddings(v, words, lengths)
            scores, pairs = two_stage_scores(net.paired_scores, v, words, lengths, img, txt, k,
                                             cell_budget=cfg.rdan.eval_cell_budget)
            t = time.perf_counter() - t0
            r = rsum(scores)
            mine.append((f"{name} K={k}", t, pairs, r, r_exact - r, t_exact / t))
            recall.append((f"{name} K={k}", shortlist_recall(shortlist(img, txt, k), exact, caption_image)))
        rows += mine
        picks.append(([m for m in mine if m[0] == f"{name} K={a.report_k}"] if a.report_k else
                      [m for m in mine if m[4] <= 1.0][:1] or mine[-1:])[0])
    print(f"\n{'method':<18}{'seconds':>10}{'pairs':>12}{'us/pair':>9}{'rsum':>9}{'loss':>8}{'speed-up':>10}")
    for name, t, pairs, r, loss, x in rows:
        per_pair = f"{t / pairs * 1e6:.2f}" if pairs else "-"
        print(f"{name:<18}{t:>10.2f}{pairs:>12d}{per_pair:>9}{r:>9.2f}{loss:>8.2f}{x:>9.1f}x")
    print("\nshortlist recall (%): the exact top-m of each image (i2t) / caption (t2i), and its ground truth, "
          "inside the shortlist")
    names = [f"{d} {m}" for d in ("i2t", "t2i") for m in ("top1", "top5", "top10", "gt")]
    print(f"{'shortlist':<16}" + "".join(f"{n:>10}" for n in names))
    for k, rec in recall:
        print(f"{k:<16}" + "".join(f"{rec[n]:>10.2f}" for n in names))
    print("; ".join(f"{p[5]:.1f}x at rsum loss {p[4]:.2f} ({p[0]})" for p in picks[1:]) or "")
    print(f"speed-up {picks[0][5]:.1f}x at rsum loss {picks[0][4]:.2f} ({picks[0][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
