"""Helpers shared by test modules: running a job as a user would, and reading the workers' sample log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


def run_job(*argv: str, home: str, job: str = "train_moco.py") -> subprocess.CompletedProcess:
    """``python jobs/<job> ARGV`` in a fresh ``XRAY_MATCH_HOME``, without an MLflow server in the environment."""
    env = dict(os.environ, XRAY_MATCH_HOME=home, MLFLOW_TRACKING_URI="")
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", job), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    """The job failed with exit status 2 and exactly one ``error: `` line holding every needle, no traceback."""
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def sample_log(folder) -> dict[int, dict[int, list[str]]]:
    """rank -> step -> shard keys from the workers' audit trail (a step trained twice: the last time)."""
    out: dict[int, dict[int, list[str]]] = {}
    for path in sorted(Path(folder).glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["rank"], {})[row["step"]] = row["keys"]
    return out
