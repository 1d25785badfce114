"""Models-from-code entry point of the registered pyfunc (MLflow runs this file when loading the
model, with the bundled ``code/`` on ``sys.path``); see :mod:`xray_match.tracking.pyfunc`."""

import mlflow

from xray_match.tracking.pyfunc import EmbeddingPyfunc

mlflow.models.set_model(EmbeddingPyfunc())
