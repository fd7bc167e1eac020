"""Mini-scale tools: the convergence figure's inputs/outputs, and pretrain-backbone's input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from replic.viz.convergence import eval_points, main, render_csv

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, name: str, points: list[tuple[int, float]]) -> Path:
    run = tmp_path / name
    run.mkdir()
    lines = [{"type": "step", "step": s, "loss": 1.0} for s, _ in points]
    lines += [{"type": "eval", "step": s, "epoch": s / 10, "AP": ap, "AP50": 2 * ap, "AP75": ap / 2,
               "top_box_std": 0.1, "gt_box_std": 0.2, "images": 4} for s, ap in reversed(points)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_convergence_reads_eval_lines_in_step_order_and_writes_figure_and_csv(tmp_path):
    a = _run(tmp_path, "a", [(10, 0.1), (20, 0.2)])
    b = _run(tmp_path, "b", [(10, 0.05), (20, 0.3)])
    assert [p["step"] for p in eval_points(a)] == [10, 20]
    out = tmp_path / "fig" / "conv.png"
    assert main(["--run", f"DETR={b}", "--run", f"Conditional DETR={a}", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("run,replicate,step,AP,AP50")
    assert rows[1:] == render_csv({"DETR": [eval_points(b)], "Conditional DETR": [eval_points(a)]}).splitlines()[1:]
    assert rows[2] == "DETR,0,20,30.00,60.00,15.00,0.1000,0.2000,4,,"


def test_convergence_ends_on_the_final_evaluation_of_a_done_run(tmp_path):
    """A done and evaluated run's curve gets its final evaluation (every val image) at the last
    step, unless a periodic evaluation already sits at that step."""
    run = _run(tmp_path, "a", [(10, 0.1), (20, 0.2)])
    assert len(eval_points(run)) == 2  # not done yet
    (run / "done.json").write_text(json.dumps({"global_steps": 25}))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "metrics": {"AP": 0.25, "AP50": 0.5, "AP75": 0.125}, "eval": {"images": 8},
        "diagnostics": {"top_box_std": 0.15, "gt_box_std": 0.2}}))
    points = eval_points(run)
    assert [p["step"] for p in points] == [10, 20, 25] and points[-1]["final"]
    assert render_csv({"X": [points]}).splitlines()[-1] == "X,0,25,25.00,50.00,12.50,0.1500,0.2000,8,,"
    (run / "done.json").write_text(json.dumps({"global_steps": 20}))
    assert [p["AP"] for p in eval_points(run)] == [0.1, 0.2]  # the periodic point at 20 is kept
    (run / "done.json").write_text("{}")
    with pytest.raises(ValueError, match="done.json"):
        eval_points(run)


def test_convergence_with_seeds_draws_replicates_and_their_mean_and_states_the_gap(tmp_path, capsys):
    detr = [_run(tmp_path, "d0", [(10, 0.10), (20, 0.20)]), _run(tmp_path, "d1", [(10, 0.14), (20, 0.22)])]
    cdetr = [_run(tmp_path, "c0", [(10, 0.12), (20, 0.30)]), _run(tmp_path, "c1", [(10, 0.11), (20, 0.28)])]
    out = tmp_path / "seeds.png"
    args = [a for run in detr for a in ("--run", f"DETR={run}")] + [a for run in cdetr for a in ("--run", f"CDETR={run}")]
    assert main([*args, "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.with_suffix(".csv").read_text().splitlines()[1:]]
    assert len(rows) == 2 * 2 * 2 + 2 * 2  # (label, replicate, step) rows + a mean row per (label, step)
    mean_detr_20 = next(r for r in rows if r[:3] == ["DETR", "mean", "20"])
    assert mean_detr_20[3] == "21.00" and mean_detr_20[9] == "1.41"  # mean AP, sd AP (×100)
    printed = capsys.readouterr().out.splitlines()
    # step 10: CDETR 11.5 vs DETR 12.0 (ahead in 2 of 4 pairs); step 20: 29.0 vs 21.0 (4 of 4).
    assert printed == ["step 10: CDETR - DETR = -0.50 AP (means of 2 / 2 runs; CDETR ahead in 2 of 4 pairs)",
                       "step 20: CDETR - DETR = +8.00 AP (means of 2 / 2 runs; CDETR ahead in 4 of 4 pairs)"]


def test_convergence_refuses_a_run_without_periodic_evaluation(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"type": "step", "step": 1}) + "\n")
    assert main(["--run", f"X={run}", "--out", str(tmp_path / "x.png")]) == 2
    assert "eval_every" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/mini"], "instances_train2017.json"),
    (["--data", ".", "--steps", "0"], "--steps"),
])
def test_pretrain_backbone_bad_input_exits_2_naming_it(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "replic", "pretrain-backbone", *args, "--out",
                             str(tmp_path / "w.pt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and not (tmp_path / "w.pt").exists()
