"""``replic tables``: the table targets, their papers, rows and run sets, and the cost per scale;
and the message for a results/ target no rule makes."""

from __future__ import annotations

import json
from pathlib import Path

from replic.cli import main
from replic.workflow.registry import load_registry
from replic.workflow.tables_cli import describe_tables, run_set, suggest_target

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "configs" / "tables.yaml"
EXPERIMENTS = REPO / "configs" / "experiments"


def test_run_set_includes_what_the_rows_need_trained_first() -> None:
    registry = load_registry(REGISTRY)
    d3etr = run_set(registry, "d3etr", EXPERIMENTS)
    assert "cdetr_r101_50ep" in d3etr and "d3etr_cdetr_r50_12ep" in d3etr  # the teacher, a student
    maskd = run_set(registry, "maskd_smoke_ci", EXPERIMENTS)
    # RetinaNet student <- teacher -> token run -> MasKD student: the teacher and token run too.
    assert set(registry.experiments(["maskd_smoke_ci"])) < set(maskd)
    assert any(name.startswith("maskd_tokens_") for name in maskd)


def test_costs_follow_the_registry_compute_section() -> None:
    registry = load_registry(REGISTRY)
    records = {r["table"]: r for r in describe_tables(registry, EXPERIMENTS)}
    assert "smoke_ci" not in records  # CI-only tables need --all
    ablations = records["cdetr_ablations"]
    runs = len(run_set(registry, "cdetr_ablations", EXPERIMENTS))
    assert ablations["rows"] == len(registry.table("cdetr_ablations").rows)
    mini = registry.compute["mini"]
    assert ablations["cost"]["mini"] == {
        "trainings": runs,
        "cpu_minutes": round(runs * mini.train.typical_minutes + runs * mini.eval.typical_minutes, 1)}
    # Paper scale: GPU hours of whole runs (not capped at one Slurm job's time limit).
    table1 = records["conditional_detr"]["cost"]["paper"]
    detr_500 = registry.resources("detr_r50_500ep", "paper", "train", capped=False)
    assert detr_500["runtime"] > registry.resources("detr_r50_500ep", "paper", "train")["runtime"]
    assert table1["gpu_hours"] > detr_500["runtime"] * detr_500["gpu"] / 60


def test_replic_tables_prints_every_target(capsys) -> None:
    assert main(["tables"]) == 0
    out = capsys.readouterr().out
    for name, table in load_registry(REGISTRY).tables.items():
        assert (f"results/table_{name}.csv" in out) != table.test_only, name
    assert "mini:" in out and "GPU-h" in out
    assert main(["tables", "--all", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["table"] for r in records} == set(load_registry(REGISTRY).tables)


def test_a_misspelt_target_gets_the_closest_valid_ones() -> None:
    registry = load_registry(REGISTRY)
    message = suggest_target("results/table_d3etr.cvs", registry)
    assert "Did you mean results/table_d3etr.csv" in message
    assert "results/table_maskd.csv" in message  # the full list follows
    assert "Did you mean" not in suggest_target("results/zzzz", registry)
