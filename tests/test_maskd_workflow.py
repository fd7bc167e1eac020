"""MasKD in the registry and the DAG: teacher → tokens → students → evaluations → tables at paper scale
(dry run), and the CI table end to end at a shortened smoke scale with the receptive-token figures.

The shortened smoke scale (tests/test_d3etr_workflow.shortened_smoke: every run stops after 8 steps;
token runs keep their own smoke budget of 20 steps) keeps this to seconds per run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re

import pytest

from replic.workflow.methods import token_runs
from replic.workflow.registry import experiment_teacher, load_registry
from test_d3etr_workflow import shortened_smoke
from test_workflow import REPO, copy_workflow, job_counts, snakemake, stub_coco

EXP = REPO / "configs" / "experiments"
TABLES = ("maskd", "maskd_tokens", "maskd_ablations")


def test_registry_rows_teachers_and_token_runs():
    reg = load_registry(REPO / "configs" / "tables.yaml", EXP)
    published = {r.id: r.paper.get("AP") for r in reg.table("maskd").rows}
    assert published["maskd_frcnn_r50"] == 41.0 and published["maskd_retinanet_r50"] == 39.9
    assert published["maskd_fcos_r50"] == 42.9 and published["retinanet_r101"] == 38.9
    cited = [r for r in reg.table("maskd").rows if r.experiment is None]
    assert {r.group for r in cited} == {"stronger teacher"} and len(cited) == 3
    assert all(v is None for r in reg.table("maskd_tokens").rows[1:] for v in r.paper.values())
    # Each MasKD student names the R101 teacher of its detector and a token run learned on that teacher
    # with the student's T (the token run's own method.teacher).
    for name in reg.experiments(list(TABLES)):
        if not name.startswith("maskd_"):
            continue
        arch, epochs = name.split("_")[1], "50ep" if "cdetr" in name else "24ep"
        assert experiment_teacher(EXP / f"{name}.yaml") == ("experiment", f"{arch}_r101_{epochs}"), name
        tokens = experiment_teacher(EXP / f"{name}.yaml", key="tokens")
        if name.endswith(("_random", "_allones")):  # no token run: random tokens, one all-ones mask
            assert tokens is None
            continue
        assert tokens[0] == "experiment" and experiment_teacher(EXP / f"{tokens[1]}.yaml") == (
            "experiment", f"{arch}_r101_{epochs}")
        t = re.search(r"_t(\d+)$", name)
        assert re.search(rf"_t{t.group(1) if t else 6}(_|$)", tokens[1]), (name, tokens[1])
    assert len(token_runs(reg.experiments(list(TABLES)), EXP)) == 12


def test_paper_scale_dag_trains_teacher_then_tokens_then_students(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    result = snakemake(workdir, "results/table_maskd.csv", "results/table_maskd_tokens.csv", "-n", "-p",
                       "--config", "scale=paper", f"coco_root={coco}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reg = load_registry(REPO / "configs" / "tables.yaml")
    evaluated = reg.experiments(["maskd", "maskd_tokens"], "paper")  # the mini-only control rows are not run here
    tokens = token_runs(evaluated, EXP)
    assert len(evaluated) == 17 and len(tokens) == 9  # 3 DETR runs and 1 token run beyond the paper
    assert job_counts(result.stdout) == {"check_data": 1, "scale_overlay": 1, "train": len(evaluated) + len(tokens),
                                         "evaluate": len(evaluated), "table": 2,
                                         "total": 2 * len(evaluated) + len(tokens) + 4}
    inputs = [line for line in result.stdout.splitlines()
              if line.strip().startswith("input: configs/experiments/") and "data.json" in line]
    student = next(line for line in inputs if "experiments/maskd_retinanet_r50_24ep.yaml" in line)
    assert "runs/paper/retinanet_r101_24ep/checkpoint_final.pt" in student
    assert "runs/paper/maskd_tokens_retinanet_r101_24ep_t6/checkpoint_final.pt" in student
    token_job = next(line for line in inputs if "experiments/maskd_tokens_retinanet_r101_24ep_t6.yaml" in line)
    assert "runs/paper/retinanet_r101_24ep/checkpoint_final.pt" in token_job and "maskd_tokens_" not in token_job.split(
        "data.json")[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smoke_ci_table_end_to_end_with_token_figures(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    targets = ["results/table_maskd_smoke_ci.csv", "results/figures/table_maskd_smoke_ci_receptive_tokens.json"]
    result = snakemake(workdir, *targets, "--cores", "2", "--config", shortened_smoke(workdir), timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (workdir / "results" / "table_maskd_smoke_ci.csv").open() as handle:
        rows = {r["row_id"]: r for r in csv.DictReader(handle)}
    assert all(r["status"] == "ok" and r["AP_ours"] != "" for r in rows.values())
    assert rows["maskd_retinanet_r50"]["AP_gain_ours"] != ""
    runs = workdir / "runs" / "smoke"
    assert sorted(p.name for p in runs.iterdir() if (p / "done.json").is_file()) == [
        "maskd_retinanet_r50_24ep", "maskd_tokens_retinanet_r101_24ep_t6", "retinanet_r101_24ep", "retinanet_r50_24ep"]
    method = json.loads((runs / "maskd_retinanet_r50_24ep" / "provenance.json").read_text())["method"]
    for key, run in (("teacher", "retinanet_r101_24ep"), ("tokens", "maskd_tokens_retinanet_r101_24ep_t6")):
        sha = hashlib.sha256((runs / run / "checkpoint_final.pt").read_bytes()).hexdigest()
        assert method[key]["sha256"] == sha, key
    # (8 steps log no metrics line at log_every 10: the loss terms are checked by test_maskd_engine.py.)
    assert method["name"] == "maskd" and method["options"]["loss_weight"] == 7.0
    index = json.loads((workdir / "results" / "figures" / "table_maskd_smoke_ci_receptive_tokens.json").read_text())
    (run,) = index["runs"].values()
    assert run["num_tokens"] == 6 and sorted(run["levels"]) == ["P3", "P4", "P5", "P6", "P7"]
    figures = workdir / run["figures"]
    assert all((figures / f"{kind}_{level}.png").stat().st_size > 1000 for kind in ("masks", "dice")
               for level in run["levels"])
    _execute_notebook(runs / "maskd_tokens_retinanet_r101_24ep_t6" / "checkpoint_final.pt", workdir / "data" / "tiny",
                      tmp_path / "notebook")


def _execute_notebook(checkpoint, data_root, out_dir):
    """notebooks/receptive_tokens.ipynb on this token run: it displays the masks and the Dice matrix,
    writes every level's figures and a summary whose weights are a softmax over the tokens."""
    import nbclient
    import nbformat

    from test_notebooks import NOTEBOOKS, _inject_parameters, _stored_clean

    path = NOTEBOOKS / "receptive_tokens.ipynb"
    _stored_clean(path)
    nb = nbformat.read(path, as_version=4)
    _inject_parameters(nb, {"checkpoint": str(checkpoint), "data_root": str(data_root), "out_dir": str(out_dir),
                            "images": ["@0", "@1"], "level": "P4"})
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the notebook should display the masks and the Dice matrix"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["num_tokens"] == 6 and "P4" in summary["levels"] and len(summary["levels"]) == 5
    for facts in summary["levels"].values():
        assert abs(sum(facts["mean_weight"]) - 1.0) < 1e-5  # p is a softmax over the tokens
        # A mask's Dice with itself is 1 unless the mask is all zero (a saturated smoke token).
        assert all(abs(facts["dice"][i][i] - 1.0) < 1e-4 for i in range(6) if facts["mean_mask"][i] > 1e-4)
        assert all(0.0 <= v <= 1.0 + 1e-5 for row in facts["dice"] for v in row)
    assert len(list(out_dir.glob("*.png"))) == 10
    tables = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert any("off-diagonal Dice" in o["data"]["text/html"] for o in tables)
