"""What the bucket costs: the training reader on ``s3://`` vs the same shards on local disk, and a
``moco_gpu``-sized checkpoint saved / loaded through the bucket vs local disk. Goal: s3/local >= 0.9.

The object store is SeaweedFS on loopback (``devcluster.up(services=("s3",))``): the S3 client path
(s3fs, HTTP, the gateway) without network distance, with the server on the same CPUs. The digit
scenes are built locally and copied to the bucket; both copies are read by the loop's own loader
(``train.loop.split_loader``: ``make_loader`` with the moco_cpu recipe's transform and collate,
shuffle buffer and DataLoader workers). A run takes ``--batches`` batches from a fresh loader, as
each training epoch makes one (and forks fresh DataLoader workers), timed from making the loader
to the last batch; the seconds to the first batch, the rate after it and the workers' CPU per
sample are shown beside it. Each round runs local and s3 once, the order flipping each round; the
last line is the median over the rounds of each round's s3/local samples/s.

The checkpoint is the training loop's whole state (``Trainer.state_dict``: model, SGD momentum,
loss, scheduler, RNG, config) of the ``moco_gpu`` preset: ResNet-50 + DistilBERT + LSTM(768).
Offline there are no downloaded weights, so the ResNet is built without ImageNet weights and
DistilBERT from its default config (distilbert-base-uncased's shapes): the same tensors and bytes.

    uv run python benchmarks/s3_throughput.py [--samples 4000] [--batches 100] [--rounds 5]
        [--workers 1] [--ckpt-repeats 3] [--no-checkpoint]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

from xray_match import devcluster
from xray_match.config import load_config
from xray_match.data.digit_scenes import build_digit_scenes
from xray_match.data.format import read_manifest
from xray_match.train.loop import split_loader
from xray_match.train.recipe import DataInfo


def read_run(cfg, root: str, counts: dict[str, int], batches: int, epoch: int) -> dict[str, float]:
    """``batches`` training batches from a fresh loader over ``root``, as a training epoch starts
    one. Returns samples/s over the whole run (making the loader to the last batch), the seconds to
    the first batch, samples/s after it, and the DataLoader workers' CPU ms per sample (they are
    joined when the run ends, so their CPU time is in RUSAGE_CHILDREN; it hardly moves with the
    machine's other load, which the wall-clock rates do)."""
    from xray_match.registry import RECIPES

    recipe = RECIPES.get(cfg.model.name)(cfg, DataInfo(root=root, dataset="digit_scenes", counts=counts))
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    it = iter(split_loader(recipe, cfg.data.train_split, True, epoch=epoch))
    n = n_first = 0
    t_first = t0
    for i in range(batches):
        n += next(it)["image"].shape[0]
        if i == 0:
            t_first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    del it  # stops and joins the DataLoader workers
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return {"all": n / (t1 - t0), "first_s": t_first - t0, "steady": (n - n_first) / max(t1 - t_first, 1e-9),
            "cpu_ms": 1e3 * cpu / n}


def reader_bench(args, local_root: str, s3_root: str) -> float:
    manifest = read_manifest(local_root)
    counts = {sp: manifest.count(sp) for sp in manifest.splits}
    base = load_config("moco_cpu")
    print(f"\nreader: the loop's loader (moco_cpu transform + collate, shuffle buffer {base.data.shuffle_buffer}), "
          f"batch {base.data.batch_size}, {args.batches} batches a run from a fresh loader; {args.rounds} rounds of "
          "a local and an s3 run, their order flipping each round")
    keys = ("all", "first_s", "steady", "cpu_ms")
    rows, ratios = [], []
    for w in args.workers:
        cfg = load_config("moco_cpu", {"data.num_workers": w})
        runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        for r in range(args.rounds):
            for where in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                x = read_run(cfg, local_root if where == "local" else s3_root, counts, args.batches, epoch=r)
                runs[where].append(x)
                print(f"  workers {w} round {r + 1} {where:>5}: {x['all']:4.0f} samples/s, first batch "
                      f"{x['first_s']:5.2f} s, then {x['steady']:4.0f} samples/s, worker CPU {x['cpu_ms']:.2f} ms a "
                      f"sample (load average {os.getloadavg()[0]:.1f})", flush=True)
        med = {where: {k: statistics.median(x[k] for x in xs) for k in keys} for where, xs in runs.items()}
        # each round's two runs are minutes apart at most: the median of their ratios cancels the drift
        # of the machine's load better than a ratio of medians
        pair = {k: statistics.median(s[k] / lo[k] for s, lo in zip(runs["s3"], runs["local"])) for k in keys}
        ratios.append(pair["all"])
        rows.append((w, med, pair))
    print(f"\n{'workers':>7} {'':>8} {'samples/s':>10} {'first batch s':>14} {'then samples/s':>15} {'worker CPU ms/sample':>21}")
    for w, med, pair in rows:
        for where in ("local", "s3"):
            m = med[where]
            print(f"{w:>7} {where:>8} {m['all']:>10.0f} {m['first_s']:>14.2f} {m['steady']:>15.0f} {m['cpu_ms']:>21.2f}")
        print(f"{w:>7} {'s3/local':>8} {pair['all']:>10.3f} {pair['first_s']:>14.2f} {pair['steady']:>15.3f} "
              f"{pair['cpu_ms']:>21.3f}")
    print("(medians over the rounds; s3/local rows: the median of each round's ratio)")
    return min(ratios)


def get_bench(fs, prefix: str, shards: list[str], repeats: int = 3) -> None:
    """Whole-shard GETs alone (s3fs ``cat_file``, one at a time): the transfer's rate and this
    process's CPU per MB (s3fs's IO thread included; the SeaweedFS server's is not)."""
    rates, cpus = [], []
    for _ in range(repeats):
        r0, t0, mb = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0.0
        for name in shards:
            mb += len(fs.cat_file(f"{prefix}/{name}")) / 1e6
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        rates.append(mb / dt)
        cpus.append(1e3 * ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / mb)
    print(f"s3 GET of every shard, one at a time: {statistics.median(rates):.0f} MB/s, "
          f"client CPU {statistics.median(cpus):.1f} ms per MB (median of {repeats})")


def moco_gpu_state(tmp: str) -> dict:
    """The training loop's state of a moco_gpu run after one optimizer step (SGD momentum present)."""
    from transformers import DistilBertConfig, DistilBertModel

    from xray_match.train.loop import Trainer

    text = os.path.join(tmp, "distilbert-base-uncased-shapes")
    DistilBertModel(DistilBertConfig()).save_pretrained(text)
    cfg = load_config("moco_gpu", {"moco.vision_pretrained": False, "moco.text_model": text})
    info = DataInfo(root="", dataset="coco", counts={"train": 113287, "val": 5000, "test": 5000})
    trainer = Trainer(cfg, info, log=lambda s: None)
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()  # SGD makes its momentum buffers on the first step
    return trainer.state_dict()


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bench(args, tmp: str, bucket: str) -> None:
    """Three ways: ``local`` (save_checkpoint / load_checkpoint on a local path), ``s3 fsspec`` (the
    same functions on an s3:// URL) and ``s3 ray``, the way a training run stores it: saved to a
    local folder, then uploaded by pyarrow as Ray Train does (``copy_files``, 64 MiB chunks, no
    threads on upload); loaded by downloading the folder and opening the file."""
    import pyarrow.fs

    from xray_match.train.checkpoint import CKPT_FILE, load_checkpoint, save_checkpoint

    print("\ncheckpoint: building the moco_gpu training state (ResNet-50 + DistilBERT shapes + LSTM 768)", flush=True)
    state = moco_gpu_state(tmp)
    parts = {k: tensor_bytes(state[k]) / 1e6 for k in ("model", "optimizer", "loss")}
    text = sum(v.numel() * v.element_size() for k, v in state["model"].items() if ".transformer." in k)
    print("  tensor MB: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
          + f"; of the model, the frozen DistilBERT {text / 1e6:.1f}")
    s3, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{bucket}")
    local_fs = pyarrow.fs.LocalFileSystem()
    chunk = 64 * 1024 * 1024

    def save_local(d: str) -> None:
        save_checkpoint(state, os.path.join(tmp, d, CKPT_FILE))

    def load_local(d: str) -> dict:
        return load_checkpoint(os.path.join(tmp, d, CKPT_FILE))

    def save_ray(d: str) -> None:
        save_checkpoint(state, os.path.join(tmp, d, CKPT_FILE))
        pyarrow.fs.copy_files(os.path.join(tmp, d), f"{bucket}/ray/{d}", source_filesystem=local_fs,
                              destination_filesystem=s3, chunk_size=chunk, use_threads=False)
        shutil.rmtree(os.path.join(tmp, d))

    def load_ray(d: str) -> dict:
        os.makedirs(os.path.join(tmp, d + "-down"))
        pyarrow.fs.copy_files(f"{bucket}/ray/{d}", os.path.join(tmp, d + "-down"), source_filesystem=s3,
                              destination_filesystem=local_fs, chunk_size=chunk)
        try:
            return load_checkpoint(os.path.join(tmp, d + "-down", CKPT_FILE))
        finally:
            shutil.rmtree(os.path.join(tmp, d + "-down"))

    ways = {"local": (save_local, load_local),
            "s3 fsspec": (lambda d: save_checkpoint(state, f"s3://{bucket}/fsspec/{d}/{CKPT_FILE}"),
                          lambda d: load_checkpoint(f"s3://{bucket}/fsspec/{d}/{CKPT_FILE}")),
            "s3 ray": (save_ray, load_ray)}
    names = list(ways)
    times: dict[str, dict[str, list[float]]] = {w: {"save": [], "load": []} for w in ways}
    for r in range(args.ckpt_repeats):
        for where in names[r % 3:] + names[: r % 3]:  # each way first once in three rounds
            save, load = ways[where]
            t0 = time.perf_counter()
            save(where.replace(" ", "-"))
            times[where]["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = load(where.replace(" ", "-"))
            times[where]["load"].append(time.perf_counter() - t0)
            assert back["model"].keys() == state["model"].keys()
            del back
            print(f"  round {r + 1} {where:>9}: save {times[where]['save'][-1]:.2f} s, "
                  f"load {times[where]['load'][-1]:.2f} s", flush=True)
    mb = os.path.getsize(os.path.join(tmp, "local", CKPT_FILE)) / 1e6
    print(f"\n{'checkpoint':>10} {'MB':>8} {'save s':>8} {'save MB/s':>10} {'load s':>8} {'load MB/s':>10}   (medians)")
    for where in ways:
        s, l = statistics.median(times[where]["save"]), statistics.median(times[where]["load"])
        print(f"{where:>10} {mb:>8.1f} {s:>8.2f} {mb / s:>10.0f} {l:>8.2f} {mb / l:>10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=100, help="batches a run (moco_cpu: 32 samples each)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers (moco_cpu: 1)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of one local and one s3 run")
    ap.add_argument("--ckpt-repeats", type=int, default=3)
    ap.add_argument("--no-checkpoint", action="store_true")
    args = ap.parse_args()
    import transformers  # as in training, where the model imported it before the workers fork

    transformers.utils.logging.disable_progress_bar()
    local_root = os.path.join(tempfile.gettempdir(), f"xray-bench-scenes-s3-{args.samples}")
    build_digit_scenes(local_root, train=args.samples, val=0, test=0, maxcount=250, progress=False)
    shards = [n for n in os.listdir(local_root) if n.endswith(".tar")]
    mb = sum(os.path.getsize(os.path.join(local_root, n)) for n in shards) / 1e6
    print(f"{len(shards)} shards, {args.samples} samples, {mb:.1f} MB ({mb / len(shards):.2f} MB a shard, "
          f"{mb * 1e3 / args.samples:.1f} kB a sample: 64 px PNG, saliency PNG, json)")
    tmp = tempfile.mkdtemp(prefix="xray-s3bench-")
    folder = os.path.join(tmp, "dev-cluster")
    try:
        t0 = time.perf_counter()
        st = devcluster.up(folder, services=("s3",))
        os.environ.update(st.exports())  # before any DataLoader worker forks
        print(f"SeaweedFS up in {time.perf_counter() - t0:.1f} s, bucket {st.bucket}")
        import fsspec

        fs = fsspec.filesystem("s3")
        t0 = time.perf_counter()
        fs.put(local_root.rstrip("/") + "/", f"{st.bucket}/scenes/", recursive=True)
        print(f"copied to s3://{st.bucket}/scenes in {time.perf_counter() - t0:.1f} s "
              f"({len(fs.ls(f'{st.bucket}/scenes'))} objects)")
        get_bench(fs, f"{st.bucket}/scenes", shards)
        ratio = reader_bench(args, local_root, f"s3://{st.bucket}/scenes")
        if not args.no_checkpoint:
            checkpoint_bench(args, tmp, st.bucket)
    finally:
        devcluster.down(folder, purge=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"s3/local {ratio:.3f}")


if __name__ == "__main__":
    main()
