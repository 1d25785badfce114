"""Model registry writes: register checkpoints as MLflow model versions and point an alias at them.

A registered model is an MLflow pyfunc whose artifact is our training checkpoint (model weights,
merged config, data info such as a vocabulary). Reading one back (parse, resolve, pin, load) is
:mod:`xray_match.tracking.models`: ``ModelRef.parse("models:/xray-match-moco@champion").resolve().load()``
rebuilds the recipe's model and returns the recipe's inference object (preprocessing included).
"""

from __future__ import annotations

import mlflow.pyfunc

from xray_match.tracking.models import load_inference
from xray_match.tracking.store import CHAMPION, client


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
