"""The one model reference (xray_match.tracking.models): parsing, resolving an alias to a version,
pinning it (the alias kept), following a moved alias, loading exactly the pinned version, and the
one-line errors; against a real MLflow store (sqlite + local artifacts in tmp_path), no mocks.
Also the serve driver's use of it: preflight pins once and checks the index against that version."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

NAME = "ref-model"


@pytest.fixture
def registry(tmp_path):
    """A real sqlite MLflow store; ``add(folder)`` registers ``folder`` as the next version of
    ``ref-model`` (its files logged as run artifacts) and moves ``champion`` to it."""
    from mlflow import MlflowClient

    from xray_match.tracking.store import local_artifact_root

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("refs", artifact_location=local_artifact_root(uri))

    def add(folder: str) -> str:
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, folder, "checkpoint")
        c.set_terminated(run.info.run_id)
        if not c.search_registered_models(f"name = '{NAME}'"):
            c.create_registered_model(NAME)
        mv = c.create_model_version(NAME, f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
        c.set_registered_model_alias(NAME, "champion", mv.version)
        return str(mv.version)

    return {"uri": uri, "client": c, "add": add}


def _folder(tmp_path, name: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "note.txt").write_text(name)
    return str(d)


# ------------------------------------------------------------------------------ parsing


def test_parse_names_a_version_an_alias_a_checkpoint_or_an_artifact_uri(tmp_path, monkeypatch):
    from xray_match.tracking.models import ModelRef

    uri = f"sqlite:///{tmp_path / 'x.db'}"
    alias = ModelRef.parse("models:/m-1@champion", uri)
    assert (alias.name, alias.alias, alias.version, alias.tracking_uri) == ("m-1", "champion", None, uri)
    assert alias.registered and not alias.pinned
    version = ModelRef.parse("models:/m-1/12", uri)
    assert (version.name, version.alias, version.version) == ("m-1", None, "12")
    assert version.pinned and version.pinned_uri == "models:/m-1/12" == str(version)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)
    path = ModelRef.parse("ckpt", uri)  # relative: made absolute, no tracking store
    assert (path.uri, path.tracking_uri, path.registered, path.pinned) == (str(ckpt), None, False, True)
    run = ModelRef.parse("runs:/0123abcd/checkpoint", uri)
    assert (run.uri, run.tracking_uri, run.registered, run.pinned_uri) == ("runs:/0123abcd/checkpoint", uri, False,
                                                                          "runs:/0123abcd/checkpoint")
    assert alias.to_json() == {"uri": "models:/m-1@champion", "name": "m-1", "alias": "champion", "version": None}


@pytest.mark.parametrize("text", ["models:/", "models:/m", "models:/m@", "models:/m/latest", "models:/m/3/extra",
                                  "models:/m@a@b", "models:/m@a/3", "no/such/checkpoint", ""])
def test_a_bad_reference_is_one_line_naming_it(text, tmp_path):
    from xray_match.tracking.models import ModelLookupError, ModelRef

    with pytest.raises(ModelLookupError) as e:
        ModelRef.parse(text, f"sqlite:///{tmp_path / 'x.db'}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(repr(text) + ":"), msg
    assert "models:/NAME@ALIAS or models:/NAME/VERSION" in msg


def test_the_tracking_uri_is_the_given_one_else_the_packages_rule(tmp_path, monkeypatch):
    from xray_match.config import Config
    from xray_match.tracking.models import ModelRef
    from xray_match.tracking.store import resolve_tracking_uri

    monkeypatch.setenv("XRAY_MATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert ModelRef.parse("models:/m@a").tracking_uri == local == resolve_tracking_uri(Config())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert ModelRef.parse("models:/m@a").tracking_uri == "http://mlflow.example:5000" == resolve_tracking_uri()
    assert ModelRef.parse("models:/m@a", "sqlite:///given.db").tracking_uri == "sqlite:///given.db"
    cfg = Config().with_overrides({"tracking.tracking_uri": "sqlite:///cfg.db"})
    assert resolve_tracking_uri(cfg) == "sqlite:///cfg.db" and resolve_tracking_uri(cfg, "sqlite:///given.db") == "sqlite:///given.db"


# ------------------------------------------------------------------------------ resolving and pinning


def test_an_alias_resolves_to_a_pinned_version_that_stays_when_the_alias_moves(registry, tmp_path):
    from xray_match.tracking.models import ModelRef, resolve

    uri, add = registry["uri"], registry["add"]
    assert add(_folder(tmp_path, "v1")) == "1"
    ref = ModelRef.parse(f"models:/{NAME}@champion", uri)
    pinned = ref.resolve()
    assert (pinned.name, pinned.alias, pinned.version, pinned.uri) == (NAME, "champion", "1", f"models:/{NAME}@champion")
    assert pinned.pinned and pinned.pinned_uri == f"models:/{NAME}/1" and str(pinned) == f"models:/{NAME}/1 (@champion)"
    assert pickle.loads(pickle.dumps(pinned)) == pinned  # what a Serve replica / Ray Data actor receives
    assert pinned.resolve() == pinned  # a pinned reference stays on its version

    assert add(_folder(tmp_path, "v2")) == "2"  # champion -> 2
    assert pinned.resolve().version == "1" and pinned.pinned_uri == f"models:/{NAME}/1"
    moved = pinned.follow()  # the alias read again, once
    assert (moved.alias, moved.version) == ("champion", "2")
    assert resolve(f"models:/{NAME}@champion", uri) == moved
    assert resolve(f"models:/{NAME}/1", uri).version == "1" and resolve(f"models:/{NAME}/1", uri).follow().version == "1"


def test_unresolvable_references_are_one_line_naming_reference_and_store(registry, tmp_path):
    from xray_match.tracking.models import ModelLookupError, ModelRef, resolve

    uri = registry["uri"]
    registry["add"](_folder(tmp_path, "v1"))
    cases = {f"models:/{NAME}@nope": f"registered model '{NAME}' has no alias 'nope' at {uri}",
             f"models:/{NAME}/9": f"registered model '{NAME}' has no version 9 at {uri}",
             "models:/missing@champion": f"no registered model 'missing' at {uri} (registered: {NAME})"}
    for text, want in cases.items():
        with pytest.raises(ModelLookupError) as e:
            resolve(text, uri)
        assert str(e.value) == f"{text}: {want}"
    with pytest.raises(ModelLookupError, match=r"not resolved to a version yet"):
        ModelRef.parse(f"models:/{NAME}@champion", uri).load()
    with pytest.raises(ModelLookupError, match=f"^models:/{NAME}/9: registered model '{NAME}' has no version 9"):
        ModelRef.parse(f"models:/{NAME}/9", uri).tags()


def test_tags_belong_to_the_pinned_version(registry, tmp_path):
    from xray_match.serve.model import INDEX_TAG, index_of, tag_index
    from xray_match.tracking.models import resolve

    uri, add = registry["uri"], registry["add"]
    add(_folder(tmp_path, "v1"))
    v1 = resolve(f"models:/{NAME}@champion", uri)
    add(_folder(tmp_path, "v2"))
    tag_index(v1, str(tmp_path / "index-v1"))  # the alias has moved: the tag still lands on version 1
    assert index_of(v1) == str(tmp_path / "index-v1")
    assert registry["client"].get_model_version(NAME, "1").tags[INDEX_TAG] == str(tmp_path / "index-v1")
    assert index_of(v1.follow()) is None


def test_loading_a_pinned_alias_loads_that_version_after_the_alias_moved(registry, tiny_scenes, tmp_path):
    """Real checkpoints (two initialisations of the tiny moco) registered as versions 1 and 2."""
    from serve_helpers import train_checkpoint

    import xray_match
    from xray_match.tracking.models import load_inference, resolve

    uri, add = registry["uri"], registry["add"]
    ckpt1 = train_checkpoint(tiny_scenes, str(tmp_path / "ckpt1"), steps=0, seed=0)
    ckpt2 = train_checkpoint(tiny_scenes, str(tmp_path / "ckpt2"), steps=0, seed=1)
    add(ckpt1)
    pinned = resolve(f"models:/{NAME}@champion", uri)
    add(ckpt2)
    texts = ["a red seven left of a blue two"]
    want1, want2 = (load_inference(c).encode_texts(texts).numpy() for c in (ckpt1, ckpt2))
    assert not np.allclose(want1, want2)
    np.testing.assert_allclose(pinned.load().encode_texts(texts).numpy(), want1, atol=1e-6)
    np.testing.assert_allclose(pinned.follow().load().encode_texts(texts).numpy(), want2, atol=1e-6)
    loaded = xray_match.load_model(f"models:/{NAME}@champion", tracking_uri=uri)  # resolves now: version 2
    np.testing.assert_allclose(loaded.encode_texts(texts).numpy(), want2, atol=1e-6)
    assert os.path.isdir(ckpt1)  # a local checkpoint path loads directly
    np.testing.assert_allclose(xray_match.load_model(ckpt1).encode_texts(texts).numpy(), want1, atol=1e-6)


# ------------------------------------------------------------------------------ the serve driver


def _index_for(tmp_path, name: str, model: dict) -> str:
    from xray_match.serve.config import IndexConfig
    from xray_match.serve.index_build import write_index

    x = np.eye(4, dtype=np.float32)
    images = {"key": ["a", "b", "c", "d"], "split": ["test"] * 4, "shard": [""] * 4, "offset": [0] * 4,
              "size": [0] * 4, "ext": ["png"] * 4}
    return write_index(str(tmp_path / name), x, images, x[:1], {"text": ["t"], "image": [0]}, {"model": model},
                       IndexConfig())


def test_preflight_pins_once_and_checks_the_index_against_that_version(registry, tmp_path):
    from xray_match.serve.app import preflight
    from xray_match.serve.index import check_built_for
    from xray_match.serve.index_store import IndexFormatError, read_meta
    from xray_match.serve.model import tag_index
    from xray_match.tracking.models import ModelRef

    uri, add = registry["uri"], registry["add"]
    add(_folder(tmp_path, "v1"))
    v1 = ModelRef.parse(f"models:/{NAME}@champion", uri).resolve()
    index = _index_for(tmp_path, "index-v1", v1.to_json())
    tag_index(v1, index)
    ref, found = preflight(f"models:/{NAME}@champion", None, uri)  # the index tagged on the version
    assert ref == v1 and found == index
    add(_folder(tmp_path, "v2"))  # champion -> 2, which has no index yet
    with pytest.raises(LookupError, match=rf"^models:/{NAME}/2 \(@champion\): no --index given and none tagged"):
        preflight(f"models:/{NAME}@champion", None, uri)
    with pytest.raises(IndexFormatError, match=f"^{index}: built for {NAME} version 1, not version 2$"):
        preflight(f"models:/{NAME}@champion", index, uri)
    ref, found = preflight(f"models:/{NAME}/1", index, uri)
    assert (ref.pinned_uri, ref.alias, found) == (v1.pinned_uri, None, index)
    # the one check, also used by the replicas' Searcher: other models' and checkpoints' indexes pass
    check_built_for(ModelRef(uri="models:/other/5", tracking_uri=uri, name="other", version="5"), read_meta(index), index)
    check_built_for(ModelRef(uri=str(tmp_path)), read_meta(index), index)


def test_checkpoint_url_pins_an_alias_to_its_versions_checkpoint(registry, tmp_path):
    """What a worker loads itself (``rdan.shortlist_model``): the alias read once, to the version's
    ``checkpoint`` tag; a path as it is; a version without the tag, or a runs:/ URI, refused."""
    from xray_match.tracking.models import ModelLookupError, checkpoint_url

    c, uri = registry["client"], registry["uri"]
    v1 = registry["add"](_folder(tmp_path, "a"))
    c.set_model_version_tag(NAME, v1, "checkpoint", "s3://bucket/runs/a/checkpoint_000004")
    registry["add"](_folder(tmp_path, "b"))  # champion moves to version 2, which has no tag
    with pytest.raises(ModelLookupError, match="no 'checkpoint' tag"):
        checkpoint_url(f"models:/{NAME}@champion", uri)
    assert checkpoint_url(f"models:/{NAME}/{v1}", uri) == "s3://bucket/runs/a/checkpoint_000004"
    c.set_registered_model_alias(NAME, "champion", v1)
    assert checkpoint_url(f"models:/{NAME}@champion", uri) == "s3://bucket/runs/a/checkpoint_000004"
    assert checkpoint_url(str(tmp_path / "a"), uri) == str(tmp_path / "a")
    with pytest.raises(ModelLookupError, match="name a registered model"):
        checkpoint_url("runs:/0123abcd/checkpoint", uri)
    with pytest.raises(ModelLookupError, match="no registered model 'nope'"):
        checkpoint_url("models:/nope@champion", uri)
