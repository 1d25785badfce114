"""The cluster path, for real, on one machine (``xray-match dev-cluster``): shards, checkpoints, Tune
state and MLflow artifacts in a SeaweedFS bucket; runs and models on an MLflow server backed by
PostgreSQL with basic-auth; a Ray head and two worker nodes with token authentication; jobs
submitted with ``ray job submit`` from a fresh home folder, as a user would.

One cluster serves the module (starting it takes a minute or two); every test talks to it only
through subprocesses and HTTP, never ``ray.init`` in this process (the session's local test cluster
lives here). The cluster is always stopped, whatever fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
#: a small tune / train budget: tiny models, 3 steps an epoch (overrides after it win)
SMALL = ["--cpus-per-worker", "1", "data.steps_per_epoch=3", "tune.trial_steps_per_epoch=0", "data.batch_size=16", "data.eval_batch_size=32",
         "train.bn_recompute_batches=2", "moco.teacher_hidden=[128]"]
#: every subprocess's bound: a step that hangs fails the test instead of the suite
STEP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from xray_match import devcluster

    folder = tmp_path_factory.mktemp("dev-cluster")
    try:
        state = devcluster.up(str(folder), workers=2, cpus_per_node=1, owner_pid=os.getpid())
        home = tmp_path_factory.mktemp("fresh-home")  # no ~/.ray/auth_token, no ~/.cache: as a new user
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env |= state.exports() | {"HOME": str(home), "XRAY_MATCH_HOME": str(home / "xray"),
                                  "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
        bucket = state.bucket
        data = f"s3://{bucket}/shards/scenes"
        run(env, [_cli(), "data", "digit-scenes", "--out", data, "--train", "160", "--val", "40", "--test", "40",
                  "--maxcount", "20", "--workers", "1", "--no-progress"])
        yield {"state": state, "env": env, "bucket": bucket, "data": data, "dir": folder}
    finally:
        devcluster.down(str(folder), purge=True)


def _cli() -> str:
    return str(Path(sys.executable).with_name("xray-match"))


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def run(env: dict[str, str], cmd: list[str], *, ok: bool = True, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def submit(cluster, args: list[str], **kw) -> str:
    """Submit, wait for the job to succeed, return its log."""
    return _finish(cluster, _start(cluster, args, **kw))


def job_info(cluster, sid: str) -> dict:
    st = cluster["state"]
    req = urllib.request.Request(f"http://127.0.0.1:{st.ports['dashboard']}/api/jobs/{sid}",
                                 headers={"Authorization": f"Bearer {st.secrets['ray_token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def state_api(cluster, path: str) -> list[dict]:
    st = cluster["state"]
    req = urllib.request.Request(f"http://127.0.0.1:{st.ports['dashboard']}/api/v0/{path}",
                                 headers={"Authorization": f"Bearer {st.secrets['ray_token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"]["result"]["result"]


def s3(cluster):
    import s3fs

    st = cluster["state"]
    # no listing cache: the tests poll folders that jobs are writing
    return s3fs.S3FileSystem(key=st.secrets["s3_key"], secret=st.secrets["s3_secret"],
                             endpoint_url=f"http://127.0.0.1:{st.ports['s3']}", use_listings_cache=False,
                             skip_instance_cache=True)


def mlflow_client(cluster, user: str = "admin"):
    """An MlflowClient of the cluster's server as ``user`` (admin, or the read-only ``reader``)."""
    from mlflow import MlflowClient

    env = cluster["env"]
    prefix = "MLFLOW_TRACKING" if user == "admin" else "XRAY_MLFLOW_READER"
    os.environ["MLFLOW_TRACKING_USERNAME"] = env[f"{prefix}_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env[f"{prefix}_PASSWORD"]
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.fixture
def mlflow_env(monkeypatch):
    """The MLflow credentials this process sets for a test are taken back after it."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    yield


# ----------------------------------------------------------------------------- the user's path


def test_users_path_end_to_end(cluster, mlflow_env):
    """Digit scenes in the bucket -> ``ray job submit ... tune_moco.py`` with data and storage in the
    bucket (one trial; its two workers on two different nodes) -> the champion on the MLflow
    server -> a fresh process on a worker node looks it up and ranks with it."""
    env, bucket = cluster["env"], cluster["bucket"]
    log = submit(cluster, ["jobs/tune_moco.py", "--data", cluster["data"], "--storage-path", f"s3://{bucket}/ray",
                       "--num-samples", "1", "--name", "study-e2e", "tune.trial_epochs=1", "train.epochs=1",
                       "tune.trial_workers=2", *SMALL])  # a cluster's trials: TorchTrainers over the nodes
    assert "=== xray_match tune ===" in log, log[-3000:]
    assert "fixed for every trial (given on the command line): " in log  # SMALL's data.batch_size
    assert "GetTimeoutError" not in log  # Train's coordinator is up before the first trainer asks it
    assert f"results: s3://{bucket}/ray/study-e2e" in log  # printed paths keep their scheme
    assert f"best_checkpoint: s3://{bucket}/ray/study-e2e-" in log  # each trial's run beside the study
    # Tune's state and the trials' checkpoints are in the bucket
    fs = s3(cluster)
    assert fs.glob(f"{bucket}/ray/study-e2e/experiment_state-*.json") and fs.exists(f"{bucket}/ray/study-e2e/tuner.pkl")
    assert fs.glob(f"{bucket}/ray/study-e2e-*/checkpoint_*/checkpoint.pt")

    # each trial's worker group spread over two nodes
    workers = [a for a in state_api(cluster, "actors?limit=1000&detail=true") if a.get("class_name") == "RayTrainWorker"]
    by_group: dict[str, set[str]] = {}
    for a in workers:
        by_group.setdefault(a.get("placement_group_id") or "?", set()).add(a["node_id"])
    assert len(by_group) >= 1 and all(len(nodes) == 2 for nodes in by_group.values()), by_group

    # the champion is registered on the server; the read-only user can look it up
    reader = mlflow_client(cluster, "reader")
    version = reader.get_model_version_by_alias("xray-match-moco", "champion")
    assert version.tags["study"] == "study-e2e" and version.tags["data_path"] == cluster["data"]
    assert reader.list_artifacts(version.run_id)  # artifacts went through the server into the bucket
    assert fs.glob(f"{bucket}/mlartifacts/**/checkpoint.pt")

    # a fresh process on worker node w2 looks the model up by alias and ranks with it (it writes what
    # it ranked to a file: a job log is read through the node's agent, and only the status is needed)
    out = cluster["dir"] / "ranked.json"
    probe = ("import json, sys, xray_match; from PIL import Image\n"
             "m = xray_match.load_model('models:/xray-match-moco@champion')\n"
             "ranked = m.rank_images('a red seven', [Image.new('RGB', (64, 64), c) for c in ('red', 'blue')])\n"
             "json.dump([[int(i), float(s)] for i, s in ranked], open(sys.argv[1], 'w'))\n")
    sid = _start(cluster, ["-c", probe, str(out)], extra=["--entrypoint-resources", json.dumps({"node_w2": 1})])
    _finish(cluster, sid)
    assert sorted(i for i, _ in json.loads(out.read_text())) == [0, 1]
    nodes = {n["node_id"]: n for n in state_api(cluster, "nodes?limit=100&detail=true")}
    driver_node = nodes[job_info(cluster, sid)["driver_node_id"]]
    assert driver_node["resources_total"].get("node_w2") and not driver_node["is_head_node"]

    # the champion's index into the bucket, and the search service answering from it
    index = f"s3://{bucket}/indexes/moco"
    out = run(env, [_cli(), "index", "--model", "models:/xray-match-moco@champion", "--data", cluster["data"],
                    "--out", index, "--no-progress"]).stdout
    assert f"index: {index}" in out, out
    from xray_match.devcluster import free_port

    port = free_port()
    log = open(cluster["dir"] / "serve.log", "w")
    serve = subprocess.Popen([_cli(), "serve", "--model", "models:/xray-match-moco@champion", "--index", index,
                              "--port", str(port), "--proxy-location", "HeadOnly", "--poll-s", "0", "--max-replicas", "1"],
                             env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answer():
            assert serve.poll() is None, (cluster["dir"] / "serve.log").read_text()[-3000:]
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/search/text", method="POST",
                                         data=json.dumps({"text": "a red seven", "k": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.load(r)
            except (urllib.error.URLError, OSError):
                return None

        hits = _wait_for("an answer from the search service", answer, every_s=2.0)["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["id"] and h["split"] for h in hits), hits
    finally:
        os.kill(serve.pid, 2)  # Ctrl-C: the CLI shuts Serve down
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, 9)
            serve.wait()
        log.close()
        # Serve's apps outlive the process that started them: make sure none holds a CPU the
        # next tests' workers need
        st = cluster["state"]
        req = urllib.request.Request(f"http://127.0.0.1:{st.ports['dashboard']}/api/serve/applications/",
                                     method="DELETE", headers={"Authorization": f"Bearer {st.secrets['ray_token']}"})
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(req, timeout=60).close()
        _wait_for("Serve's replicas gone", lambda: not [
            a for a in state_api(cluster, "actors?limit=1000&detail=true")
            if a["state"] != "DEAD" and a.get("class_name", "").startswith("ServeReplica")], every_s=2.0)


# ----------------------------------------------------------------------------- faults


def test_anonymous_and_read_only_users_cannot_move_the_champion(cluster, mlflow_env):
    from mlflow.exceptions import MlflowException

    uri = cluster["env"]["MLFLOW_TRACKING_URI"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert e.value.code == 401
    admin = mlflow_client(cluster)
    name = "auth-probe"
    admin.create_registered_model(name)
    run_id = admin.create_run(admin.get_experiment_by_name("Default").experiment_id).info.run_id
    v1 = admin.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    admin.set_registered_model_alias(name, "champion", v1.version)
    reader = mlflow_client(cluster, "reader")
    assert reader.get_model_version_by_alias(name, "champion").version == v1.version  # it can look up
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        reader.set_registered_model_alias(name, "champion", v1.version)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        reader.delete_registered_model_alias(name, "champion")


def test_ray_refuses_a_submission_without_the_token(cluster):
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    proc = run(env, [_ray(), "job", "list"], ok=False, timeout=120)
    assert proc.returncode != 0 and ("uthenticat" in proc.stdout + proc.stderr or "401" in proc.stdout + proc.stderr), \
        (proc.stdout + proc.stderr)[-2000:]


def _wait_for(what: str, check, timeout_s: float = STEP_TIMEOUT_S, every_s: float = 1.0, job: tuple | None = None):
    """Poll ``check()`` until it returns something truthy; fail (naming ``what``) past the bound,
    or as soon as the job ``(cluster, submission_id)`` has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if job is not None:
            info = job_info(*job)
            assert info["status"] in ("PENDING", "RUNNING"), f"job ended before {what}: {info.get('message')}"
        time.sleep(every_s)
    raise AssertionError(f"no {what} after {timeout_s:g} s")


def _start(cluster, args: list[str], runtime_env: dict | None = None, extra: list[str] = ()) -> str:
    """``ray job submit --working-dir . -- python ARGS`` as a user types it (the token and address from
    the exported environment), without waiting; returns the submission id. (Tests then poll the job's
    status: the CLI's log stream can end before a job whose driver runs on a worker node does.)"""
    sid = f"xm-test-{time.monotonic_ns()}"
    cmd = [_ray(), "job", "submit", "--no-wait", "--submission-id", sid, "--working-dir", str(REPO), *extra]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    run(cluster["env"], cmd + ["--", "python", *args])
    return sid


def _finish(cluster, sid: str, expect: str = "SUCCEEDED") -> str:
    info = _wait_for(f"end of job {sid}", lambda: (i := job_info(cluster, sid))["status"] not in ("PENDING", "RUNNING") and i)
    log = run(cluster["env"], [_ray(), "job", "logs", sid], ok=False).stdout
    assert info["status"] == expect, f"job {sid}: {info['status']} ({info.get('message')}):\n{log[-4000:]}"
    return log


def _node_service(cluster, node_id: str) -> str:
    """The dev cluster's service name (``ray-w1``) of a Ray node id."""
    for n in state_api(cluster, "nodes?limit=100&detail=true"):
        if n["node_id"] == node_id:
            names = [k.removeprefix("node_") for k in n["resources_total"] if k.startswith("node_") and not k.startswith("node:")]
            return f"ray-{names[0]}"
    raise AssertionError(f"node {node_id} is not in the cluster")


def _latest_checkpoint(cluster, run_name: str) -> dict:
    from xray_match.train.checkpoint import load_checkpoint

    fs = s3(cluster)
    found = sorted(fs.glob(f"{cluster['bucket']}/ray/{run_name}/checkpoint_*/checkpoint.pt"))
    assert found, f"no checkpoint of {run_name} in the bucket"
    with fs.open(found[-1], "rb") as fh, open(cluster["dir"] / f"{run_name}.pt", "wb") as out:
        out.write(fh.read())
    return load_checkpoint(str(cluster["dir"] / f"{run_name}.pt"))


def test_a_worker_node_killed_mid_epoch_resumes_from_the_bucket(cluster, tmp_path):
    """Both ranks wait at step 7 (inside epoch 2; a step checkpoint every 2 steps, written to the
    bucket); the test SIGKILLs the whole Ray node (raylet and workers, by pid) of a rank that is not on
    the head. Ray Train restarts the group on the nodes left, from the step-6 checkpoint in the bucket,
    and the run ends with the same step count, the same samples on every rank in the same order, and
    the same weights as an undisturbed run."""
    import torch

    from helpers import sample_log as _sample_log

    from xray_match import devcluster
    from xray_match.driver.worker import FAULT_ENV, SAMPLE_LOG_ENV

    state, bucket = cluster["state"], cluster["bucket"]
    runs = {}
    for name in ("undisturbed", "killed"):
        samples, hold = tmp_path / f"samples-{name}", tmp_path / f"hold-{name}"
        samples.mkdir()
        hold.mkdir()
        env_vars = {SAMPLE_LOG_ENV: str(samples)} | ({FAULT_ENV: f"*:step=7:hold:{hold}"} if name == "killed" else {})
        sid = _start(cluster, ["jobs/train_moco.py", "--data", cluster["data"], "--storage-path", f"s3://{bucket}/ray",
                               "--name", f"node-loss-{name}", "--epochs", "2", "--no-test-eval", *SMALL,
                               "data.steps_per_epoch=5", "train.checkpoint_every_steps=2", "ray.max_failures=1",
                               "tracking.enabled=false", "data.num_workers=2", "data.shuffle_buffer=16"],
                        {"env_vars": env_vars})
        if name == "killed":
            holds = _wait_for("both ranks at step 7", lambda: len(list(hold.glob("rank*.json"))) == 2 and
                              [json.loads(p.read_text()) for p in sorted(hold.glob("rank*.json"))], job=(cluster, sid))
            victim = next(_node_service(cluster, h["node_id"]) for h in holds
                          if _node_service(cluster, h["node_id"]) != "ray-head")
            pids = devcluster.node_pids(state, victim)
            assert any(h["pid"] in pids for h in holds)  # the group holds the rank's worker process
            devcluster.kill_service(state, victim)
        _finish(cluster, sid)
        runs[name] = (_latest_checkpoint(cluster, f"node-loss-{name}"), _sample_log(samples))
    devcluster.restart_node(state, victim.removeprefix("ray-"))  # the cluster whole again for the next tests
    _wait_for("the node back", lambda: len(devcluster.alive_nodes(state)) == 3)

    (state0, keys0), (state1, keys1) = runs["undisturbed"], runs["killed"]
    assert state1["loop"]["resumes"] == 1 and state0["loop"]["resumes"] == 0
    assert state1["loop"]["step"] == state0["loop"]["step"] == 10
    assert sorted(keys0) == [0, 1] and all(sorted(k) == list(range(1, 11)) for k in keys0.values())
    assert keys1 == keys0  # every rank, every step: the same samples in the same order
    for k, v in state0["model"].items():
        assert torch.allclose(v.float(), state1["model"][k].float(), atol=1e-5), k


def test_mlflow_server_restarted_mid_run_loses_no_metrics(cluster, tmp_path, mlflow_env):
    """Rank 0 waits at step 2; the test stops the MLflow server and lets training go on. Epoch reports
    made while the server is down are buffered by the rank-0 logger; once the server is back, they
    reach the run with their epochs: the run ends FINISHED with every epoch's metrics."""
    from xray_match import devcluster
    from xray_match.driver.worker import FAULT_ENV

    state, bucket = cluster["state"], cluster["bucket"]
    hold = tmp_path / "hold"
    hold.mkdir()
    sid = _start(cluster, ["jobs/train_moco.py", "--data", cluster["data"], "--storage-path", f"s3://{bucket}/ray",
                           "--name", "mlflow-outage", "--epochs", "3", "--no-test-eval", "tracking.register=false", *SMALL],
                 {"env_vars": {FAULT_ENV: f"0:step=2:hold:{hold}"}})
    _wait_for("rank 0 at step 2", lambda: (hold / "rank0.json").exists(), job=(cluster, sid))
    devcluster.stop_service(state, "mlflow")
    (hold / "release").touch()
    fs = s3(cluster)
    # two epoch reports made while the server is down (each epoch's checkpoint follows its metrics)
    _wait_for("two epochs trained during the outage",
              lambda: len(fs.glob(f"{bucket}/ray/mlflow-outage/checkpoint_*/checkpoint.pt")) >= 2, job=(cluster, sid))
    devcluster.restart_service(state, "mlflow")
    _finish(cluster, sid)
    client = mlflow_client(cluster)
    (run,) = client.search_runs([client.get_experiment_by_name("xray-match").experiment_id],
                                "attributes.run_name = 'mlflow-outage'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/rsum")] == [1, 2, 3]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_killed_tune_driver_resumes_from_the_bucket(cluster, mlflow_env):
    """The tune job's driver is SIGKILLed (by pid) once the study's saved state in the bucket holds a
    finished trial; ``--resume`` in a new job continues the study from the bucket: every trial ends,
    each in one MLflow child run, and no finished trial runs again."""
    bucket = cluster["bucket"]
    fs = s3(cluster)
    study = "study-resume"
    args = ["jobs/tune_moco.py", "--data", cluster["data"], "--storage-path", f"s3://{bucket}/ray", "--name", study,
            "--num-samples", "2", "--no-test-eval", "tune.time_budget_s=3600", "tune.trial_epochs=1", "train.epochs=1", "tracking.register=false",
            "tune.max_concurrent=1", "tune.trial_workers=2", *SMALL]  # trials through a TorchTrainer

    def finished_trials() -> set[str]:
        done: set[str] = set()
        for path in fs.glob(f"{bucket}/ray/{study}/experiment_state-*.json"):
            try:
                trials = [json.loads(t[0]) for t in json.loads(fs.cat(path))["trial_data"]]
            except (OSError, ValueError, KeyError):  # being written
                continue
            done |= {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}
        return done

    sid = _start(cluster, args)
    _wait_for("a finished trial in the bucket", finished_trials, every_s=2.0, job=(cluster, sid))
    pid = int(job_info(cluster, sid)["driver_info"]["pid"])
    os.kill(pid, 9)
    _wait_for("the killed job to end", lambda: job_info(cluster, sid)["status"] not in ("PENDING", "RUNNING"))
    done_before = finished_trials()
    assert len(done_before) == 1

    log = _finish(cluster, _start(cluster, args + ["--resume"]))
    assert "trials: 2" in log
    client = mlflow_client(cluster)
    exp = client.get_experiment_by_name("xray-match")
    parents = client.search_runs([exp.experiment_id], f"tags.study = '{study}' and tags.space = 'moco'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    attempts = {c.data.tags["ray_trial_id"]: int(c.data.tags["attempts"]) for c in children}
    assert all(attempts[t] == 1 for t in done_before), attempts
