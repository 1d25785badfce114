"""The search index: built by `xray-match index` with Ray Data from real shards and a real
registered model; real faiss (flat, IVF, HNSW); the folder written atomically; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from serve_helpers import shard_images

pytestmark = pytest.mark.timeout(900)


@pytest.mark.ray
def test_index_holds_every_image_and_caption_embedded_by_the_model(served_model):
    import xray_match
    from mlflow import MlflowClient

    from xray_match.data.reader import decode_sample, iter_raw, shard_urls
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.model import INDEX_TAG

    idx = SearchIndex.load(served_model["index"])
    samples = [decode_sample(raw, parts=frozenset()) for url in shard_urls(served_model["data"], "test") for raw in iter_raw(url)]
    assert idx.meta["images"] == len(samples) == 60
    assert idx.meta["captions"] == sum(len(s["meta"]["captions"]) for s in samples)
    assert idx.meta["model"] | {"uri": None} == {"uri": None, "name": "serve-moco", "alias": "champion", "version": "1"}
    # rows in (split, key) order; every caption row points at its image
    assert idx.images["key"] == sorted(s["key"] for s in samples)
    by_key = {s["key"]: s for s in samples}
    texts = [(idx.images["key"][i], t) for t, i in zip(idx.captions["text"], idx.captions["image"])]
    assert sorted(texts) == sorted((s["key"], c) for s in samples for c in s["meta"]["captions"])

    # the vectors are the model's own embeddings (Ray Data actors = this process's model)
    model = xray_match.load_model("models:/serve-moco/1", tracking_uri=served_model["tracking_uri"])
    rows = [0, 17, 59]
    want_img = model.encode_images([by_key[idx.images["key"][r]]["image"] for r in rows]).numpy()
    got_img = np.stack([idx.images_index.reconstruct(r) for r in rows])
    np.testing.assert_allclose(got_img, want_img, rtol=1e-4, atol=1e-5)
    want_txt = model.encode_texts([idx.captions["text"][r] for r in rows]).numpy()
    np.testing.assert_allclose(np.stack([idx.captions_index.reconstruct(r) for r in rows]), want_txt, rtol=1e-4, atol=1e-5)

    # the version knows where its index is
    mv = MlflowClient(served_model["tracking_uri"]).get_model_version("serve-moco", "1")
    assert mv.tags[INDEX_TAG] == served_model["index"]

    # images are read back from the shards byte for byte (one ranged read per image)
    originals = shard_images(served_model["data"], "test")
    for r in rows:
        data, mime = idx.image_bytes(r)
        assert data == originals[idx.images["key"][r]] and mime == "image/png"


@pytest.mark.ray
def test_exact_search_equals_brute_force(served_model):
    import xray_match

    from xray_match.serve.index import SearchIndex

    idx = SearchIndex.load(served_model["index"])
    model = xray_match.load_model("models:/serve-moco/1", tracking_uri=served_model["tracking_uri"])
    q = model.encode_texts(["a red seven left of a blue two", "three digits"]).numpy()
    scores, rows = idx.search_images(q, 10)
    all_vectors = np.stack([idx.images_index.reconstruct(i) for i in range(idx.images_index.ntotal)])
    brute = q @ all_vectors.T
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :10], rtol=1e-5, atol=1e-5)
    for b in range(2):
        np.testing.assert_allclose(brute[b, rows[b]], scores[b], rtol=1e-5, atol=1e-5)


def _random_index(tmp_path, kind: str, n: int = 4000, d: int = 32, **kw):
    from xray_match.serve.config import IndexConfig
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.index_build import write_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    images = {"key": [f"k{i:05d}" for i in range(n)], "split": ["s"] * n, "shard": [""] * n,
              "offset": [0] * n, "size": [0] * n, "ext": ["png"] * n}
    caps = {"text": ["t0", "t1"], "image": [0, 1]}
    path = write_index(str(tmp_path / kind), x, images, x[:2], caps, {"model": {}, "data": ""}, IndexConfig(kind=kind, **kw))
    return x, SearchIndex.load(path)


@pytest.mark.parametrize("kind,params", [("ivf", {"nprobe": 32}), ("hnsw", {"ef_search": 128})])
def test_approximate_indexes_find_the_exact_neighbours(tmp_path, kind, params):
    x, idx = _random_index(tmp_path, kind, **params)
    assert idx.meta["kind"] == kind
    q = x[:50] + 0.05 * np.random.default_rng(1).standard_normal((50, x.shape[1])).astype(np.float32)
    _, got = idx.search_images(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.9, f"{kind} recall@10 {recall:.2f}"


def test_index_folder_is_replaced_atomically_and_foreign_folders_are_refused(tmp_path):
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.index_build import write_index
    from xray_match.serve.index_store import IndexFormatError

    x, first = _random_index(tmp_path, "flat", n=50)
    path = first.path
    # a failed write (inconsistent columns) leaves the old index whole and no temporary folder
    bad = {"key": ["a"], "split": ["s"], "shard": [""], "offset": [0], "size": [0], "ext": ["png"]}
    with pytest.raises(IndexFormatError, match="images.json columns"):
        write_index(path, x, bad, x[:0], {"text": [], "image": []}, {})
    assert SearchIndex.load(path).meta["images"] == 50
    # a rewrite replaces it whole; nothing is left beside it
    write_index(path, x[:7], {c: v[:7] for c, v in first.images.items()}, x[:1], {"text": ["t"], "image": [0]}, {})
    assert SearchIndex.load(path).meta["images"] == 7
    assert sorted(os.listdir(tmp_path)) == ["flat"]
    # someone else's folder is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(IndexFormatError, match="not an index folder"):
        write_index(str(foreign), x, first.images, x[:2], {"text": ["a", "b"], "image": [0, 1]}, {})
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_reader_errors_name_the_file(tmp_path):
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.index_store import META, IndexFormatError

    with pytest.raises(IndexFormatError, match=r"no index.json .*xray-match index"):
        SearchIndex.load(str(tmp_path))
    _, idx = _random_index(tmp_path, "flat", n=20)
    meta_path = os.path.join(idx.path, META)
    meta = json.loads(open(meta_path).read())
    json.dump(meta | {"images": 21}, open(meta_path, "w"))
    with pytest.raises(IndexFormatError, match=r"images.faiss: 20 vectors, images.json 20 rows, index.json says 21"):
        SearchIndex.load(idx.path)
    json.dump(meta | {"format_version": 99}, open(meta_path, "w"))
    with pytest.raises(IndexFormatError, match="format_version 99"):
        SearchIndex.load(idx.path)


def test_cross_attention_output_is_refused_with_a_clear_error():
    from xray_match.serve.model import embed_texts
    from xray_match.tracking.models import ModelLookupError

    class PairScorer:  # RDAN's encode_texts gives word features (N, n, D), not one vector per text
        def encode_texts(self, texts):
            return np.zeros((len(texts), 5, 8), np.float32)

    with pytest.raises(ModelLookupError, match=r"\(1, 5, 8\), not \(N, D\).*cannot be indexed"):
        embed_texts(PairScorer(), ["a"])


@pytest.mark.ray
def test_index_cli_errors_are_one_line(served_model, tmp_path, capsys):
    from xray_match.cli import main

    common = ["--out", str(tmp_path / "x"), "--tracking-uri", served_model["tracking_uri"], "--no-progress"]
    assert main(["index", "--model", "models:/serve-moco@nope", "--data", served_model["data"], *common]) == 2
    assert "registered model 'serve-moco' has no alias 'nope'" in capsys.readouterr().err
    assert main(["index", "--model", "models:/serve-moco/1", "--data", served_model["data"], "--splits", "dev", *common]) == 2
    assert "no split 'dev'" in capsys.readouterr().err
    assert main(["index", "--model", "models:/serve-moco/1", "--data", served_model["data"], "--nprobe", "0", *common]) == 2
    assert "index.nprobe: 0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_index_on_an_object_store_is_uploaded_whole_and_fetched(tmp_path):
    """Any fsspec URL (memory:// here, s3:// in tests/test_s3.py): a version uploaded whole, then
    the pointer to it; readers load a local copy of the version the pointer names."""
    import fsspec

    from xray_match.serve.config import IndexConfig
    from xray_match.serve.index import SearchIndex
    from xray_match.serve.index_build import write_index
    from xray_match.serve.index_store import CURRENT, META, fetch

    x, local = _random_index(tmp_path, "flat", n=30)
    url = "memory://indexes/flat-30"
    write_index(url, x, local.images, x[:2], {"text": ["t0", "t1"], "image": [0, 1]}, {"model": {}}, IndexConfig())
    fs = fsspec.filesystem("memory")
    version = json.loads(fs.cat_file(f"/indexes/flat-30/{CURRENT}"))["version"]
    assert fs.exists(f"/indexes/flat-30/{version}/{META}")
    idx = SearchIndex.load(url)
    assert idx.path == url and idx.meta["images"] == 30
    assert fetch(url, cache=str(tmp_path / "cache")) == fetch(url, cache=str(tmp_path / "cache"))  # cached
    np.testing.assert_array_equal(idx.search_images(x[:3], 1)[1][:, 0], [0, 1, 2])


@pytest.mark.ray
def test_serve_cli_refuses_what_a_replica_would_refuse(served_model, tmp_path, capsys):
    """`xray-match serve` checks model, index and version before deploying (Serve would retry a
    failing replica for minutes)."""
    from xray_match.cli import main

    uri = ["--tracking-uri", served_model["tracking_uri"]]
    assert main(["serve", "--model", "models:/serve-moco@nope", *uri]) == 2
    assert "has no alias 'nope'" in capsys.readouterr().err
    assert main(["serve", "--model", "models:/serve-moco/1", "--index", str(tmp_path), *uri]) == 2
    assert "no index.json" in capsys.readouterr().err
    other = tmp_path / "other"
    import shutil

    shutil.copytree(served_model["index"], other)
    meta = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps(meta | {"model": meta["model"] | {"version": "7"}}))
    assert main(["serve", "--model", "models:/serve-moco/1", "--index", str(other), *uri]) == 2
    assert "built for serve-moco version 7, not version 1" in capsys.readouterr().err
    assert main(["serve", "--model", "models:/serve-moco/1", "--port", "0", *uri]) == 2
    assert "serve.port: 0 is out of range" in capsys.readouterr().err
