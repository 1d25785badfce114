"""Issue 16 (2): a job fails before Ray starts, in one line and exit status 2, on what a user typed
wrong: a tracking server that does not answer, a data folder that is not there or not a shard
folder, a bad override. Subprocess timeouts only guard against a hang; no verdict depends on speed."""

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from helpers import one_error_line as _one_error_line
from helpers import run_job as _job
from xray_match.preflight import PreflightError, check_data, check_tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unreachable_tracking_server_fails_before_ray(tiny_scenes, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _job("--tracking-uri", f"http://127.0.0.1:{port}", "--data", tiny_scenes, home=str(tmp_path))
    _one_error_line(out, "tracking.tracking_uri", f"http://127.0.0.1:{port}")
    assert not (tmp_path / "runs").exists()  # Ray never started a run


def test_missing_data_folder_and_folder_without_manifest(tmp_path):
    _one_error_line(_job("--data", "/no/such/folder", home=str(tmp_path)), "data.path", "/no/such/folder", "no such folder")
    stray = tmp_path / "not-shards"
    stray.mkdir()
    (stray / "a.tar").write_bytes(b"x")
    _one_error_line(_job("--data", str(stray), home=str(tmp_path)), "data.path", str(stray), "manifest.json")


def test_bad_override_is_one_config_line(tmp_path):
    _one_error_line(_job("optim.lr=-1", home=str(tmp_path)), "error: config: ", "optim.lr")


@pytest.mark.slow
def test_resume_without_a_study_fails_before_ray(tiny_scenes, tmp_path):
    out = _job("--resume", "--data", tiny_scenes, home=str(tmp_path), job="tune_moco.py")
    _one_error_line(out, "--resume: no interrupted study 'tune-moco-*'", str(tmp_path / "runs"))
    out = _job("--resume", "--name", "nope", "--data", tiny_scenes, home=str(tmp_path), job="tune_moco.py")
    _one_error_line(out, "'nope'")
    assert not (tmp_path / "runs").exists()  # Ray never started


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


def test_tracking_check_passes_a_live_server_and_times_out_on_a_silent_one(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with pytest.raises(PreflightError, match="cannot reach .* within 1 s"):
            check_tracking(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)
    finally:
        silent.close()
    check_tracking(f"sqlite:///{tmp_path}/new/mlflow.db")  # creatable: fine


def test_check_data_accepts_a_finished_shard_folder(tiny_scenes, tmp_path):
    check_data(tiny_scenes)
    with pytest.raises(PreflightError, match="no such folder"):
        check_data(str(tmp_path / "nope"))
