"""Gathering a table from fabricated run directories: numbers, missing rows, provenance, bytes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from replic.workflow import gather as gather_mod
from replic.workflow.gather import gather, read_curve
from replic.workflow.registry import load_registry

METRICS = {"AP": 0.3512, "AP50": 0.5, "AP75": 0.25, "APs": -1.0, "APm": 0.4, "APl": None}


def _registry(tmp_path: Path) -> Path:
    data = {
        "version": 1,
        "paper": "Test paper",
        "tables": {
            "demo": {
                "title": "Demo table",
                "source": "paper Table 1",
                "metrics": ["AP", "AP50", "APs", "APl"],
                "paper_only": ["GFLOPs"],
                "rows": [
                    {"id": "good", "label": "Good", "epochs": 6, "group": "G1", "source": "Table 1",
                     "experiment": "exp_good", "paper": {"AP": 40.9, "AP50": None, "GFLOPs": 90}},
                    {"id": "good_again", "label": "Good (shared run)", "group": "G2", "source": "Table 3",
                     "experiment": "exp_good", "inferred": True, "paper": {"AP": 41.0}},
                    {"id": "failed", "label": "Failed", "group": "G2", "source": "Table 3",
                     "experiment": "exp_failed", "paper": {"AP": 37.1}},
                    {"id": "corrupt", "label": "Corrupt", "group": "G2", "source": "Table 3",
                     "experiment": "exp_corrupt", "paper": {"AP": 36.0}},
                    {"id": "cited", "label": "Cited", "group": "G2", "source": "Table 3",
                     "experiment": None, "paper": {"AP": 39.4}},
                ],
            }
        },
        "compute": {
            "smoke": {"train": {"threads": 1, "runtime": 10}, "eval": {"threads": 1, "runtime": 5}},
            "paper": {"train": {"threads": 1, "runtime": 10}, "eval": {"threads": 1, "runtime": 5}},
        },
    }
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _fabricate_runs(runs: Path) -> None:
    good = runs / "smoke" / "exp_good"
    (good / "eval").mkdir(parents=True)
    (good / "eval" / "metrics.json").write_text(json.dumps({
        "metrics": METRICS, "provenance": {},
        "diagnostics": {"box_std_across_images": 0.0125, "gt_box_std": 0.23}}))
    (good / "config.sha256").write_text("abcdef0123456789\n")
    (good / "provenance.json").write_text(json.dumps({"git": {"commit": "c0ffee", "dirty": False}}))
    (good / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 6}}))
    (good / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "step": 8, "loss": 3.0, "type": "epoch"}) + "\n"
        + json.dumps({"epoch": 1, "step": 12, "loss": 9.0, "type": "step"}) + "\n"
        + json.dumps({"epoch": 1, "step": 16, "loss": 2.5, "type": "epoch"}) + "\n"
        + json.dumps({"epoch": 2, "step": 24, "eval": {"AP": 0.1}}) + "\n"
        + '{"epoch": 3, "AP": 0.2'  # a torn last line of a killed run
    )
    # A run that trained but whose evaluation never finished (failed job).
    (runs / "smoke" / "exp_failed").mkdir(parents=True)
    (runs / "smoke" / "exp_failed" / "config.sha256").write_text("ffff\n")
    corrupt = runs / "smoke" / "exp_corrupt" / "eval"
    corrupt.mkdir(parents=True)
    (corrupt / "metrics.json").write_text('{"metrics": {"AP": 0.3')


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {r["row_id"]: r for r in csv.DictReader(handle)}


def test_gather_numbers_missing_rows_and_provenance(tmp_path: Path) -> None:
    reg_path = _registry(tmp_path)
    _fabricate_runs(tmp_path / "runs")
    out = tmp_path / "results"
    gather(load_registry(reg_path), reg_path, "demo", "smoke", tmp_path / "runs", out)
    rows = _rows(out / "table_demo.csv")
    assert list(rows) == ["good", "good_again", "failed", "corrupt", "cited"]

    good = rows["good"]
    assert good["status"] == "ok"
    assert float(good["AP_ours"]) == pytest.approx(35.12)
    assert float(good["AP_diff"]) == pytest.approx(35.12 - 40.9)
    # Not published: empty paper cell and no difference, but our number is still shown.
    assert good["AP50_paper"] == "" and good["AP50_diff"] == "" and float(good["AP50_ours"]) == 50.0
    # pycocotools' -1 and null (undefined buckets) are empty, not a number.
    assert good["APs_ours"] == "" and good["APl_ours"] == ""
    assert good["GFLOPs_paper"] == "90"
    assert (good["run_dir"], good["config_sha256"], good["git_commit"], good["git_dirty"]) == (
        str(tmp_path / "runs" / "smoke" / "exp_good"), "abcdef0123456789", "c0ffee", "false")
    # The eval diagnostics travel as they are (fractions of the image side, not AP points).
    assert (float(good["box_std"]), float(good["gt_box_std"])) == (0.0125, 0.23)
    # The shared run fills both rows with the same numbers.
    assert rows["good_again"]["AP_ours"] == good["AP_ours"]
    assert float(rows["good_again"]["AP_diff"]) == pytest.approx(35.12 - 41.0)

    for row_id in ("failed", "corrupt"):
        row = rows[row_id]
        assert row["status"] == "missing"
        assert all(row[f"{m}_ours"] == "" and row[f"{m}_diff"] == "" for m in ("AP", "AP50", "APs", "APl"))
        assert row["AP_paper"] != "" and row["run_dir"] == "" and row["box_std"] == ""
    assert rows["cited"]["status"] == "cited" and rows["cited"]["AP_ours"] == ""

    provenance = json.loads((out / "table_demo.provenance.json").read_text())
    by_id = {r["row_id"]: r for r in provenance["rows"]}
    assert by_id["good"]["cells"]["AP"] == {"paper": 40.9, "ours": 35.12}
    assert by_id["good"]["git_commit"] == "c0ffee"
    assert "does not exist" in by_id["failed"]["problem"]
    assert "unreadable" in by_id["corrupt"]["problem"]
    assert by_id["cited"]["status"] == "cited" and "run_dir" not in by_id["cited"]

    markdown = (out / "table_demo.md").read_text()
    assert "| Good | 6 | ok | 40.9 / 35.1 (-5.8) | n/p / 50.0 (—) |" in markdown
    assert "| Failed | — | missing | 37.1 / — |" in markdown
    assert "Good (shared run) *" in markdown and "## G2" in markdown
    assert "Rows: 2 ok, 2 missing, 1 cited." in markdown
    # Smoke numbers check the pipeline; mini runs learn, so their header says what they can test.
    assert "they check the pipeline" in markdown
    gather(load_registry(reg_path), reg_path, "demo", "mini", tmp_path / "runs", tmp_path / "mini")
    mini = (tmp_path / "mini" / "table_demo.md").read_text()
    assert "can test the paper's qualitative claims" in mini and "check the pipeline" not in mini
    for figure in ("table_demo_ap.png", "table_demo_curves.png"):
        assert (out / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gather_is_byte_reproducible(tmp_path: Path) -> None:
    reg_path = _registry(tmp_path)
    _fabricate_runs(tmp_path / "runs")
    registry = load_registry(reg_path)
    names = ("table_demo.csv", "table_demo.md", "table_demo.provenance.json")
    gather(registry, reg_path, "demo", "smoke", tmp_path / "runs", tmp_path / "a")
    gather(registry, reg_path, "demo", "smoke", tmp_path / "runs", tmp_path / "b")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_gather_with_no_runs_at_all_marks_every_run_row_missing(tmp_path: Path) -> None:
    reg_path = _registry(tmp_path)
    gather(load_registry(reg_path), reg_path, "demo", "paper", tmp_path / "nothing", tmp_path / "out")
    statuses = {k: v["status"] for k, v in _rows(tmp_path / "out" / "table_demo.csv").items()}
    assert statuses == {"good": "missing", "good_again": "missing", "failed": "missing",
                        "corrupt": "missing", "cited": "cited"}


def test_curve_skips_torn_lines_and_ends_with_the_final_evaluation(tmp_path: Path) -> None:
    _fabricate_runs(tmp_path / "runs")
    run = tmp_path / "runs" / "smoke" / "exp_good"
    assert read_curve(run / "metrics.jsonl") == [(2.0, 0.1)]
    result = gather_mod.read_run(run)
    assert result.curve == [(2.0, 0.1), (6.0, pytest.approx(0.3512))]
    # Only per-epoch records make the loss curve (step records are noisier partial means).
    assert result.loss_curve == [(0.0, 3.0), (1.0, 2.5)]
    assert math.isnan(result.metrics["APs"])


def test_cli_gathers_and_reports_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg_path = _registry(tmp_path)
    _fabricate_runs(tmp_path / "runs")
    code = gather_mod.main(["--registry", str(reg_path), "--table", "demo", "--scale", "smoke",
                            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert "'ok': 2, 'missing': 2, 'cited': 1" in captured.out
    assert "missing failed:" in captured.err
    assert (tmp_path / "out" / "table_demo.csv").is_file()


def test_a_table_from_several_commits_or_a_dirty_tree_says_so() -> None:
    from replic.workflow.gather import code_state

    assert code_state([("a" * 40, False), ("a" * 40, False)]) == ""
    mixed = code_state([("a" * 40, False), ("b" * 40, True), ("b" * 40, False)])
    assert "2 commits (aaaaaaaaaa, bbbbbbbbbb)" in mixed and "1 of 3 rows" in mixed and "dirty" in mixed
    assert "dirty" in code_state([("a" * 40, True)]) and "commits" not in code_state([("a" * 40, True)])
