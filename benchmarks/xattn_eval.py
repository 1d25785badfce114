"""All-pairs RDAN scoring: our batched, chunked scorer vs a SCAN-style reference loop.

Scoring every image against every caption is what evaluation of a cross-attention model costs.
The reference follows SCAN's ``shard_xattn``: images in shards of 128, and for every caption a Python
iteration that repeats the caption over the shard, computes S, runs the relation CNN on the shard's
(1, k, n) matrices, and materialises the attended vectors a_i (k x D) and b_j (n x D) for Eq. (10).
Ours (:func:`xray_match.metrics.xattn.score_all_pairs` + :meth:`RDAN.pair_scores`): captions grouped
by length (no padding), one (B_i k) x (B_c n) matmul for S, the relation CNN over B_i x B_c pairs at
once in channels-last layout, Eq. (10) through Gram matrices instead of attended vectors.

Both score the same random inputs (k regions, D dims, captions of 8-20 words) with the same random
RDAN weights and must agree (allclose). Each runs in its own process so its peak memory is its own.
Printed: seconds, peak memory, achieved GFLOP/s of ours (FLOPs counted from the shapes actually
computed: the S matmul, the four conv layers, the Eq. (8-10) contractions), the dense fp32 matmul
GFLOP/s measured in the same run, and - last line - the speed-up over the loop.

    .venv/bin/python benchmarks/xattn_eval.py                 # 100 images x 500 captions, 1 CPU thread
    .venv/bin/python benchmarks/xattn_eval.py --threads 0     # all cores
    .venv/bin/python benchmarks/xattn_eval.py --large         # 1,000 x 5,000 on a GPU
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from xray_match.metrics.xattn import caption_blocks, score_all_pairs  # noqa: E402
from xray_match.models.rdan import RDAN, RegionEncoder, WordEncoder  # noqa: E402


def make_inputs(a: argparse.Namespace):
    g = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    model = RDAN(RegionEncoder(a.dim, a.dim), WordEncoder(10, 8, a.dim, 1), relation_channels=32, lambda_=4.0, mu=0.1,
                 one_path=False, use_cnn=True, use_residual=True).eval()
    v = torch.randn(a.images, a.k, a.dim, generator=g)  # (N_i, k, D) region features
    lengths = torch.randint(a.min_words, a.max_words + 1, (a.captions,), generator=g)
    e = torch.randn(a.captions, a.max_words, a.dim, generator=g)  # (N_c, n_max, D) word features
    e *= (torch.arange(a.max_words).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    return model, v, e, lengths


# ----------------------------------------------------------------------------- SCAN-style reference


def scan_style_scores(model: RDAN, v: torch.Tensor, e: torch.Tensor, lengths: torch.Tensor, shard: int) -> torch.Tensor:
    """The reference loop: for each caption, for each shard of images, Eq. (5-11) as written."""
    conv1, conv2, conv3 = model.relation.convs
    head = model.relation.head
    n_img, n_cap = v.shape[0], e.shape[0]
    out = torch.empty(n_img, n_cap)
    for start in range(0, n_img, shard):
        imgs = v[start : start + shard]  # (b, k, D)
        b = imgs.shape[0]
        for c in range(n_cap):
            n = int(lengths[c])
            cap = e[c, :n].unsqueeze(0).repeat(b, 1, 1)  # (b, n, D) as SCAN's cap_i_expand
            s = torch.bmm(Fn.normalize(imgs, dim=-1), Fn.normalize(cap, dim=-1).transpose(1, 2))  # (b, k, n) Eq. (5)
            x = Fn.relu(conv1(s.unsqueeze(1)))
            x = Fn.relu(conv2(x))
            x = Fn.relu(conv3(x))
            maps = head(x) + s.unsqueeze(1)  # Eq. (7)
            alpha = torch.softmax(model.lambda_ * maps[:, 1], dim=2)  # (b, k, n) Eq. (8)
            a = torch.bmm(alpha, cap)  # (b, k, D)
            beta = torch.softmax(model.lambda_ * maps[:, 0], dim=1)  # (b, k, n) Eq. (9)
            bj = torch.bmm(beta.transpose(1, 2), imgs)  # (b, n, D)
            r_r = Fn.cosine_similarity(imgs, a, dim=-1).mean(1)  # Eq. (10-11)
            r_w = Fn.cosine_similarity(cap, bj, dim=-1).mean(1)
            out[start : start + b, c] = (1 - model.mu) * r_r + model.mu * r_w
    return out


def scan_style_flops(model: RDAN, a: argparse.Namespace, lengths: torch.Tensor) -> float:
    k, d = a.k, a.dim
    per_cell = model.relation.flops_per_cell()
    return float(sum(a.images * (3 * 2 * k * int(n) * d + per_cell * k * int(n)) for n in lengths))


def ours_flops(model: RDAN, a: argparse.Namespace, lengths: torch.Tensor) -> float:
    """FLOPs of the blocks ``score_all_pairs`` computes (each padded to its longest caption)."""
    return float(sum(len(idx) * a.images * model.pair_flops(a.k, int(lengths[idx].max()), a.dim)
                     for idx in caption_blocks(lengths, a.caption_block)))


# ----------------------------------------------------------------------------- workers


def _peak_bytes(device: torch.device, base: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _worker(which: str, a: argparse.Namespace, path: str) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model, v, e, lengths = make_inputs(a)
    model.to(device)
    with torch.no_grad():
        if which == "ours":
            v, e = v.to(device), e.to(device)
            run = lambda: score_all_pairs(model.pair_scores, v, e, lengths, caption_block=a.caption_block,  # noqa: E731
                                          cell_budget=a.cell_budget, device=device)
        else:
            v, e = v.to(device), e.to(device)
            run = lambda: scan_style_scores(model, v, e, lengths, a.shard)  # noqa: E731
        if device.type == "cuda":  # warm-up (cuDNN algorithm choice), then a clean peak
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        scores = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    torch.save({"scores": scores.float().cpu(), "seconds": seconds, "peak": _peak_bytes(device, base)}, path)


def run_in_process(which: str, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{which}.pt")
        p = ctx.Process(target=_worker, args=(which, a, path))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"{which}: worker failed with exit code {p.exitcode}")
        return torch.load(path, weights_only=True)


def matmul_gflops(device: torch.device, n: int, threads: int) -> float:
    """Dense fp32 matmul rate on this machine now: the physical limit the scorer is measured against."""
    if threads:
        torch.set_num_threads(threads)
    x = torch.randn(n, n, device=device)
    y = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x @ y
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--captions", type=int, default=500)
    p.add_argument("--k", type=int, default=36, help="regions per image")
    p.add_argument("--dim", type=int, default=1024, help="D")
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--shard", type=int, default=128, help="reference: images per shard")
    p.add_argument("--caption-block", type=int, default=256)
    p.add_argument("--cell-budget", type=int, default=1 << 20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for all three measurements (0 = torch's default, all cores). 1 by default: "
                        "per-core figures are stable on a shared machine, where two spinning threads lose to other jobs")
    p.add_argument("--large", action="store_true", help="1,000 images x 5,000 captions (a GPU run)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.large:
        a.images, a.captions = 1000, 5000
        if a.cell_budget == 1 << 20 and a.device.startswith("cuda"):
            a.cell_budget = 1 << 25
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    model, _, _, lengths = make_inputs(a)
    n_pairs = a.images * a.captions
    print(f"RDAN all-pairs scoring: {a.images} images x {a.captions} captions = {n_pairs:,} pairs, k={a.k}, "
          f"D={a.dim}, captions of {a.min_words}-{a.max_words} words, device={device}, threads={a.threads or torch.get_num_threads()}")

    ours = run_in_process("ours", a)
    ref = run_in_process("scan", a)
    mm = matmul_gflops(device, 4096 if device.type == "cpu" else 8192, a.threads)

    diff = (ours["scores"] - ref["scores"]).abs().max().item()
    torch.testing.assert_close(ours["scores"], ref["scores"], rtol=1e-4, atol=1e-4)
    f_ours, f_ref = ours_flops(model, a, lengths), scan_style_flops(model, a, lengths)
    gf_ours, gf_ref = f_ours / ours["seconds"] / 1e9, f_ref / ref["seconds"] / 1e9
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"{'':24s}{'seconds':>10s}{'peak MiB':>10s}{'GFLOP':>10s}{'GFLOP/s':>10s}{'pairs/s':>12s}")
    print(f"{'SCAN-style loop':24s}{ref['seconds']:10.2f}{mib(ref['peak']):10.0f}{f_ref / 1e9:10.1f}{gf_ref:10.1f}"
          f"{n_pairs / ref['seconds']:12,.0f}")
    print(f"{'ours (batched, chunked)':24s}{ours['seconds']:10.2f}{mib(ours['peak']):10.0f}{f_ours / 1e9:10.1f}{gf_ours:10.1f}"
          f"{n_pairs / ours['seconds']:12,.0f}")
    print(f"dense fp32 matmul on this machine: {mm:.1f} GFLOP/s; ours reaches {100 * gf_ours / mm:.0f}% of it")
    print(f"scores agree: max |ours - loop| = {diff:.2e} (allclose rtol=atol=1e-4)")
    print(f"speed-up over the SCAN-style loop: {ref['seconds'] / ours['seconds']:.1f}x")


if __name__ == "__main__":
    main()
