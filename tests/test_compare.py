"""``replic compare RUN_A RUN_B`` on two REAL tiny runs of ``replic train`` that differ in one
``--set`` value (the seed), and the AP points of the eval log line those runs print."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from replic.cli import main
from replic.eval.coco_eval import format_ap_points

from engine_testutil import make_uniform_coco, run, train_command

pytestmark = pytest.mark.timeout(300)

SHORT = ["train.epochs=1", "train.lr_drop=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("compare")
    data = make_uniform_coco(root / "data", n_train=4, n_val=2)
    out: dict[str, object] = {}
    for name, extra in (("a", SHORT), ("b", [*SHORT, "seed=7"])):
        result = run(train_command(root / name, data, extra))
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = root / name
        out[f"{name}_stderr"] = result.stderr
    return out


def _compare(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["compare", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]


def test_text_report_names_the_one_differing_key_and_no_equal_one(runs, capsys):
    rc, out, err = _compare(capsys, str(runs["a"]), str(runs["b"]))
    assert rc == 0, err
    assert "config: 1 resolved key(s) differ" in out
    assert "  seed: 42 -> 7" in out.splitlines()
    # Keys equal in both resolved configs are not listed.
    for equal in ("train.epochs", "train.lr_drop", "model.hidden_dim", "data.root", "name"):
        assert not re.search(rf"^\s+{re.escape(equal)}:", out, re.M), out
    # Metrics in AP points with the difference; code and environment of both runs.
    ap_a, ap_b = (100 * _metrics(runs[k])["AP"] for k in ("a", "b"))
    ap_line = next(line for line in out.splitlines() if line.strip().startswith("AP "))
    assert ap_line.split() == ["AP", f"{ap_a:.1f}", "->", f"{ap_b:.1f}", f"({ap_b - ap_a:+.1f})"]
    commit = json.loads((runs["a"] / "provenance.json").read_text())["git"]["commit"]
    assert f"commit: {commit} -> {commit} (same)" in out
    assert "dirty: " in out and "packages: same versions" in out


def test_json_is_one_object_with_the_same_content(runs, capsys):
    rc, out, _ = _compare(capsys, str(runs["a"]), str(runs["b"]), "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["config"] == {"same": False, "differences": {"seed": {"a": 42, "b": 7}}}
    metrics_a, metrics_b = _metrics(runs["a"]), _metrics(runs["b"])
    values = result["metrics"]["values"]
    assert list(values)[:3] == ["AP", "AP50", "AP75"] and set(values) == set(metrics_a) & set(metrics_b)
    assert values["AP50"]["a"] == pytest.approx(100 * metrics_a["AP50"])
    assert values["AP50"]["diff"] == pytest.approx(100 * (metrics_b["AP50"] - metrics_a["AP50"]))
    assert result["code"]["commit"]["a"] == result["code"]["commit"]["b"]
    assert result["code"]["packages"] == {}


def test_same_run_and_changed_environment_and_metrics(runs, capsys, tmp_path):
    rc, out, _ = _compare(capsys, str(runs["a"]), str(runs["a"]))
    assert rc == 0 and "config: same resolved config" in out

    # A copy of run A scored differently, on another torch, from a dirty tree.
    copy = tmp_path / "copy"
    shutil.copytree(runs["a"], copy)
    record = json.loads((copy / "eval" / "metrics.json").read_text())
    record["metrics"].update(AP=0.25, AP50=0.399)
    (copy / "eval" / "metrics.json").write_text(json.dumps(record))
    provenance = json.loads((copy / "provenance.json").read_text())
    provenance["packages"]["torch"] = "0.0.1-test"
    provenance["git"]["dirty"] = not provenance["git"]["dirty"]
    (copy / "provenance.json").write_text(json.dumps(provenance))

    rc, out, _ = _compare(capsys, str(runs["a"]), str(copy))
    assert rc == 0 and "config: same resolved config" in out
    ap_a = 100 * _metrics(runs["a"])["AP"]
    assert f"AP     {ap_a:>6.1f} ->   25.0  ({25.0 - ap_a:+.1f})" in out
    assert "AP50" in out and "39.9" in out
    torch_a = json.loads((runs["a"] / "provenance.json").read_text())["packages"]["torch"]
    assert f"package torch: {torch_a} -> 0.0.1-test" in out
    assert "package numpy" not in out  # equal versions are not listed
    dirty_a = not provenance["git"]["dirty"]
    assert f"dirty: {dirty_a} -> {not dirty_a}" in out


def test_eval_log_line_prints_ap_points(runs):
    # metrics.json keeps pycocotools' fractions; the log line prints the tables' points.
    for name in ("a", "b"):
        metrics = _metrics(runs[name])
        assert 0.0 <= metrics["AP"] <= 1.0
        line = next(ln for ln in runs[f"{name}_stderr"].splitlines() if " eval AP " in ln)
        assert f"eval AP {100 * metrics['AP']:.1f} AP50 {100 * metrics['AP50']:.1f} (" in line, line
    assert format_ap_points({"AP": 0.25, "AP50": 0.3994}) == "AP 25.0 AP50 39.9"
    assert format_ap_points({"AP": float("nan"), "AP50": None}) == "AP n/a AP50 n/a"


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "bad-provenance"])
def test_bad_input_is_one_line_naming_the_path(runs, capsys, tmp_path, case):
    if case == "missing":
        bad, named = tmp_path / "nowhere", tmp_path / "nowhere"
    elif case == "file":
        bad = named = tmp_path / "run.txt"
        bad.write_text("x")
    elif case == "no-config":
        bad = tmp_path / "empty"
        bad.mkdir()
        named = bad / "config.yaml"
    else:
        bad = tmp_path / "copy"
        shutil.copytree(runs["b"], bad)
        (bad / "provenance.json").write_text("{not json")
        named = bad / "provenance.json"
    rc, out, err = _compare(capsys, str(runs["a"]), str(bad))
    lines = err.strip().splitlines()
    assert rc == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("replic compare: error: "), err
    assert str(named) in lines[0]
