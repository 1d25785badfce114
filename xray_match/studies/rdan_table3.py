"""The RDAN paper's Table 3 on our data: the full model, each ablation switch (``rdan.ablation``,
:data:`~xray_match.recipes.rdan.ABLATIONS`) and the SCAN baseline, each trained for every seed at
one budget and scored on the whole test split. ``jobs/table3_rdan.py`` runs :func:`ablation_table`.

Each cell (row, seed) is one :func:`~xray_match.driver.worker.run_training` run (Ray Train, an
MLflow child run of the study's run, not registered: a table does not move any champion). Its
test metrics are written to ``<storage>/<study>/table3.json`` as soon as it ends, so running the
study again under the same name (``--name``) skips the cells already scored.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

from xray_match.config import Config, ConfigError
from xray_match.recipes.rdan import ABLATIONS, effective

#: Table 3's rows in the paper's order, then the baseline
ROWS: tuple[str, ...] = (*ABLATIONS, "scan")
#: the test metrics a row shows (before the split's prefix), in column order
COLUMNS: tuple[str, ...] = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
RESULTS_FILE = "table3.json"


def cell_configs(rdan_cfg: Config, scan_cfg: Config, rows: Iterable[str], seeds: Iterable[int]
                 ) -> list[tuple[str, int, Config]]:
    """One config per (row, seed), seed by seed, each validated before any compute: a row is an ablation
    name or ``scan``; RDAN rows set ``rdan.ablation`` on ``rdan_cfg``, the SCAN row is ``scan_cfg``."""
    rows, seeds = list(rows), list(seeds)
    if rdan_cfg.model.name != "rdan":
        raise ConfigError(f"model.name: Table 3 trains 'rdan' rows, got {rdan_cfg.model.name!r}")
    if scan_cfg.model.name != "scan":
        raise ConfigError(f"model.name: the SCAN row needs a 'scan' config, got {scan_cfg.model.name!r}")
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ConfigError(f"rows: {', '.join(unknown) or 'none given'}; known rows: {', '.join(ROWS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds}: give one or more distinct seeds")
    out = []
    for seed in seeds:  # seed by seed: a study stopped early holds whole tables of the first seeds
        for row in rows:
            if row == "scan":
                cfg = scan_cfg.with_overrides({"train.seed": seed})
            else:
                cfg = rdan_cfg.with_overrides({"rdan.ablation": row, "train.seed": seed})
                effective(cfg)
            out.append((row, seed, cfg))
    return out


def switches(row: str) -> str:
    if row == "scan":
        return "SCAN (Lee et al. 2018)"
    return ", ".join(f"{k}={v}" for k, v in ABLATIONS[row].items()) or "full model"


def format_table(results: dict[str, dict[str, Any]], rows: Iterable[str], seeds: Iterable[int],
                 split: str = "test") -> str:
    """The table in markdown: per row, each metric's mean over the seeds scored so far, then each
    seed's rsum and the mean rsum's difference from the full model ("none"). ``results`` maps
    ``"<row>/s<seed>"`` to ``{"test": {"<split>/<metric>": value}}``; a cell not scored yet is "-"."""
    seeds = list(seeds)

    def metrics(row: str) -> list[dict[str, float]]:
        return [results[f"{row}/s{s}"]["test"] for s in seeds if f"{row}/s{s}" in results]

    def mean(row: str, col: str) -> float | None:
        got = [m[f"{split}/{col}"] for m in metrics(row)]
        return sum(got) / len(got) if got else None

    full = mean("none", "rsum")
    head = ["row", "switches", *(c.replace("_r", " R@") for c in COLUMNS), "rsum by seed", "vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        means = {c: mean(row, c) for c in COLUMNS}
        cells = [row, switches(row)]
        cells += ["-" if m is None else f"{m:.1f}" for m in means.values()]
        by_seed = [f"{results[f'{row}/s{s}']['test'][f'{split}/rsum']:.1f}" if f"{row}/s{s}" in results else "-"
                   for s in seeds]
        cells.append(" / ".join(by_seed))
        r = means["rsum"]
        cells.append("" if row == "none" or r is None or full is None else f"{r - full:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _read_results(path: str) -> dict[str, dict[str, Any]]:
    from xray_match.data.io import exists, open_url

    if not exists(path):
        return {}
    with open_url(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a Table 3 results file ({e}); remove it or choose another --name") from None


def ablation_table(rdan_cfg: Config, scan_cfg: Config, *, rows: Iterable[str] = ROWS, seeds: Iterable[int] = (0, 1),
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and test-score every (row, seed) cell in turn (cells already in the study's results
    file are kept); returns ``{"study", "table", "results", "results_path", "parent_run_id"}``. The
    table is logged on the study's MLflow run (``tables/table3.md``) after each cell."""
    from xray_match.data.io import atomic_write_bytes
    from xray_match.driver.context import RunContext
    from xray_match.driver.worker import run_training

    rows, seeds = list(rows), list(seeds)
    cells = cell_configs(rdan_cfg, scan_cfg, rows, seeds)
    study = rdan_cfg.ray.name or f"rdan-table3-{time.strftime('%Y%m%d-%H%M%S')}"
    ctx = RunContext.from_config(rdan_cfg)
    split = rdan_cfg.data.test_split
    path = ctx.storage.join(study, RESULTS_FILE)
    results = _read_results(path)
    session = ctx.tracking
    parent = session.find_run({"study": study, "space": "table3"}) if results else None
    if parent is None:
        parent = session.start_run(study, tags={"study": study, "space": "table3"})
        session.log_params(parent, {"rows": ",".join(rows), "seeds": ",".join(map(str, seeds)),
                                    "train.epochs": rdan_cfg.train.epochs})
    todo = [c for c in cells if f"{c[0]}/s{c[1]}" not in results]
    log(f"[table3] {study}: {len(cells)} cells, {len(cells) - len(todo)} already scored ({path})")
    t_start = time.perf_counter()
    for i, (row, seed, cfg) in enumerate(todo):
        key = f"{row}/s{seed}"
        t0 = time.perf_counter()
        out = run_training(cfg.with_overrides({"ray.name": f"{study}-{row}-s{seed}"}), register=False, context=ctx,
                           parent_run_id=parent)
        if out["checkpoint"] is None:
            raise RuntimeError(f"{key}: the run produced no checkpoint")
        test = ctx.evaluate(out["checkpoint"], [split], log_to=(out["run_id"],))
        results[key] = {"row": row, "seed": seed, "test": test, "run_id": out["run_id"],
                        "checkpoint": out["checkpoint"].url, "wall_s": round(time.perf_counter() - t0, 1),
                        "val": {k: v for k, v in out["metrics"].items() if k.startswith("val/")}}
        atomic_write_bytes(path, json.dumps(results, indent=1, sort_keys=True).encode())
        table = format_table(results, rows, seeds, split)
        session.log_texts(parent, {"table3.md": table}, artifact_path="tables")
        session.log_metrics(parent, {f"{row}.s{seed}.rsum": test[f"{split}/rsum"]})
        spent = time.perf_counter() - t_start
        log(f"[table3] {i + 1}/{len(todo)} {key}: test rsum {test[f'{split}/rsum']:.1f} in "
            f"{results[key]['wall_s']:.0f} s; about {spent / (i + 1) * (len(todo) - i - 1) / 60:.0f} min left")
    session.end_run(parent)
    return {"study": study, "table": format_table(results, rows, seeds, split), "results": results,
            "results_path": path, "parent_run_id": parent}
