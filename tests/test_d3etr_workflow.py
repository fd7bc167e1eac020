"""D³ETR in the registry and the DAG: published gains beside ours, the teacher as an input of
its students' training, per-scale teacher sizes, and the two tables run end to end.

The end-to-end runs use a shortened smoke scale (a copy of configs/scales/smoke.yaml with
train.max_steps: 4, passed with --config scales_dir=…) so CI pays seconds per run; the real
smoke numbers (full smoke schedule) are in docs/d3etr.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from replic.config import ConfigError
from replic.engine.config import resolve_raw
from replic.workflow.gather import gather
from replic.workflow.registry import SCALES, experiment_teacher, load_registry
from test_workflow import REPO, copy_workflow, job_counts, snakemake, stub_coco

TABLES = ("d3etr", "d3etr_ablations")
STUDENTS_12EP = ("d3etr_cdetr_r50_12ep", "d3etr_cdetr_r50_12ep_adaptive", "d3etr_cdetr_r50_12ep_fixed",
                 "d3etr_cdetr_r50_12ep_pred", "d3etr_cdetr_r50_12ep_pred_sa", "d3etr_cdetr_r50_12ep_teacher_refs",
                 "d3etr_cdetr_r50_12ep_paperw")


def _registry_file(tmp_path: Path, rows: list[dict]) -> Path:
    data = {"version": 1, "paper": "P", "compute": {
        s: {"train": {"threads": 1, "runtime": 1}, "eval": {"threads": 1, "runtime": 1}} for s in SCALES},
        "tables": {"t": {"title": "T", "source": "S", "paper": "D3", "note": "claim", "metrics": ["AP", "AP50"],
                         "rows": rows}}}
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("row", "message"), [
    ({"id": "b", "label": "B", "source": "s", "paper_gain": {"AP": 1.0}}, "a gain needs 'gain_over'"),
    ({"id": "b", "label": "B", "source": "s", "gain_over": "zz", "paper_gain": {"AP": 1.0}}, "'zz' is not another row"),
    ({"id": "b", "label": "B", "source": "s", "gain_over": "a", "paper_gain": {"APs": 1.0}}, "'APs' is not a measured"),
])
def test_bad_gain_rows_are_refused(tmp_path, row, message):
    path = _registry_file(tmp_path, [{"id": "a", "label": "A", "source": "s"}, row])
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


def test_gather_shows_the_papers_gain_beside_ours(tmp_path):
    rows = [{"id": "base", "label": "student", "source": "s", "experiment": "base_run"},
            {"id": "kd_v1", "label": "KD v1", "source": "arXiv v1", "experiment": "kd_run", "gain_over": "base",
             "paper_gain": {"AP": 7.8}},
            {"id": "kd_v2", "label": "KD v2", "source": "IJCAI", "experiment": "kd_run", "gain_over": "base",
             "paper_gain": {"AP": 8.3}}]
    path = _registry_file(tmp_path, rows)
    for run, ap in (("base_run", 0.20), ("kd_run", 0.25)):
        (tmp_path / "runs" / "smoke" / run / "eval").mkdir(parents=True)
        (tmp_path / "runs" / "smoke" / run / "eval" / "metrics.json").write_text(
            json.dumps({"metrics": {"AP": ap, "AP50": ap + 0.1}}))
    gather(load_registry(path), path, "t", "smoke", tmp_path / "runs", tmp_path / "out")
    with (tmp_path / "out" / "table_t.csv").open() as handle:
        table = {r["row_id"]: r for r in csv.DictReader(handle)}
    assert table["kd_v1"]["gain_over"] == "base" and table["base"]["gain_over"] == ""
    assert (table["kd_v1"]["AP_gain_paper"], table["kd_v1"]["AP_gain_ours"], table["kd_v1"]["AP_gain_diff"]) == \
        ("7.8", "5", "-2.8")
    assert table["kd_v2"]["AP_gain_diff"] == "-3.3" and "AP50_gain_paper" not in table["kd_v1"]
    md = (tmp_path / "out" / "table_t.md").read_text()
    assert "of D3." in md and "Note: claim" in md and "base: +8.3 / +5.0 (-3.3)" in md
    prov = json.loads((tmp_path / "out" / "table_t.provenance.json").read_text())
    assert prov["rows"][1]["gain_cells"]["AP"] == {"paper": 7.8, "ours": 5.0}


def test_registry_rows_of_the_d3etr_tables():
    reg = load_registry(REPO / "configs" / "tables.yaml", REPO / "configs" / "experiments")
    gains = {(r.id, r.source.split(" ")[0], r.paper_gain.get("AP")) for r in reg.table("d3etr").rows if r.paper_gain}
    assert gains == {("d3etr_r50_12ep_arxiv", "arXiv", 7.8), ("d3etr_r50_12ep_ijcai", "IJCAI", 8.3),
                     ("d3etr_r50_50ep_arxiv", "arXiv", 2.4)}
    ablations = reg.table("d3etr_ablations")
    assert all(v is None for r in ablations.rows for v in r.paper.values()) and "beat either alone" in ablations.note
    # Every D³ETR student names the R101 teacher, itself a row of the main table (trained once, shared).
    students = [e for e in reg.experiments(list(TABLES)) if e.startswith("d3etr_")]
    assert sorted(students) == sorted([*STUDENTS_12EP, "d3etr_cdetr_r50_50ep"])
    for name in students:
        assert experiment_teacher(REPO / "configs" / "experiments" / f"{name}.yaml") == ("experiment", "cdetr_r101_50ep")
    assert experiment_teacher(REPO / "configs" / "experiments" / "cdetr_r50_12ep.yaml") is None


def test_teacher_is_stronger_than_its_student_at_smoke_scale_only(tmp_path):
    exp = REPO / "configs" / "experiments"
    teacher, student = resolve_raw(exp / "cdetr_r101_50ep.yaml", "smoke"), resolve_raw(exp / "d3etr_cdetr_r50_12ep.yaml", "smoke")
    assert (teacher["model"]["backbone"], student["model"]["backbone"]) == ("resnet34", "resnet18")
    assert teacher["train"]["epochs"] > 2 * student["train"]["epochs"]
    for key in ("hidden_dim", "nheads", "dec_layers", "num_queries"):  # what fixed matching needs equal
        assert teacher["model"][key] == student["model"][key], key
    # Mini: the shared frozen backbone (cached maps), a deeper encoder and twice the schedule.
    teacher, student = resolve_raw(exp / "cdetr_r101_50ep.yaml", "mini"), resolve_raw(exp / "d3etr_cdetr_r50_12ep.yaml", "mini")
    assert teacher["model"]["backbone"] == student["model"]["backbone"]
    assert teacher["model"]["enc_layers"] > student["model"]["enc_layers"]
    assert teacher["train"]["epochs"] == 2 * resolve_raw(exp / "d3etr_cdetr_r50_50ep.yaml", "mini")["train"]["epochs"]
    for key in ("hidden_dim", "nheads", "dec_layers", "num_queries"):
        assert teacher["model"][key] == student["model"][key], key
    paper = resolve_raw(exp / "cdetr_r101_50ep.yaml", "paper")
    assert paper["model"]["backbone"] == "resnet101" and paper["train"]["epochs"] == 50
    assert "scale_overrides" not in teacher
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {exp / 'cdetr_r50_12ep.yaml'}\nscale_overrides: {{smoek: {{train: {{epochs: 1}}}}}}\n")
    with pytest.raises(ConfigError, match="scale_overrides.smoek: unknown scale"):
        resolve_raw(bad, "smoke")


def test_paper_scale_dag_trains_the_teacher_once_before_its_students(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    coco = stub_coco(tmp_path / "coco")
    result = snakemake(workdir, "results/table_d3etr.csv", "results/table_d3etr_ablations.csv", "-n", "-p",
                       "--profile", "slurm", "--config", "scale=paper", f"coco_root={coco}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = len(load_registry(REPO / "configs" / "tables.yaml").experiments(list(TABLES), "paper"))
    assert runs == 10
    assert job_counts(result.stdout) == {"check_data": 1, "scale_overlay": 1, "train": runs, "evaluate": runs,
                                         "table": 2, "total": 2 * runs + 4}
    teacher = "runs/paper/cdetr_r101_50ep/checkpoint_final.pt"
    train_inputs = [line for line in result.stdout.splitlines()
                    if line.strip().startswith("input: configs/experiments/") and "data.json" in line]
    students = [line for line in train_inputs if "experiments/d3etr_" in line]
    assert len(students) == 7 and all(teacher in line for line in students)
    assert not any(teacher in line for line in train_inputs if line not in students)
    assert result.stdout.count("torchrun --standalone --nnodes=1 --nproc_per_node=8 -m replic") == runs


def shortened_smoke(workdir: Path, steps: int = 4) -> str:
    """A scales dir in the workflow copy whose smoke overlay stops every run after ``steps`` steps."""
    scales = workdir / "scales_short"
    scales.mkdir()
    overlay = yaml.safe_load((workdir / "configs" / "scales" / "smoke.yaml").read_text())
    overlay["train"]["max_steps"] = steps
    (scales / "smoke.yaml").write_text(yaml.safe_dump(overlay))
    return f"scales_dir={scales.name}"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smoke_run_of_both_d3etr_tables(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    targets = [f"results/table_{t}.csv" for t in TABLES]
    result = snakemake(workdir, *targets, "--cores", "2", "--config", shortened_smoke(workdir), timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reg = load_registry(REPO / "configs" / "tables.yaml")
    for name in TABLES:
        with (workdir / "results" / f"table_{name}.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == len(reg.table(name).rows)
        for row in rows:
            if row["status"] == "other scale":  # a mini-only row (the paper-weight control)
                continue
            if row["experiment"]:
                assert row["status"] == "ok" and row["AP_ours"] != "", row
            if row["gain_over"]:
                assert row["AP_gain_ours"] != "", row
    runs = workdir / "runs" / "smoke"
    assert sorted(p.name for p in runs.iterdir() if (p / "done.json").is_file()) == reg.experiments(list(TABLES), "smoke")
    # Every student learnt from the one teacher run: its sha256 is in each student's provenance.
    sha = hashlib.sha256((runs / "cdetr_r101_50ep" / "checkpoint_final.pt").read_bytes()).hexdigest()
    smoke_runs = reg.experiments(list(TABLES), "smoke")
    for student in (s for s in (*STUDENTS_12EP, "d3etr_cdetr_r50_50ep") if s in smoke_runs):
        method = json.loads((runs / student / "provenance.json").read_text())["method"]
        assert method["name"] == "d3etr" and method["teacher"]["sha256"] == sha, student
    config = yaml.safe_load((runs / "cdetr_r101_50ep" / "config.yaml").read_text())
    assert config["model"]["backbone"] == "resnet34" and config["train"]["max_steps"] == 4


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_teacher_and_student_through_slurm(tmp_path):
    """One D³ETR student and its teacher, each trained in its own sbatch job (shortened smoke)."""
    from test_workflow_slurm import _slurm_up

    if not _slurm_up():
        if os.environ.get("REPLIC_TEST_SLURM") == "1":
            pytest.fail("REPLIC_TEST_SLURM=1 but no Slurm controller answers sinfo (run .ci/slurm/start.sh)")
        pytest.skip("no Slurm controller (start one with .ci/slurm/start.sh, as root)")
    workdir = copy_workflow(tmp_path / "wf")
    target = "runs/smoke/d3etr_cdetr_r50_12ep_pred/done.json"
    result = snakemake(workdir, target, "--profile", "profiles/slurm-ci", "--config", shortened_smoke(workdir, 4),
                       timeout=800)
    if result.returncode in (124, 137):
        snakemake(workdir, "--unlock")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("has been submitted with SLURM jobid") == 3  # synth data, teacher, student
    runs = workdir / "runs" / "smoke"
    student = json.loads((runs / "d3etr_cdetr_r50_12ep_pred" / "provenance.json").read_text())
    teacher = json.loads((runs / "cdetr_r101_50ep" / "provenance.json").read_text())
    assert "SLURM_JOB_ID" in json.dumps(student) and "SLURM_JOB_ID" in json.dumps(teacher)
    sha = hashlib.sha256((runs / "cdetr_r101_50ep" / "checkpoint_final.pt").read_bytes()).hexdigest()
    assert student["method"]["teacher"]["sha256"] == sha


@pytest.mark.parametrize("name", [*STUDENTS_12EP, "d3etr_cdetr_r50_50ep"])
def test_d3etr_experiments_validate_at_paper_scale_without_reading_data(name):
    from replic.engine.config import load_experiment

    cfg = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml", "paper",
                          {"data": {"root": "/nonexistent/replic-data"}})
    epochs = 50 if "_50ep" in name else 12
    assert (cfg.train.epochs, cfg.train.lr_drop) == ((50, 40) if epochs == 50 else (12, 11))
    assert cfg.model.backbone == "resnet50" and cfg.model.num_classes == 91 and cfg.train.batch_size == 2
    assert cfg.method["name"] == "d3etr" and cfg.method["teacher"] == {"experiment": "cdetr_r101_50ep"}
    # Every option is written out, so the resolved config records each choice.
    from replic.methods.d3etr import D3ETROptions

    assert set(cfg.method) - {"name"} == set(D3ETROptions.__dataclass_fields__)
