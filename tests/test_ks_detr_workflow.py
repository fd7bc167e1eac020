"""KS-DETR in the workflow: the paper-scale DAG of its tables and one KS row end to end at smoke scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_workflow import copy_workflow, job_counts, read_table, registry, snakemake, stub_coco


def test_paper_scale_dag_of_the_ks_tables(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    result = snakemake(
        workdir, "results/table_ks_detr.csv", "results/table_ks_detr_ablations.csv",
        "results/figures/table_ks_detr_ks_attention.csv", "-n", "-p", "--cores", "8",
        "--config", "scale=paper", f"coco_root={coco}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reg = registry()
    runs = len(reg.experiments(["ks_detr", "ks_detr_ablations"]))
    ks_runs = [e for e in reg.experiments(["ks_detr"]) if not e.endswith("_base")]
    assert job_counts(result.stdout) == {
        "check_data": 1, "scale_overlay": 1, "train": runs, "evaluate": runs, "table": 2,
        "ks_attention_figure": len(ks_runs), "ks_attention_table": 1, "total": 2 * runs + 5 + len(ks_runs),
    }
    # Every KS row has its baseline, under the same protocol, in the same table.
    for e in ks_runs:
        assert f"{e}_base" in reg.experiments(["ks_detr"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_of_a_ks_row_with_its_figure(tmp_path: Path) -> None:
    """Train a KS-Conditional-DETR at smoke scale, evaluate it with `replic eval`, gather, draw."""
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(workdir, "--cores", "2", "results/table_ks_smoke_ci.csv",
                       "results/figures/table_ks_smoke_ci_ks_attention.csv", timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = read_table(workdir / "results" / "table_ks_smoke_ci.csv")
    assert row["status"] == "ok" and row["AP_ours"] != "" and row["AP_paper"] == "45.3"
    run = workdir / "runs" / "smoke" / "ks_cdetr_r50_50ep"
    # The teachers were trained: their loss terms are in the log, with the student's weights.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for term in ("loss_ce_teacher_share_v", "loss_giou_teacher_share_a"):
        assert any(term in r for r in records), term
    summary = json.loads((workdir / "results" / "figures" / "smoke" / "ks_attention" / "ks_cdetr_r50_50ep.json")
                         .read_text())
    assert set(summary["attention_mass_on_fg"]) == {"student A", "teacher share-V: A_t", "teacher share-A: = A"}
    assert summary["fg_tokens"] > 0
    assert (workdir / "results" / "figures" / "smoke" / "ks_attention" / "ks_cdetr_r50_50ep.png").stat().st_size > 0
    csv_rows = read_table(workdir / "results" / "figures" / "table_ks_smoke_ci_ks_attention.csv")
    assert [r["map"] for r in csv_rows] == ["student A", "teacher share-V: A_t", "teacher share-A: = A"]
