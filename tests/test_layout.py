"""Where things live (docs/layout.md), checked on the source: the layers of the package and the
imports between them, the one home of checkpoints, of the run storage and of MLflow clients, recipe
sizes, and that loading a config stays light. Static checks read every module's imports (also those
inside functions) with ``ast``."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "xray_match"
#: the package's layers, bottom to top: the top-level modules and folders of each. A module imports
#: from its own layer and the layers below only; "__init__" is the package's own ``__init__.py``
#: (``xray_match.load_model``, the public entry to the model registry).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("building blocks", ("config", "configfile", "registry", "distributed", "runtime_env", "data", "text", "models",
                         "losses", "samplers", "metrics")),
    ("plain PyTorch training", ("train",)),
    ("recipes", ("recipes",)),
    ("tracking", ("tracking",)),
    ("Ray driver", ("driver",)),
    ("studies and serving", ("studies", "serve")),
    ("job checks and tools", ("preflight", "devcluster")),
    ("entry points", ("launch", "cli", "cli_data", "cli_serve", "__init__")),
)
#: what plain PyTorch means for train/: none of these is imported there
NOT_PLAIN = ("ray", "mlflow", "optuna")
MAX_RECIPE_LINES = 450


def modules() -> dict[str, Path]:
    """``xray_match.x.y`` -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from a import b`` counts a.b, and a unless
    every b is a module of the package; relative imports are resolved)."""
    mods = modules()
    here = path.relative_to(ROOT).with_suffix("").parts
    package = here[:-1]  # the package a relative import starts from (an __init__'s is its own folder)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            subs = {f"{base}.{a.name}" for a in node.names}
            out |= subs
            if not subs <= mods.keys():
                out.add(base)
    return out


def calls(path: Path, owner: str, attr: str) -> list[int]:
    """Lines of ``owner.attr(...)`` calls in ``path``."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
            and isinstance(n.func.value, ast.Name) and n.func.value.id == owner]


def names(path: Path, name: str) -> list[int]:
    tree = ast.parse(path.read_text())
    used = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == name]
    imported = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and any(a.name == name for a in n.names)]
    return used + imported


def in_folder(module: str, *folders: str) -> bool:
    return any(module == f"xray_match.{f}" or module.startswith(f"xray_match.{f}.") for f in folders)


def layer(module: str) -> int | None:
    """The index in :data:`LAYERS` of a module of the package (``xray_match.train.loop`` is in
    train's), or None for a name outside the package or in no layer."""
    parts = module.split(".")
    if parts[0] != "xray_match":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    return next((i for i, (_, members) in enumerate(LAYERS) if top in members), None)


def test_every_module_is_in_exactly_one_layer():
    members = [m for _, ms in LAYERS for m in ms]
    assert len(members) == len(set(members)), "a name is in two layers"
    homeless = sorted(m for m in modules() if layer(m) is None)
    assert not homeless, f"add these to a layer in LAYERS (and docs/layout.md): {homeless}"
    unused = sorted(set(members) - {"__init__"} - {m.split(".")[1] for m in modules() if m != "xray_match"})
    assert not unused, f"LAYERS names what the package does not have: {unused}"


def test_modules_import_only_from_their_own_layer_or_below():
    """The layers are a strict order, no exceptions: an import from a higher layer (at the top of a
    module or inside a function) is an arrow that runs up, and its code belongs lower or higher."""
    bad = []
    for m, p in modules().items():
        for i in sorted(imports(p)):
            if (up := layer(i)) is not None and up > layer(m):
                bad.append(f"{m} ({LAYERS[layer(m)][0]}) imports {i} ({LAYERS[up][0]})")
    assert not bad, bad


def test_nothing_imports_a_job_or_the_command_line():
    """jobs/ scripts sit on top of everything; only cli.py imports its own subcommands (cli_*.py)
    and launch.py, and nothing imports cli.py."""
    bad = []
    for m, p in modules().items():
        for i in imports(p):
            if i.split(".")[0] == "jobs" or i == "xray_match.cli" or i.startswith("xray_match.cli."):
                bad.append(f"{m} imports {i}")
            elif m != "xray_match.cli" and (i.startswith("xray_match.cli_") or i == "xray_match.launch"):
                bad.append(f"{m} imports {i}")
    assert not bad, bad


def test_train_is_plain_pytorch():
    """The loop, the checkpoint file and the recipe contract import no Ray, MLflow or Optuna (the Ray
    side of a run is driver/, MLflow is tracking/)."""
    bad = [f"{m} imports {i}" for m, p in modules().items() if in_folder(m, "train")
           for i in imports(p) if i.split(".")[0] in NOT_PLAIN]
    assert not bad, bad


def test_only_the_checkpoint_module_opens_checkpoints():
    hits = [f"{p.relative_to(ROOT)}:{line}" for p in modules().values() for line in calls(p, "torch", "load")]
    assert hits == [f"xray_match/train/checkpoint.py:{calls(PKG / 'train' / 'checkpoint.py', 'torch', 'load')[0]}"]
    assert "weights_only=True" in (PKG / "train" / "checkpoint.py").read_text()
    defined = [str(p.relative_to(ROOT)) for p in modules().values() if "CKPT_FILE =" in p.read_text()]
    assert defined == ["xray_match/train/checkpoint.py"]


def test_storage_path_is_read_in_one_place():
    readers = [str(p.relative_to(ROOT)) for p in modules().values() if "ray.storage_path" in p.read_text()
               and p.name not in ("config.py", "launch.py")]  # the field and its command-line flag
    assert readers == ["xray_match/driver/storage.py"]


def test_mlflow_clients_and_writes_only_in_tracking():
    bad = [f"{p.relative_to(ROOT)}:{line}" for m, p in modules().items() if not in_folder(m, "tracking")
           for line in names(p, "MlflowClient")]
    bad += [f"{m} imports {i}" for m, p in modules().items() if not in_folder(m, "tracking")
            for i in imports(p) if i.split(".")[0] == "mlflow"]
    assert not bad, bad


def test_registered_model_name_in_one_function():
    hits = [str(p.relative_to(ROOT)) for p in modules().values() if 'f"xray-match-{' in p.read_text()]
    assert hits == ["xray_match/tracking/store.py"]


def test_no_import_cycles():
    """The package's modules import each other without a cycle, counting imports inside functions
    too (tracking.runs and tracking.registry used to import each other)."""
    mods = modules()
    graph = {m: sorted(i for i in imports(p) if i in mods and i != m) for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        for d in graph[m]:
            if d in path:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in done:
                visit(d, path + [d])
        done.add(m)

    for m in graph:
        visit(m, [m])


def test_recipes_are_small():
    big = {p.name: n for p in (PKG / "recipes").glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_RECIPE_LINES}
    assert not big, f"recipes over {MAX_RECIPE_LINES} lines: {big} (drivers go to xray_match/studies/)"


def test_recipe_entry_points_match_what_the_recipe_modules_register():
    """pyproject.toml names every recipe module under ``xray_match.recipes`` (the installed metadata
    says the same: the package was synced after the last edit), and each name is what its module
    registers."""
    import tomllib

    from xray_match.config import METHOD_SECTIONS
    from xray_match.registry import RECIPE_GROUP, RECIPES, recipe_modules

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][RECIPE_GROUP]
    assert recipe_modules() == declared, "installed entry points differ from pyproject.toml: run uv sync"
    files = {m for m in modules() if in_folder(m, "recipes") and m != "xray_match.recipes"}
    for module in files:
        importlib.import_module(module)
    registered = {name: type(r).__module__ if not isinstance(r, type) else r.__module__
                  for name, r in RECIPES._entries.items()}
    assert registered == declared
    assert set(declared.values()) <= files  # the built-in recipes live in recipes/
    for name in declared:
        assert RECIPES.get(name).section in METHOD_SECTIONS, name


def test_load_config_imports_no_torch():
    """Loading a preset checks the model name against the built-in names without importing a recipe."""
    code = ("import sys, time; t = time.perf_counter(); from xray_match.config import load_config; "
            "cfg = load_config('dspe_cpu', ['model.name=rdan']); dt = time.perf_counter() - t; "
            "heavy = sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow', 'xray_match.recipes.rdan') if m in sys.modules); "
            "print(heavy, round(dt, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    heavy, seconds = out.stdout.rsplit(" ", 1)
    assert heavy == "[]", f"load_config imported {heavy}"
    assert float(seconds) < 5.0  # ~0.1 s on an idle core; generous for a busy 2-core machine


def test_a_run_logs_only_its_own_methods_params():
    from xray_match.config import METHOD_SECTIONS, load_config

    flat = load_config("moco_cpu").flat(method="moco")
    sections = {k.split(".")[0] for k in flat}
    assert "moco" in sections and not sections & (set(METHOD_SECTIONS) - {"moco"})
    assert {"optim", "data", "train", "ray", "tracking", "tune", "model"} <= sections
