"""Model registry: register checkpoints as MLflow model versions, and load them back by URI.

A registered model is an MLflow pyfunc whose artifact is our training checkpoint (model weights,
merged config, data info such as a vocabulary). ``load_model("models:/xray-match-moco@champion")``
rebuilds the recipe's model from it and returns the recipe's inference object (preprocessing
included), e.g. ``encode_images`` / ``encode_texts`` / ``rank_images`` for embedding models.
"""

from __future__ import annotations

import os
import re
from typing import Any

import mlflow.pyfunc

from xray_match.tracking.store import CHAMPION, client, resolve_tracking_uri


class ModelLookupError(LookupError):
    """A registered model, version or alias does not exist (the message says which)."""


class XrayMatchModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of versions registered before :mod:`xray_match.tracking.pyfunc` (kept so that they
    still load): ``predict(DataFrame{"text": [...]})`` returns text embeddings."""

    def load_context(self, context):
        self.inference = load_inference(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        texts = list(model_input["text"]) if hasattr(model_input, "__getitem__") else list(model_input)
        return self.inference.encode_texts(texts).numpy()


def log_and_register(uri: str, run_id: str, ckpt_dir: str, name: str, tags: dict[str, str],
                     alias: str = CHAMPION) -> int:
    import mlflow

    from xray_match.tracking.pyfunc import log_pyfunc

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc(ckpt_dir, registered_model_name=name)
    c = client(uri)
    version = info.registered_model_version
    if version is None:  # older MLflow: look the version up by run
        versions = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        version = max(int(v.version) for v in versions)
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v))
    c.set_registered_model_alias(name, alias, str(version))
    return int(version)


def load_inference(path: str, device: str = "cpu") -> Any:
    """A checkpoint folder or file -> the recipe's inference object."""
    from xray_match.train import checkpoint

    try:
        return checkpoint.load_inference(path, device)
    except checkpoint.CheckpointError as e:
        raise ModelLookupError(str(e)) from None


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> Any:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a local checkpoint path."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if os.path.exists(uri):
        return load_inference(uri, device)
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
    else:
        from xray_match.config import Config

        mlflow.set_tracking_uri(resolve_tracking_uri(Config()))
    c = client(mlflow.get_tracking_uri())
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))?", uri)
    if uri.startswith("models:/") and not m:
        raise ModelLookupError(f"{uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    if m:
        name, alias, version = m.groups()
        try:
            c.get_registered_model(name)
        except MlflowException:
            known = [r.name for r in c.search_registered_models(max_results=50)]
            raise ModelLookupError(f"no registered model {name!r} at {mlflow.get_tracking_uri()} "
                                   f"(registered: {', '.join(known) or 'none'})") from None
        try:
            if alias:
                c.get_model_version_by_alias(name, alias)
            elif version:
                c.get_model_version(name, version)
        except MlflowException:
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise ModelLookupError(f"registered model {name!r} has no {what} at {mlflow.get_tracking_uri()}") from None
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    return load_inference(local, device)


def tag_model_version(uri: str, name: str, version: str, key: str, value: str) -> None:
    """One tag on a registered model version (e.g. where the search index built for it is)."""
    client(uri).set_model_version_tag(name, str(version), key, str(value))


def pin_version(uri: str, name: str, alias: str | None, version: str | None) -> str:
    """The version ``alias`` points at (or ``version``, checked to exist) in registered model ``name``."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        if alias:
            return str(c.get_model_version_by_alias(name, alias).version)
        return str(c.get_model_version(name, version).version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelLookupError(f"models:/{name}: registered model {name!r} has no {what} at {uri}") from None
