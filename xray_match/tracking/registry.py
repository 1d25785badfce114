"""Model registry: register checkpoints as MLflow model versions, and load them back by URI.

A registered model is an MLflow pyfunc whose artifact is our training checkpoint (model weights,
merged config, data info such as a vocabulary). ``load_model("models:/xray-match-moco@champion")``
rebuilds the recipe's model from it and returns the recipe's inference object (preprocessing
included), e.g. ``encode_images`` / ``encode_texts`` / ``rank_images`` for embedding models.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import mlflow.pyfunc

CKPT_FILE = "checkpoint.pt"


class ModelLookupError(LookupError):
    """A registered model, version or alias does not exist (the message says which)."""


class XrayMatchModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of versions registered before :mod:`xray_match.tracking.pyfunc` (kept so that they
    still load): ``predict(DataFrame{"text": [...]})`` returns text embeddings."""

    def load_context(self, context):
        self.inference = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        texts = list(model_input["text"]) if hasattr(model_input, "__getitem__") else list(model_input)
        return self.inference.encode_texts(texts).numpy()


def log_and_register(client, uri: str, run_id: str, ckpt_dir: str, name: str, tags: dict[str, str],
                     alias: str = "champion") -> int:
    import mlflow

    from xray_match.tracking.pyfunc import log_pyfunc

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc(ckpt_dir, registered_model_name=name)
    version = info.registered_model_version
    if version is None:  # older MLflow: look the version up by run
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        version = max(int(v.version) for v in versions)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_registered_model_alias(name, alias, str(version))
    return int(version)


def _find_checkpoint(path: str) -> str:
    if os.path.isfile(path):
        return path
    hits = sorted(glob.glob(os.path.join(path, "**", CKPT_FILE), recursive=True))
    if not hits:
        raise ModelLookupError(f"{path}: no {CKPT_FILE} inside")
    return hits[0]


def load_checkpoint(path: str, device: str = "cpu") -> Any:
    """A checkpoint folder or file -> the recipe's inference object."""
    import torch

    from xray_match.config import Config
    from xray_match.registry import RECIPES
    from xray_match.train.recipe import DataInfo

    state = torch.load(_find_checkpoint(path), map_location=device, weights_only=False)
    cfg = Config.from_dict(state["config"])
    recipe = RECIPES.get(state["recipe"])(cfg, DataInfo(**state["info"]))
    model = recipe.build_model()
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return recipe.inference(model)


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> Any:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a local checkpoint path."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if os.path.exists(uri):
        return load_checkpoint(uri, device)
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
    else:
        from xray_match.config import Config
        from xray_match.tracking.runs import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(Config()))
    client = MlflowClient()
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))?", uri)
    if uri.startswith("models:/") and not m:
        raise ModelLookupError(f"{uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    if m:
        name, alias, version = m.groups()
        try:
            client.get_registered_model(name)
        except MlflowException:
            known = [r.name for r in client.search_registered_models(max_results=50)]
            raise ModelLookupError(f"no registered model {name!r} at {mlflow.get_tracking_uri()} "
                                   f"(registered: {', '.join(known) or 'none'})") from None
        try:
            if alias:
                client.get_model_version_by_alias(name, alias)
            elif version:
                client.get_model_version(name, version)
        except MlflowException:
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise ModelLookupError(f"registered model {name!r} has no {what} at {mlflow.get_tracking_uri()}") from None
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    return load_checkpoint(local, device)
