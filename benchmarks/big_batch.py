"""Global batch 1024 in micro-batches of 64: our gradient caching vs open_clip's feature-caching
accumulation vs the plain batch of 1024 (docs/big_batches.md).

The same towers (the moco_cpu preset's model, batch negatives: InfoNCE over the whole batch), the
same batch of 1024 (random pixels through the preset's transform, captions of random words) for
every step, and the same AdamW step; each way runs in a fresh subprocess:

- ours: ``train.micro_batch_size=64`` (:func:`xray_match.train.gradcache.cached_backward`);
- open_clip: open_clip's ``--accum-freq`` loop (``open_clip_train/train.py``) with its
  ``ClipLoss`` (``open-clip-torch``, the ``bench`` dependency group) on our towers: features of
  every micro-batch without gradient, then each micro-batch again with gradient, its features put
  among the cached ones, the loss over the whole batch and a backward, per micro-batch;
- plain: the loop's step over the whole batch.

Peak memory is the steps': CUDA's peak allocation over the allocation before the first step, or on
CPU the peak resident set (sampled every 2 ms) over the resident set before it (model, optimizer and
batch in place); the warm-up steps count (the first step's buffers, once freed, stay with the
process and would hide a later step's). Throughput is that of the timed steps after the warm-up:
on CUDA samples per second of wall clock; on CPU, where torch runs ``--threads`` threads (1 by
default), samples per CPU-second of the process, which is what an idle core would do in a second
and which another job on a shared machine barely moves (wall-clock samples/s are printed too and
did move 2x between runs on the 2-core machine). Each way's best of ``--rounds`` alternating rounds
counts; data loading is not timed. The last line is
``memory <ours / plain> throughput <ours / open_clip>``; goals: memory <= 0.25, throughput >= 1.0.

    uv sync --group bench && uv run python benchmarks/big_batch.py [--steps 3] [--warmup 1] [--rounds 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

import torch

WAYS = ("ours", "open_clip", "plain")


class PeakMemory:
    """The step's peak memory in MiB: CUDA allocations, or the resident set sampled by a thread."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def synthetic_batch(recipe, n: int, size: int, seed: int = 0) -> dict:
    """``n`` decoded samples (random pixels, captions of random digit-scene words) through the recipe's
    training transform and collate."""
    from PIL import Image

    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    words = "a an red blue green yellow one two three seven nine left right of above below digit".split()
    t = recipe.transform(True)
    items = [t({"image": Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()),
                "meta": {"image_id": i, "captions": [" ".join(rnd.choices(words, k=rnd.randint(4, 12)))]}})
             for i in range(n)]
    batch = recipe.collate(items)
    batch["text_id"] = torch.arange(n) + n  # distinct sentences: no pair masked, InfoNCE == open_clip's ClipLoss
    return batch


def open_clip_backward(trainer, batch: dict, micro: int) -> torch.Tensor:
    """open_clip's ``--accum-freq`` step (open_clip_train/train.py, ``train_one_epoch``) on our towers
    with its ``ClipLoss``; returns the last micro-batch's loss (that of the whole batch)."""
    from open_clip.loss import ClipLoss

    from xray_match.train.gradcache import split_batch

    model, recipe = trainer.model, trainer.recipe
    loss_fn = ClipLoss()
    scale = torch.tensor(1.0 / trainer.cfg.moco.temperature, device=trainer.device)
    chunks = split_batch(batch, micro, recipe.item_fields, recipe.caption_fields)
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # first, cache the features without any gradient tracking
        cached = [recipe.embed(model, c) for c in chunks]
    for j, c in enumerate(chunks):  # re-do each forward; the cached features of the others are negatives
        out = recipe.embed(model, c)
        feats = {k: torch.cat([p[k] for p in cached[:j]] + [out[k]] + [p[k] for p in cached[j + 1 :]]) for k in out}
        loss = loss_fn(feats["image_emb"], feats["text_emb"], scale)
        loss.backward()
    return loss


def run_way(way: str, args: argparse.Namespace) -> dict:
    """One way, in this process: build, warm up, time ``args.steps`` steps."""
    from xray_match.config import load_config
    from xray_match.train.loop import Trainer
    from xray_match.train.recipe import DataInfo, move_to

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    over = [f"data.batch_size={args.batch}", "ray.num_workers=1", "train.precision=fp32",
            f"train.micro_batch_size={args.micro if way == 'ours' else 0}", *args.overrides]
    cfg = load_config("moco_cpu", over)
    tr = Trainer(cfg, DataInfo("", "synthetic", {"train": args.batch}), device=device, log=lambda s: None)
    batch = move_to(synthetic_batch(tr.recipe, args.batch, cfg.data.image_size), device)

    def step() -> float:
        loss = open_clip_backward(tr, batch, args.micro) if way == "open_clip" else tr.backward(batch)[2]
        tr.optimizer.step()
        return float(loss)

    with PeakMemory(device) as mem:  # from the first step: a freed buffer stays in the process, not in its peak
        losses = [step() for _ in range(args.warmup)]
        t0, c0 = time.perf_counter(), time.process_time()
        losses += [step() for _ in range(args.steps)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = args.batch * args.steps
    return {"way": way, "peak_mib": mem.mib, "samples_per_s": n / dt, "samples_per_cpu_s": n / cpu,
            "throughput": n / (cpu if device.type == "cpu" else dt), "first_loss": losses[0], "device": str(device),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per way")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1024, help="global batch (one process)")
    p.add_argument("--micro", type=int, default=64, help="micro-batch of ours and open_clip's")
    p.add_argument("--threads", type=int, default=1, help="torch threads per way")
    p.add_argument("--rounds", type=int, default=1, help="each way this many times, alternating; its fastest counts")
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--way", help=argparse.SUPPRESS)  # run one way here (the subprocess)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for the moco_cpu model")
    args = p.parse_args()
    if args.way:
        print(json.dumps(run_way(args.way, args)))
        return
    rows: dict[str, dict | None] = {}
    for rnd in range(args.rounds):  # rounds alternate the ways: a load that comes and goes hits each of them
        for way in args.ways.split(","):
            cmd = [sys.executable, __file__, "--way", way, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--micro", str(args.micro), "--threads", str(args.threads), *args.overrides]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{way}: failed ({done.returncode})\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"round {rnd + 1} {way:10s} peak {r['peak_mib']:8.1f} MiB  {r['samples_per_s']:7.1f} samples/s  "
                  f"{r['samples_per_cpu_s']:7.1f} samples/cpu-s  first loss {r['first_loss']:.4f}  ({r['device']}, "
                  f"{r['threads']} threads, batch {args.batch}, micro {args.micro if way != 'plain' else '-'})")
            best = rows.get(way)  # per way: the fastest round, and the largest peak of any round
            if best is None or r["throughput"] > best["throughput"]:
                rows[way] = r | {"peak_mib": max(r["peak_mib"], best["peak_mib"] if best else 0.0)}
            else:
                best["peak_mib"] = max(best["peak_mib"], r["peak_mib"])
    unit = "samples/cpu-s" if any(r["device"] == "cpu" for r in rows.values()) else "samples/s"
    for way, r in rows.items():
        print(f"{way:10s} peak {r['peak_mib']:8.1f} MiB  {r['throughput']:7.1f} {unit} (best of {args.rounds})")
    ours, oc, plain = rows.get("ours"), rows.get("open_clip"), rows.get("plain")
    memory = f"{ours['peak_mib'] / plain['peak_mib']:.3f}" if ours and plain else "n/a"
    throughput = f"{ours['throughput'] / oc['throughput']:.3f}" if ours and oc else "n/a"
    print(f"memory {memory} throughput {throughput}")


if __name__ == "__main__":
    main()
