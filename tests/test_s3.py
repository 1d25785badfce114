"""``s3://`` wherever a path goes, against a real S3 endpoint (SeaweedFS, the ``s3_store``
fixture), configured as users configure it: the AWS_* variables, read by fsspec (s3fs) and by
pyarrow (Ray's storage) alike. Shards written, verified, read and trained on in the bucket;
checkpoints, Ray Train runs and a Tune study there, with the scheme kept in what is printed and
tagged; the search index published there and loaded back; a conversion killed while writing to
the bucket is refused until a re-run completes it; an unreachable store fails a job in one line.
Subprocess timeouts only guard against a hang; no verdict depends on speed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from helpers import one_error_line as _one_error_line
from helpers import run_job as _job
from xray_match.data.digit_scenes import SceneSpec, build_digit_scenes, render_scene
from xray_match.data.format import ShardFormatError, find_manifest, read_manifest
from xray_match.data.io import filesystem, write_atomic
from xray_match.data.reader import ShardStream, make_loader, shard_urls
from xray_match.data.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(train=40, val=10, test=10, size=32, maxcount=10, workers=1, progress=False)


@pytest.fixture
def s3_url(s3_store, request) -> str:
    """A fresh prefix in the session's bucket for one test."""
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40]
    return f"s3://{s3_store['bucket']}/{name}-{uuid.uuid4().hex[:6]}"


def _objects(url: str) -> set[str]:
    """Names below ``url`` in the bucket now (relative to it), as a fresh listing shows them."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    return {p[len(root) + 1:] for p in fs.find(root)}


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``xray-match ...`` in a subprocess with this session's environment (the store's AWS_* variables)."""
    return subprocess.run([sys.executable, "-m", "xray_match.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- shards


@pytest.mark.s3
def test_digit_scenes_in_the_bucket_verify_and_stream_into_training(s3_url):
    build_digit_scenes(s3_url, **TINY)
    m = read_manifest(s3_url)
    listed = {s.name for split in m.splits for s in m.shards(split)}
    assert _objects(s3_url) == listed | {"manifest.json"}  # nothing else: no temp objects, ever
    out = _cli("data", "verify", s3_url, "--no-progress")
    assert out.returncode == 0 and out.stdout.strip() == f"{s3_url}: ok", out.stderr[-2000:]
    # the training reader streams the bucket: the very samples the generator renders
    urls = shard_urls(s3_url, "val")
    assert all(u.startswith(f"{s3_url}/val-") for u in urls)
    got = list(ShardStream(urls, train=False))
    assert [s["key"] for s in got] == [f"val-{i:07d}" for i in range(10)]
    assert got[3]["meta"] == render_scene("val", 3, SceneSpec(size=32))["json"]
    batches = make_loader(s3_url, "train", lambda s: {"key": s["key"]}, lambda items: {"n": len(items)}, batch_size=8,
                          train=True, num_workers=0)
    first = next(iter(batches))
    assert first["n"] == 8 and all(k.startswith("train-") for k in first["_keys"])


CONVERT = ("data", "digit-scenes", "--train", "160", "--val", "8", "--test", "8", "--size", "32", "--maxcount", "4",
           "--workers", "1", "--no-progress")


@pytest.mark.s3
def test_a_conversion_killed_while_writing_to_the_bucket_is_refused_until_a_rerun_completes_it(s3_url):
    """SIGKILL once some shards are in the bucket: no rename exists there, yet the folder is
    complete or refused. Its manifest (the one object that says a folder is finished, written
    last) still says incomplete, so verify and the training reader refuse it, naming it; the same
    command again keeps the listed shards, rewrites the rest, and leaves no stray object."""
    proc = subprocess.Popen([sys.executable, "-m", "xray_match.cli", *CONVERT, "--out", s3_url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # only against a hang: the loop ends when the state is there
        while not sum(n.endswith(".tar") for n in _objects(s3_url)) >= 2:
            assert proc.poll() is None, f"the conversion ended by itself (rc {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "no shard reached the bucket"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    m = find_manifest(s3_url)
    assert m is not None and not m.complete, "the conversion finished before the kill: make it larger"
    manifest = f"{s3_url}/manifest.json"
    incomplete = f"{manifest}: incomplete: its writer has not finished (re-run it to resume)"

    out = _cli("data", "verify", s3_url, "--no-progress")
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert out.returncode == 1 and errors[0] == f"error: {incomplete}", out.stderr[-2000:]
    for read in (read_manifest, lambda root: make_loader(root, "train", None, None, batch_size=4, train=True)):
        with pytest.raises(ShardFormatError, match=f"^{re.escape(incomplete)}$"):
            read(s3_url)

    out = _cli(*CONVERT, "--out", s3_url)
    assert out.returncode == 0, out.stderr[-2000:]
    assert verify(s3_url, progress=False) == []
    m = read_manifest(s3_url)
    assert m.count("train") == 160 and len(m.shards("train")) == 40
    listed = {s.name for split in m.splits for s in m.shards(split)}
    assert _objects(s3_url) == listed | {"manifest.json"}  # what the killed writer left is gone


# ----------------------------------------------------------------------------- checkpoints and run storage


@pytest.mark.s3
def test_checkpoints_in_the_bucket_round_trip_and_keep_their_scheme(s3_url):
    from xray_match.driver.storage import Storage
    from xray_match.train.checkpoint import CKPT_FILE, load_checkpoint, save_checkpoint

    folder = f"{s3_url}/runs/r1/checkpoint_000000"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "loop": {"epoch": 1, "history": [{"val/x": 0.5}]}}
    save_checkpoint(state, f"{folder}/{CKPT_FILE}")
    back = load_checkpoint(folder)  # a folder in the bucket holding the file
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["loop"] == state["loop"]

    # a write that fails half-way leaves the object as it was: nothing partial is uploaded
    def half(fh):
        fh.write(b"not a checkpoint")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(f"{folder}/{CKPT_FILE}", half)
    assert torch.equal(load_checkpoint(folder)["model"]["w"], state["model"]["w"])
    assert _objects(f"{s3_url}/runs") == {f"r1/checkpoint_000000/{CKPT_FILE}"}

    # Ray reports a checkpoint under an s3:// root without the scheme; the storage hands out the URL
    storage = Storage(f"{s3_url}/runs")
    ray_path = folder.removeprefix("s3://")
    ckpt = storage.checkpoint(ray_path)
    assert ckpt.url == str(ckpt) == folder
    assert storage.checkpoint(folder).url == folder  # a URL stays one
    assert torch.equal(ckpt.load()["model"]["w"], state["model"]["w"])
    with ckpt.as_directory() as d:  # through Ray's pyarrow file system, configured by the same variables
        assert os.listdir(d) == [CKPT_FILE]


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_train_job_with_data_and_storage_in_the_bucket_prints_and_tags_s3_urls(s3_url, ray_cluster_s3, tmp_path,
                                                                                  capsys):
    """``--data s3://... --storage-path s3://...``: the job reads the bucket, Ray writes step and
    epoch checkpoints there, and the summary, the test evaluation and the registered version's tags
    name the checkpoint with its scheme (it used to print ``bucket/runs/...``)."""
    from mlflow import MlflowClient

    from xray_match.launch import train_main
    from xray_match.train.checkpoint import load_checkpoint

    build_digit_scenes(f"{s3_url}/data", **TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = train_main("moco_cpu", argv=[
        "--data", f"{s3_url}/data", "--storage-path", f"{s3_url}/runs", "--tracking-uri", uri, "--name", "s3run",
        "--model-name", "s3-moco", "--num-workers", "1", "--cpus-per-worker", "1", "--epochs", "1",
        "data.steps_per_epoch=3", "train.checkpoint_every_steps=2", "data.num_workers=0", "data.batch_size=8",
        "data.eval_batch_size=16", "moco.embed_dim=32", "moco.teacher_hidden=[64]", "moco.lstm_hidden=64"])
    ckpt = out["checkpoint"].url  # a StoredCheckpoint, named by its URL
    assert ckpt.startswith(f"{s3_url}/runs/s3run/checkpoint_"), ckpt
    printed = capsys.readouterr().out
    assert re.search(rf"checkpoint: {re.escape(ckpt)}$", printed, re.M), printed[-2000:]
    assert load_checkpoint(ckpt)["loop"]["step"] == 3 and "test/rsum" in out["test"]
    # the step checkpoint (step 2) and the epoch one (step 3) are both in the bucket
    run = f"{s3_url}/runs/s3run"
    folders = {p.rsplit("/", 1)[0] for p in _objects(run) if p.endswith("/checkpoint.pt")}
    assert sorted(load_checkpoint(f"{run}/{f}")["loop"]["step"] for f in folders) == [2, 3]
    tags = MlflowClient(uri).get_model_version("s3-moco", str(out["model_version"])).tags
    assert tags["checkpoint"] == ckpt and tags["data_path"] == f"{s3_url}/data"


# ----------------------------------------------------------------------------- the search index


def _random_index(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images = {"key": [f"k{i:04d}" for i in range(n)], "split": ["s"] * n, "shard": [""] * n, "offset": [0] * n,
              "size": [0] * n, "ext": ["png"] * n}
    return x, images, {"text": ["t0", "t1"], "image": [0, 1]}


@pytest.mark.s3
def test_an_index_in_the_bucket_is_published_by_a_pointer_and_never_seen_half(s3_url, tmp_path, monkeypatch):
    """Each write is a new version under the prefix, published by ``current.json`` written last:
    a reader sees the old index or the new one. A writer killed before its pointer leaves a
    version no reader opens, and the next write removes it."""
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.index_build import write_index
    from xray_match.serve.index_store import CURRENT, IndexFormatError, read_meta

    monkeypatch.setenv("XRAY_MATCH_HOME", str(tmp_path))  # readers' local copies go there
    url = f"{s3_url}/index"
    fs, root = filesystem(url)
    pointer = lambda: json.loads(fs.cat_file(f"{root}/{CURRENT}"))["version"]  # noqa: E731
    x, images, caps = _random_index(30, 0)
    write_index(url, x, images, x[:2], caps, {"model": {}, "data": ""})
    first = pointer()
    idx = SearchIndex.load(url)
    assert idx.path == url and idx.meta["images"] == 30 and read_meta(url)["images"] == 30
    np.testing.assert_array_equal(idx.search_images(x[:3], 1)[1][:, 0], [0, 1, 2])
    assert _objects(url) == {CURRENT} | {f"{first}/{n}" for n in
                                         ("index.json", "images.faiss", "images.json", "captions.faiss", "captions.json")}

    # what a writer killed before its pointer leaves: objects of a version nothing names
    killed = "v-00000000T000000-deadbeef"
    fs.pipe_file(f"{root}/{killed}/images.faiss", b"half an upload")
    assert SearchIndex.load(url).meta["images"] == 30  # readers follow the pointer only

    y, images7, _ = _random_index(7, 1)
    write_index(url, y, images7, y[:2], caps, {"model": {}, "data": ""})
    second = pointer()
    assert SearchIndex.load(url).meta["images"] == 7
    # kept: the new version and the one it replaced (a reader may be copying it); the killed one is gone
    assert {p.split("/")[0] for p in _objects(url) if p.startswith("v-")} == {first, second}
    write_index(url, y, images7, y[:2], caps, {"model": {}, "data": ""})
    assert {p.split("/")[0] for p in _objects(url) if p.startswith("v-")} == {second, pointer()}

    # a prefix holding someone else's objects is not written into
    fs.pipe_file(f"{root}-foreign/notes.txt", b"keep me")
    with pytest.raises(IndexFormatError, match=f"^{re.escape(url)}-foreign: exists and is not an index"):
        write_index(f"{url}-foreign", x, images, x[:2], caps, {})
    with pytest.raises(IndexFormatError, match=f"^{re.escape(url)}-foreign: no {CURRENT}"):
        SearchIndex.load(f"{url}-foreign")
    assert _objects(f"{url}-foreign") == {"notes.txt"}


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_index_of_shards_in_the_bucket_built_into_the_bucket_and_served_from_it(s3_url, ray_cluster_s3, tmp_path,
                                                                               monkeypatch):
    """``xray-match index --data s3://... --out s3://...`` and the search service's loading path
    (its preflight, then Searcher.load) on the registered version's tagged index."""
    from serve_helpers import index_cli, register, shard_images, train_checkpoint
    from xray_match.serve.app import preflight
    from xray_match.serve.model import index_of
    from xray_match.serve.search import Searcher

    monkeypatch.setenv("XRAY_MATCH_HOME", str(tmp_path))  # readers' local copies go there
    data, out = f"{s3_url}/data", f"{s3_url}/index"
    build_digit_scenes(data, **TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = train_checkpoint(data, str(tmp_path / "ckpt"), steps=2, seed=0)  # trained on the bucket's shards
    register(uri, ckpt, "s3-serve")
    index_cli("models:/s3-serve@champion", data, out, uri)
    ref, index = preflight("models:/s3-serve@champion", None, uri)
    assert index == out and index_of(ref) == out  # the version's INDEX_TAG keeps the scheme
    searcher = Searcher.load(ref, index)
    assert searcher.index.path == out and searcher.index.meta["images"] == 10
    assert searcher.index.meta["data"] == data
    hits = searcher.text_to_images(["a red seven"], 3)[0]
    assert len(hits) == 3 and all(h["split"] == "test" for h in hits)
    originals = shard_images(data, "test")
    row = searcher.index.images["key"].index(hits[0]["id"])
    assert searcher.index.image_bytes(row) == (originals[hits[0]["id"]], "image/png")  # a ranged read in the bucket


# ----------------------------------------------------------------------------- an unreachable store, at start


@pytest.mark.slow
def test_a_job_with_an_unreachable_store_fails_in_one_line_naming_the_endpoint(tmp_path, monkeypatch):
    """No store runs here: AWS_ENDPOINT_URL points at a closed loopback port."""
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    out = _job("--data", "s3://xray-bucket/nothing", home=str(tmp_path))
    _one_error_line(out, "data.path: s3://xray-bucket/nothing: cannot reach the S3 endpoint",
                    f"http://127.0.0.1:{port} (AWS_ENDPOINT_URL)")
    assert not (tmp_path / "runs").exists()  # Ray never started
    out = _cli("data", "verify", "s3://xray-bucket/nothing", "--no-progress", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"error: data verify: s3://xray-bucket/nothing: cannot reach the S3 endpoint "
                           f"http://127.0.0.1:{port} (AWS_ENDPOINT_URL) within 3 s ("), line


@pytest.mark.s3
def test_a_job_refuses_a_missing_data_folder_or_bucket_in_the_store_in_one_line(s3_store, s3_url, tmp_path):
    endpoint = f"{s3_store['endpoint']} (AWS_ENDPOINT_URL)"
    _one_error_line(_job("--data", f"{s3_url}/nothing", home=str(tmp_path)),
                    f"data.path: {s3_url}/nothing: no manifest.json")
    build_digit_scenes(f"{s3_url}/data", **TINY)
    _one_error_line(_job("--data", f"{s3_url}/data", "--storage-path", "s3://no-such-bucket/runs", home=str(tmp_path)),
                    "ray.storage_path: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist", endpoint)
    _one_error_line(_job("--data", "s3://no-such-bucket/data", home=str(tmp_path)), "data.path", endpoint)


@pytest.mark.slow
def test_the_store_check_gives_up_on_a_silent_endpoint_and_names_other_stores(monkeypatch):
    from xray_match.preflight import PreflightError, check_store

    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        with pytest.raises(PreflightError, match=f"^--out: s3://b/x: cannot reach the S3 endpoint {re.escape(endpoint)} "
                                                 r"\(AWS_ENDPOINT_URL\) within 1 s \(Read timeout"):
            check_store("s3://b/x", "--out", timeout_s=1)
    finally:
        silent.close()
    # a store of another kind is checked through its own fsspec client (gcsfs is an optional extra)
    with pytest.raises(PreflightError, match=r"^data.path: gs://b/x: cannot open the gs:// store \(.*gcsfs"):
        check_store("gs://b/x", "data.path")
    check_store("memory://b/x", "data.path")  # nothing to reach
    check_store("/a/local/folder", "data.path")
