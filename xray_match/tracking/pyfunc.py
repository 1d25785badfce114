"""The registered model as an MLflow pyfunc that ``mlflow models serve`` can run.

* **Input**: a DataFrame with a ``text`` column (captions) and/or an ``image`` column (base64 PNG or
  JPEG); each row gives one of them. **Output**: one embedding per row, (N, D) float32, texts and
  images in the same space (embedding models: moco, dspe).
* **Signature and input example** are logged with the model.
* **Requirements resolve**: the project itself travels with the model as code (``code/xray_match``,
  MLflow puts it on ``sys.path`` when loading), and the requirements are the project's own
  dependencies pinned to the versions installed when the model was logged — the versions of the
  lock file, which resolve together — instead of ``xray-match``, which no index serves.
* **Nothing pickled**: the python model is logged as code (MLflow's models-from-code,
  :mod:`xray_match.tracking.pyfunc_model`), not cloudpickled.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata as md
import io
import os
import re
from typing import Any

import mlflow.pyfunc
import numpy as np

EXAMPLE_TEXT = "a red seven left of a blue two"
#: distributions whose version MLflow's serving itself needs beside the project's
_SERVING_EXTRAS = ("pandas",)


class EmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame{"text", "image"})`` -> (N, D) float32 embeddings."""

    def load_context(self, context) -> None:
        from xray_match.train.checkpoint import load_inference

        self.inference = load_inference(context.artifacts["checkpoint"])
        if not (hasattr(self.inference, "encode_texts") and hasattr(self.inference, "encode_images")):
            raise TypeError(f"{type(self.inference).__name__}: not an embedding model (no encode_texts/encode_images)")

    def predict(self, context, model_input, params=None) -> np.ndarray:
        texts, images = _rows(model_input)
        n = len(texts)
        out: np.ndarray | None = None
        for rows, encode in ((
            [i for i in range(n) if texts[i] is not None], lambda idx: self.inference.encode_texts([texts[i] for i in idx])),
            ([i for i in range(n) if texts[i] is None], lambda idx: self.inference.encode_images([images[i] for i in idx])),
        ):
            if not rows:
                continue
            e = encode(rows)
            e = e.numpy() if hasattr(e, "numpy") else np.asarray(e)
            if e.ndim != 2:
                raise TypeError(f"{type(self.inference).__name__} gives {tuple(e.shape)} per batch, not one vector "
                                "per input: a cross-attention model has no embedding to serve")
            if out is None:
                out = np.zeros((n, e.shape[1]), np.float32)
            out[rows] = e
        return out if out is not None else np.zeros((0, 0), np.float32)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def _rows(model_input: Any) -> tuple[list[str | None], list[Any]]:
    """DataFrame / dict / list of str -> per row: the text (or None) and the decoded image (or None)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(model_input, (list, tuple)) and all(isinstance(x, str) for x in model_input):
        return list(model_input), [None] * len(model_input)
    cols = model_input if isinstance(model_input, dict) else {c: list(model_input[c]) for c in model_input.columns}
    if "text" not in cols and "image" not in cols:
        raise ValueError("input: expected a column 'text' (captions) or 'image' (base64 PNG/JPEG)")
    n = len(next(iter(cols.values())))
    texts = [None if _is_missing(v) else str(v) for v in cols.get("text", [None] * n)]
    images: list[Any] = [None] * n
    for i, v in enumerate(cols.get("image", [None] * n)):
        if texts[i] is not None:
            continue
        if _is_missing(v):
            raise ValueError(f"input row {i}: neither 'text' nor 'image' is given")
        try:
            data = base64.b64decode(v, validate=True)
            im = Image.open(io.BytesIO(data))
            im.load()
        except (binascii.Error, ValueError, TypeError, UnidentifiedImageError, OSError) as e:
            raise ValueError(f"input row {i}: 'image' is not a base64 PNG/JPEG ({e})") from None
        images[i] = im.convert("RGB")
    return texts, images


def encode_image(image) -> str:
    """A PIL image -> the base64 PNG string the ``image`` column takes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def input_example():
    """Two rows: a caption, and a 64 x 64 image (base64 PNG)."""
    import pandas as pd
    from PIL import Image

    return pd.DataFrame({"text": [EXAMPLE_TEXT, None], "image": [None, encode_image(Image.new("RGB", (64, 64)))]})


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0]


def pinned_requirements(dist: str = "xray-match") -> list[str]:
    """The project's runtime dependencies (no extras) pinned to the installed versions."""
    out = []
    for req in md.requires(dist) or []:
        if "extra ==" in req:
            continue
        name = _name(req)
        extras = re.match(r"[^\[]*(\[[^\]]*\])", req)
        out.append(f"{name}{extras.group(1) if extras else ''}=={md.version(name)}")
    for name in _SERVING_EXTRAS:
        if not any(_name(r).lower() == name for r in out):
            out.append(f"{name}=={md.version(name)}")
    return out


def log_pyfunc(checkpoint_dir: str, registered_model_name: str | None = None, name: str = "model"):
    """Log ``checkpoint_dir`` as the run's pyfunc model (code, signature, example, pinned requirements)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # xray_match/, bundled as code
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=os.path.join(os.path.dirname(__file__), "pyfunc_model.py"),
        artifacts={"checkpoint": checkpoint_dir},
        code_paths=[package],
        pip_requirements=pinned_requirements(),
        signature=signature(),
        input_example=input_example(),
        registered_model_name=registered_model_name,
    )
