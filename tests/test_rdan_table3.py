"""Table 3 as a study (xray_match/studies/rdan_table3.py, jobs/table3_rdan.py): the table's
arithmetic by hand, the cells validated before compute, and a real run of two cells on a local Ray
cluster with a sqlite MLflow store, run again under its name to skip what is scored."""

from __future__ import annotations

import json
import os
import sys

import pytest

from xray_match.config import ConfigError, load_config
from xray_match.studies.rdan_table3 import ROWS, cell_configs, format_table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))


def _test(rsum: float, r1: float = 0.0) -> dict[str, dict[str, float]]:
    base = {f"test/{k}": 0.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    return {"test": base | {"test/i2t_r1": r1, "test/rsum": rsum}}


def test_table_means_over_seeds_by_hand():
    """full model: rsum 300 and 310 -> mean 305.0, i2t R@1 40 and 50 -> 45.0; no-cnn: 280 and 290 ->
    285.0, -20.0 from the full model; scan: seed 0 only -> 250.0 (-55.0), seed 1 shown as "-"."""
    results = {"none/s0": _test(300, 40), "none/s1": _test(310, 50), "no-cnn/s0": _test(280),
               "no-cnn/s1": _test(290), "scan/s0": _test(250)}
    table = format_table(results, ["none", "no-cnn", "scan", "mu1"], [0, 1])
    lines = table.splitlines()
    assert lines[0].startswith("| row | switches | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1") and "rsum by seed" in lines[0]
    full, no_cnn, scan, mu1 = (line.split(" | ") for line in lines[2:])
    assert full[1] == "full model" and full[2] == "45.0" and full[8] == "305.0" and full[9] == "300.0 / 310.0"
    assert no_cnn[1] == "use_cnn=False" and no_cnn[8] == "285.0" and no_cnn[10] == "-20.0 |"
    assert scan[1].startswith("SCAN") and scan[8] == "250.0" and scan[9] == "250.0 / -" and scan[10] == "-55.0 |"
    assert mu1[1] == "mu=1.0" and mu1[8] == "-" and mu1[9] == "- / -"


def test_cells_are_checked_before_any_compute():
    rdan, scan = load_config("rdan_cpu"), load_config("scan_cpu")
    cells = cell_configs(rdan, scan, ROWS, [0, 1])
    assert len(cells) == 16 and ROWS[-1] == "scan" and ROWS[0] == "none"
    by = {(r, s): c for r, s, c in cells}
    assert by[("no-hard", 1)].rdan.ablation == "no-hard" and by[("no-hard", 1)].train.seed == 1
    assert by[("scan", 0)].model.name == "scan" and by[("scan", 0)].train.seed == 0
    with pytest.raises(ConfigError, match="rows: bogus"):
        cell_configs(rdan, scan, ["none", "bogus"], [0])
    with pytest.raises(ConfigError, match="seeds"):
        cell_configs(rdan, scan, ["none"], [0, 0])
    with pytest.raises(ConfigError, match="model.name"):
        cell_configs(scan, scan, ["none"], [0])
    # no-cnn with the residual off leaves nothing to attend on: refused for that row, up front
    with pytest.raises(ConfigError, match="use_residual"):
        cell_configs(rdan.with_overrides({"rdan.use_residual": False}), scan, ["none", "no-cnn"], [0])


def test_job_names_a_bad_row_in_one_line(capsys):
    from table3_rdan import main

    with pytest.raises(SystemExit) as e:
        main(["--rows", "none,no-such-row", "--seeds", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config: rows: no-such-row") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["--seeds", "0,x"])
    assert "--seeds '0,x'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_cells_on_ray_then_resumed_by_name(ray_cluster, tiny_scenes, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from xray_match.studies.rdan_table3 import ablation_table

    common = [f"data.path={tiny_scenes}", "rdan.embed_dim=32", "rdan.word_dim=16", "rdan.relation_channels=4",
              "rdan.backbone_width=4", "scan.embed_dim=32", "scan.word_dim=16", "scan.backbone_width=4",
              "data.batch_size=8", "data.eval_batch_size=20", "data.num_workers=0", "train.epochs=1",
              "data.steps_per_epoch=2", "train.bn_recompute_batches=1", f"ray.storage_path={tmp_path / 'runs'}",
              f"tracking.tracking_uri={mlflow_uri}", "ray.cpus_per_worker=1", "ray.num_workers=2", "ray.name=t3"]
    rdan, scan = load_config("rdan_cpu", common), load_config("scan_cpu", common)
    lines: list[str] = []
    out = ablation_table(rdan, scan, rows=["none", "scan"], seeds=[0], log=lines.append)
    assert set(out["results"]) == {"none/s0", "scan/s0"}
    for cell in out["results"].values():
        assert cell["test"]["test/images"] == 60 and 0 <= cell["test"]["test/rsum"] <= 600
    saved = json.loads((tmp_path / "runs" / "t3" / "table3.json").read_text())
    assert saved == json.loads(json.dumps(out["results"]))
    rows = out["table"].splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| none", "| scan"] and "-" not in rows[1].split(" | ")[8]

    client = MlflowClient(mlflow_uri)
    children = client.search_runs([client.get_experiment_by_name(rdan.tracking.experiment_name).experiment_id],
                                  f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["t3-none-s0", "t3-scan-s0"]
    assert {r.info.run_name: r.data.metrics["test/rsum"] for r in children} == \
        {f"t3-{row}-s0": out["results"][f"{row}/s0"]["test"]["test/rsum"] for row in ("none", "scan")}
    assert client.search_registered_models() == []  # a table moves no champion
    table = client.download_artifacts(out["parent_run_id"], "tables/table3.md", str(tmp_path / "dl"))
    assert open(table).read() == out["table"]

    # again under the same name: both cells are kept, nothing trains, the same parent run is used
    again = ablation_table(rdan, scan, rows=["none", "scan"], seeds=[0], log=lines.append)
    assert again["results"] == out["results"] and again["parent_run_id"] == out["parent_run_id"]
    assert "2 cells, 2 already scored" in lines[-1]
