"""Gathering a table from fabricated run directories: numbers, missing rows, provenance, bytes."""

from __future__ import annotations

import csv
import io
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


# ------------------------------------------------------------------------------------ figures
# Checked on matplotlib's objects, not pixels: what a reader needs from each figure.

from replic.workflow.gather import (  # noqa: E402
    NAN,
    STATUS_CITED,
    STATUS_MISSING,
    STATUS_OK,
    GatheredRow,
    RunResult,
    build_ap_bars,
    build_curves,
    figure_labels,
)
from replic.workflow.registry import Row, Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _fig_row(row_id: str, label: str, **kwargs: object) -> Row:
    return Row(id=row_id, label=label, source="Table 1", experiment=kwargs.pop("experiment", f"exp_{row_id}"),
               **kwargs)  # type: ignore[arg-type]


def _ok(row: Row, ap: float, run: RunResult | None = None) -> GatheredRow:
    run = run or RunResult(run_dir=f"runs/smoke/{row.experiment}", metrics={"AP": ap / 100})
    return GatheredRow(row, STATUS_OK, run, {"AP": ap})


def _missing(row: Row) -> GatheredRow:
    return GatheredRow(row, STATUS_MISSING, RunResult(run_dir="runs/smoke/x", problem="no evaluation"), {"AP": NAN})


def _cited(row: Row) -> GatheredRow:
    return GatheredRow(row, STATUS_CITED, None, {"AP": NAN})


def _with_gains(table: Table, rows: list[GatheredRow]) -> list[GatheredRow]:
    """gain_ours as gather_rows computes it (this row's AP minus its base row's)."""
    by_id = {g.row.id: g for g in rows}
    for g in rows:
        if g.row.gain_over is not None:
            g.gain_ours = {m: round(g.ours[m] - by_id[g.row.gain_over].ours[m], 2) for m in table.gain_metrics()}
    return rows


def _text(label: object) -> str:
    """A tick label as the reader reads it: wrapped lines joined, no-break spaces as spaces."""
    return label.get_text().replace("\n", " ").replace("\u00a0", " ")  # type: ignore[attr-defined]


def _axes(fig: object, name: str) -> object:
    found = [ax for ax in fig.axes if ax.get_label() == name]  # type: ignore[attr-defined]
    assert len(found) == 1, f"expected one '{name}' axes, got {[ax.get_label() for ax in fig.axes]}"  # type: ignore
    return found[0]


def _bars(ax: object) -> dict[str, list[tuple[float, float]]]:
    """Each drawn series of an axes: label → [(bar centre x, height)]."""
    return {c.get_label(): [(p.get_x() + p.get_width() / 2, p.get_height()) for p in c]
            for c in ax.containers}  # type: ignore[attr-defined]


def _marks(ax: object) -> dict[float, str]:
    """The no-result marks of an axes (x → text): where a bar is missing, and why."""
    return {round(t.get_position()[0], 3): t.get_text() for t in ax.texts  # type: ignore[attr-defined]
            if t.get_gid() == "no_result"}


def _inside(inner: object, outer: object, tol: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol  # type: ignore[attr-defined]
            and inner.x1 <= outer.x1 + tol and inner.y1 <= outer.y1 + tol)  # type: ignore[attr-defined]


def _assert_everything_inside(fig: object) -> None:
    """Title, tick labels, legends: all inside the figure (nothing cut off), after a real draw."""
    fig.canvas.draw()  # type: ignore[attr-defined]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    title = fig._suptitle  # type: ignore[attr-defined]
    assert title is not None and title.get_text()
    assert _inside(title.get_window_extent(renderer), fig.bbox), title.get_text()  # type: ignore[attr-defined]
    # In inches: everything drawn (tick labels, legends, group headers) lies within the figure.
    assert _inside(fig.get_tightbbox(renderer), fig.bbox_inches, tol=0.02)  # type: ignore[attr-defined]


def test_ap_figure_names_rows_by_label_and_draws_only_what_exists() -> None:
    long_label = "Conditional DETR-DC5-R101 with a needlessly long description of its training recipe"
    rows = [
        _ok(_fig_row("detr_500", "DETR-R50", epochs=500, group="R50", paper={"AP": 42.0}), 40.0),
        _ok(_fig_row("detr_50", "DETR-R50", epochs=50, group="R50", paper={"AP": 34.9}), 33.1),
        _missing(_fig_row("cdetr", "Conditional DETR-R50", epochs=50, group="R50", paper={"AP": 40.9})),
        _ok(_fig_row("unpublished", long_label, epochs=50, group="a group whose name is long too", paper={}), 41.5),
        _cited(_fig_row("cited", "UP-DETR-R50", epochs=150, group="other", experiment=None, paper={"AP": 40.5})),
    ]
    table = Table(title="Table 1: Comparison of Conditional DETR with DETR on COCO 2017 val", source="Table 1",
                  metrics=["AP"], rows=[g.row for g in rows])
    fig = build_ap_bars(table, rows, "smoke")
    ax = _axes(fig, "ap")

    # Tick labels: the rows' labels (not ids), twins told apart by their epochs, long ones wrapped.
    assert [_text(t) for t in ax.get_xticklabels()] == [  # type: ignore[attr-defined]
        "DETR-R50, 500 ep", "DETR-R50, 50 ep", "Conditional DETR-R50", long_label, "UP-DETR-R50"]
    assert max(len(line) for t in ax.get_xticklabels() for line in t.get_text().split("\n")) <= 40  # type: ignore
    # Paper bars only where the paper has a number, ours only where we have one: no zero bars.
    bars = _bars(ax)
    assert [h for _, h in bars["paper"]] == [42.0, 34.9, 40.9, 40.5]
    assert [h for _, h in bars["ours (smoke scale)"]] == [40.0, 33.1, 41.5]
    assert [round(x) for x, _ in bars["paper"]] == [0, 1, 2, 4] and [round(x) for x, _ in bars["ours (smoke scale)"]] \
        == [0, 1, 3]
    # The rows without a number of ours say why where the bar would be; the unpublished one says n/p.
    marks = _marks(ax)
    assert sorted(marks.values()) == ["missing", "n/p", "not re-run"]
    assert {round(x): m for x, m in marks.items()} == {2: "missing", 3: "n/p", 4: "not re-run"}
    # A legend entry per drawn series and nothing else.
    legend = ax.get_legend()  # type: ignore[attr-defined]
    assert [t.get_text() for t in legend.get_texts()] == ["paper", "ours (smoke scale)"]
    assert "AP points" in ax.get_ylabel()  # type: ignore[attr-defined]
    # The groups are named over their rows.
    assert [t.get_text().replace("\n", " ") for t in ax.texts if t.get_gid() == "group"][0] == "R50"  # type: ignore
    assert "smoke scale" in fig._suptitle.get_text()  # type: ignore[attr-defined]
    assert not [a for a in fig.axes if a.get_label() == "gain"]  # no gains stated: no gain panel
    _assert_everything_inside(fig)


def test_gains_only_table_plots_the_papers_gain_against_ours() -> None:
    # D³ETR publishes gains only: no absolute paper AP, so no 'paper' series in the AP panel.
    base12 = _fig_row("base_12ep", "Conditional DETR-R50-C5 (student alone)", epochs=12, group="12 epochs")
    base50 = _fig_row("base_50ep", "Conditional DETR-R50-C5 (student alone)", epochs=50, group="50 epochs")
    rows = [
        _ok(base12, 30.0),
        _ok(_fig_row("d3_12", "+ D³ETR (arXiv v1)", epochs=12, group="12 epochs", gain_over="base_12ep",
                     paper_gain={"AP": 7.8}), 36.5),
        _missing(_fig_row("d3_12_ijcai", "+ D³ETR (IJCAI 2024)", epochs=12, group="12 epochs",
                          gain_over="base_12ep", paper_gain={"AP": 8.3})),
        _ok(base50, 38.0),
        _ok(_fig_row("d3_50", "+ D³ETR (arXiv v1)", epochs=50, group="50 epochs", gain_over="base_50ep",
                     paper_gain={"AP": 2.4}), 39.0),
    ]
    table = Table(title="D³ETR: Conditional DETR-R50-C5 student <- Conditional DETR-R101-C5 teacher, COCO 2017 val",
                  source="Table 1", metrics=["AP"], rows=[g.row for g in rows])
    rows = _with_gains(table, rows)
    fig = build_ap_bars(table, rows, "mini")

    ax = _axes(fig, "ap")
    assert "paper" not in _bars(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours (mini scale)"]  # type: ignore[attr-defined]
    assert not [m for m in _marks(ax).values() if m == "n/p"]  # no paper series: nothing to mark as unpublished

    gain = _axes(fig, "gain")
    bars = _bars(gain)
    assert [h for _, h in bars["paper"]] == [7.8, 8.3, 2.4]
    assert [h for _, h in bars["ours (mini scale)"]] == pytest.approx([6.5, 1.0])
    assert list(_marks(gain).values()) == ["missing"]
    assert [t.get_text() for t in gain.get_legend().get_texts()] == ["paper", "ours (mini scale)"]  # type: ignore
    assert "gain" in gain.get_ylabel() and "AP points" in gain.get_ylabel()  # type: ignore[attr-defined]
    # Two base rows: each gain's tick names its own.
    ticks = [_text(t) for t in gain.get_xticklabels()]  # type: ignore[attr-defined]
    assert ticks == ["+ D³ETR (arXiv v1), 12 ep vs Conditional DETR-R50-C5 (student alone), 12 ep",
                     "+ D³ETR (IJCAI 2024) vs Conditional DETR-R50-C5 (student alone), 12 ep",
                     "+ D³ETR (arXiv v1), 50 ep vs Conditional DETR-R50-C5 (student alone), 50 ep"]
    # The long title is wrapped, not cut.
    assert "\n" in fig._suptitle.get_text()  # type: ignore[attr-defined]
    _assert_everything_inside(fig)

    # One base row: the panel's title names it and the ticks are the rows' labels alone.
    single = [g for g in rows if g.row.id in ("base_12ep", "d3_12", "d3_12_ijcai")]
    table_12 = Table(title="D³ETR, 12 epochs", source="Table 1", metrics=["AP"], rows=[g.row for g in single])
    fig = build_ap_bars(table_12, single, "mini")
    gain = _axes(fig, "gain")
    assert "Conditional DETR-R50-C5 (student alone)" in gain.get_title(loc="left").replace("\n", " ")  # type: ignore
    assert [_text(t) for t in gain.get_xticklabels()] == ["+ D³ETR (arXiv v1)", "+ D³ETR (IJCAI 2024)"]  # type: ignore


def test_curves_figure_uses_row_labels_and_a_legend_of_drawn_runs() -> None:
    shared = RunResult(run_dir="runs/smoke/exp_a", metrics={"AP": 0.3}, curve=[(2.0, 0.1), (6.0, 0.3)],
                       loss_curve=[(0.0, 3.0), (1.0, 2.5)])
    rows = [
        _ok(_fig_row("a", "Good", experiment="exp_a"), 30.0, shared),
        _ok(_fig_row("a_again", "Good (shared run)", experiment="exp_a"), 30.0, shared),
        _ok(_fig_row("b", "Loss only", experiment="exp_b"), 20.0,
            RunResult(run_dir="runs/smoke/exp_b", metrics={"AP": 0.2}, loss_curve=[(0.0, 4.0)])),
        _missing(_fig_row("c", "Never ran", experiment="exp_c")),
        _cited(_fig_row("d", "Cited", experiment=None)),
    ]
    table = Table(title="Demo table", source="Table 1", metrics=["AP"], rows=[g.row for g in rows])
    fig = build_curves(table, rows, "smoke")
    loss, ap = _axes(fig, "loss"), _axes(fig, "ap")
    # One line per run, named by the rows' labels (not experiment ids); a shared run names both rows.
    assert [line.get_label() for line in loss.get_lines()] == ["Good / Good (shared run)", "Loss only"]  # type: ignore
    assert [line.get_label() for line in ap.get_lines()] == ["Good / Good (shared run)"]  # type: ignore
    # The loss of epoch index e is the mean over that epoch: drawn at e + 1 epochs completed,
    # the axis of the evaluations.
    assert list(loss.get_lines()[0].get_xdata()) == [1.0, 2.0]  # type: ignore[attr-defined]
    assert list(ap.get_lines()[0].get_ydata()) == pytest.approx([10.0, 30.0])  # type: ignore[attr-defined]
    assert loss.get_xlabel() == ap.get_xlabel() == "epochs completed"  # type: ignore[attr-defined]
    assert "AP points" in ap.get_ylabel()  # type: ignore[attr-defined]
    # One legend, of the runs drawn; the run that logged nothing is counted in the title instead.
    assert len(fig.legends) == 1  # type: ignore[attr-defined]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Good / Good (shared run)", "Loss only"]  # type: ignore
    assert "1 of 3 runs logged no curve" in fig._suptitle.get_text().replace("\n", " ")  # type: ignore
    _assert_everything_inside(fig)


def test_twins_get_epochs_then_groups_in_figure_labels() -> None:
    rows = [_ok(_fig_row(f"r{i}", label, epochs=epochs, group=group), 1.0) for i, (label, epochs, group) in
            enumerate([("DETR-R50", 500, "R50"), ("DETR-R50", 50, "R50"), ("+ MasKD", 24, "FCOS"),
                       ("+ MasKD", 24, "RetinaNet"), ("Alone", None, None)])]
    assert figure_labels(rows) == {"r0": "DETR-R50, 500\u00a0ep", "r1": "DETR-R50, 50\u00a0ep", "r2": "+ MasKD",
                                   "r3": "+ MasKD", "r4": "Alone"}
    assert figure_labels(rows, with_group=True)["r3"] == "+ MasKD · RetinaNet"


def test_every_registry_table_gets_readable_figures() -> None:
    """Each table of configs/tables.yaml, from made-up results (ok, missing, cited), draws figures
    whose ticks are the rows' labels and whose title and labels fit in the figure."""
    registry = load_registry(REPO / "configs" / "tables.yaml")
    for name, table in registry.tables.items():
        rows: list[GatheredRow] = []
        for i, row in enumerate(table.rows):
            if row.experiment is None:
                rows.append(GatheredRow(row, STATUS_CITED, None, {m: NAN for m in table.metrics}))
            elif i % 4 == 3:
                rows.append(GatheredRow(row, STATUS_MISSING, RunResult(run_dir="x"),
                                        {m: NAN for m in table.metrics}))
            else:
                ap = 30.0 + 0.37 * i  # distinct, so no gain is a true 0
                run = RunResult(run_dir="x", metrics={m: ap / 100 for m in table.metrics},
                                curve=[(1.0, 0.1), (2.0, ap / 100)], loss_curve=[(0.0, 3.0), (1.0, 2.0)])
                rows.append(GatheredRow(row, STATUS_OK, run, {m: ap for m in table.metrics}))
        rows = _with_gains(table, rows)
        names = figure_labels(rows)
        fig = build_ap_bars(table, rows, "smoke")
        ap_axes = _axes(fig, "ap")
        assert [_text(t) for t in ap_axes.get_xticklabels()] == [  # type: ignore[attr-defined]
            names[g.row.id].replace("\u00a0", " ") for g in rows], name
        # No bar of height 0 stands for a missing number.
        assert all(h != 0 for ax in fig.axes for series in _bars(ax).values() for _, h in series), name
        has_gain = any(g.row.gain_over for g in rows)
        assert bool([a for a in fig.axes if a.get_label() == "gain"]) == has_gain, name
        if not any(g.row.paper.get("AP") is not None for g in rows):
            assert "paper" not in _bars(ap_axes), name
        _assert_everything_inside(fig)
        _assert_everything_inside(build_curves(table, rows, "smoke"))


def test_a_combination_row_shows_the_sum_of_its_single_gains(tmp_path: Path) -> None:
    """The composition table: each method's gain over the student alone, and beside a
    combination's gain the sum of its single methods' gains (read from real run directories)."""
    import json as _json

    from replic.workflow.gather import gather_rows, render_csv, render_markdown
    from replic.workflow.registry import Row

    aps = {"base": 0.300, "a": 0.320, "b": 0.310, "ab": 0.335}
    for name, ap in aps.items():
        (tmp_path / "mini" / name / "eval").mkdir(parents=True)
        (tmp_path / "mini" / name / "eval" / "metrics.json").write_text(_json.dumps({"metrics": {"AP": ap}}))
    rows = [Row("base", "student", "s", experiment="base"),
            Row("a", "+ A", "s", experiment="a", gain_over="base"),
            Row("b", "+ B", "s", experiment="b", gain_over="base"),
            Row("ab", "+ A + B", "s", experiment="ab", gain_over="base", sum_of=["a", "b"])]
    table = Table(title="composition", source="s", metrics=["AP"], rows=rows)
    gathered = gather_rows(table, "mini", tmp_path)
    assert gathered[3].gain_ours == {"AP": 3.5} and gathered[3].gain_sum == {"AP": 3.0}
    csv_rows = {r["row_id"]: r for r in csv.DictReader(io.StringIO(render_csv("composition", table, "mini", gathered)))}
    assert csv_rows["ab"]["sum_of"] == "a + b" and csv_rows["ab"]["AP_gain_sum_of_singles"] == "3"
    assert csv_rows["a"]["AP_gain_sum_of_singles"] == "" and csv_rows["ab"]["AP_gain_ours"] == "3.5"
    assert "sum of single gains +3.0" in render_markdown("composition", table, "mini", gathered, "P")


def test_a_row_run_at_other_scales_is_neither_trained_nor_missing_here(tmp_path: Path) -> None:
    # A control row at mini only (e.g. a distilled row with the paper's weights, which at paper scale
    # is the default row): the DAG does not train it at paper scale and the table says why it is empty.
    from replic.config import ConfigError

    reg_path = _registry(tmp_path)
    data = yaml.safe_load(reg_path.read_text())
    data["tables"]["demo"]["rows"].append({"id": "mini_only", "label": "Mini only", "source": "control",
                                           "experiment": "exp_mini_only", "scales": ["mini"], "paper": {}})
    reg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    registry = load_registry(reg_path)
    assert "exp_mini_only" in registry.experiments(["demo"], "mini")
    assert "exp_mini_only" in registry.experiments(["demo"])
    assert "exp_mini_only" not in registry.experiments(["demo"], "smoke")
    _fabricate_runs(tmp_path / "runs")
    out = tmp_path / "results"
    gather(registry, reg_path, "demo", "smoke", tmp_path / "runs", out)
    assert _rows(out / "table_demo.csv")["mini_only"]["status"] == "other scale"
    assert "run at other scales only" in (out / "table_demo.md").read_text()
    data["tables"]["demo"]["rows"][-1]["scales"] = ["tiny"]
    reg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"rows\[5\].*scales: \['tiny'\]"):
        load_registry(reg_path)
