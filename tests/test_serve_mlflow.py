"""The registered model is one MLflow can serve: signature, input example, requirements that
resolve (the project bundled as code, its dependencies pinned), nothing pickled; and a real
`mlflow models serve --env-manager local` on loopback answers text and base64 images."""

from __future__ import annotations

import importlib.metadata as md
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from serve_helpers import free_port, http, post_json, shard_images, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def _model_dir(served) -> Path:
    import mlflow

    mlflow.set_tracking_uri(served["tracking_uri"])
    return Path(mlflow.artifacts.download_artifacts(f"models:/{served['name']}/1"))


def test_registered_pyfunc_has_signature_example_and_resolvable_requirements(served_model):
    local = _model_dir(served_model)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    inputs = yaml.safe_load(mlmodel["signature"]["inputs"])
    assert {c["name"]: (c["type"], c["required"]) for c in inputs} == {"text": ("string", False), "image": ("string", False)}
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    # the project travels with the model; the python model is code, not a pickle
    assert (local / "code" / "xray_match" / "serve" / "index.py").is_file()
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert not list(local.rglob("*.pkl")), "nothing may be unpickled when the model loads"
    # requirements: no 'xray-match' (no index serves it); every pin is the version installed here
    reqs = [r.strip() for r in (local / "requirements.txt").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert not [r for r in reqs if r.split("==")[0].split("[")[0] in ("xray-match", "xray_match")]
    assert {"torch", "transformers", "mlflow", "pillow"} <= {r.split("==")[0].split("[")[0].lower() for r in reqs}
    for r in reqs:
        name, _, version = r.partition("==")
        assert version, f"{r}: not pinned"
        assert md.version(name.split("[")[0]) == version, r


def test_mlflow_models_serve_embeds_text_and_images(served_model, tmp_path):
    import xray_match
    from PIL import Image

    from xray_match.tracking.pyfunc import encode_image

    port, log = free_port(), open(tmp_path / "mlflow-serve.log", "w+")
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": served_model["tracking_uri"], "MLFLOW_DISABLE_TELEMETRY": "true",
                        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    mlflow_cli = str(Path(bin_dir) / "mlflow")
    proc = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{served_model['name']}/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or http("GET", f"{base}/ping", timeout=5)[0] == 200, 600,
                   interval=2, what="mlflow models serve")
        log.seek(0)
        assert proc.poll() is None, f"mlflow models serve exited:\n{log.read()[-3000:]}"
        png = next(iter(shard_images(served_model["data"], "test").values()))
        image = Image.open(io.BytesIO(png)).convert("RGB")
        body = {"dataframe_split": {"columns": ["text", "image"],
                                    "data": [["a red seven left of a blue two", None], [None, encode_image(image)]]}}
        status, out = post_json(f"{base}/invocations", body, timeout=120)
        assert status == 200, out
        got = np.asarray(out["predictions"], dtype=np.float32)
        model = xray_match.load_model(f"models:/{served_model['name']}/1", tracking_uri=served_model["tracking_uri"])
        want = np.concatenate([model.encode_texts(["a red seven left of a blue two"]).numpy(),
                               model.encode_images([image]).numpy()])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # a row with neither kind is a clear error, not a crash
        status, out = post_json(f"{base}/invocations", {"dataframe_split": {"columns": ["text"], "data": [[None]]}})
        error_text = " ".join(str(v) for v in out.values())  # MLflow puts the model's error in message or stack_trace
        assert status == 400 and "input row 0: neither 'text' nor 'image' is given" in error_text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
