"""D³ETR through the real engine: `replic train` with a DAG-run teacher, `replic eval` of the student,
a misfit teacher refused before training, and 2-process DDP == 1 process.

DDP tolerance: as tests/test_engine_ddp.py (same images, dropout 0, frozen BatchNorm; only the
order of float reductions differs): logged losses, distillation terms included, within 1e-5
relative, parameters within 1e-5 absolute after 4 steps at lr 1e-4. The adaptive matching is
per image and every term is a per-pair / per-row mean, so each process's mean of its equal
share of pairs, averaged over processes, is the 1-process mean.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from engine_testutil import EXPERIMENT, TINY_SETTINGS, make_uniform_coco, metric_lines, run, train_command
from replic.config import to_dict
from replic.engine.config import load_experiment, parse_overrides
from replic.models.build import build_model

SAME_SIZE = ["data.train_scales=[64]", "data.max_size=64", "data.resize_only_prob=1.0",
             "data.val_size=64", "data.val_max_size=64", "model.dropout=0.0",
             "train.max_steps=4", "train.epochs=1", "train.lr_drop=1", "eval.batch_size=2",
             "train.lr=1e-4", "train.lr_backbone=1e-5"]


def _write_teacher(path: Path, data: Path, name: str = "teacher_run", extra: list[str] = ()) -> str:
    """A teacher checkpoint of the tiny model (as `replic train` writes checkpoint_final.pt); its sha256."""
    overrides = parse_overrides([f"data.root={data}", *TINY_SETTINGS, *extra])
    cfg = load_experiment(EXPERIMENT, "smoke", overrides)
    torch.manual_seed(7)
    model = build_model(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": to_dict(cfg.model), "config": {"name": name}}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_uniform_coco(tmp_path_factory.mktemp("d3etr") / "data", n_train=8, n_val=4)


def test_student_trains_from_a_sibling_teacher_run_and_evaluates_as_a_plain_detector(tmp_path, data):
    runs = tmp_path / "runs" / "smoke"
    teacher = runs / "teacher_run" / "checkpoint_final.pt"
    sha = _write_teacher(teacher, data)
    student = runs / "student"
    result = run(train_command(student, data, ["train.max_steps=3", "train.epochs=1", "train.lr_drop=1",
                                               "train.eval_at_end=false", "method.name=d3etr",
                                               "method.teacher.experiment=teacher_run"]))
    assert result.returncode == 0, result.stderr[-3000:]
    prov = json.loads((student / "provenance.json").read_text())["method"]
    assert prov["name"] == "d3etr" and prov["teacher"]["sha256"] == sha
    assert prov["teacher"]["path"] == str(teacher.resolve()) and prov["options"]["matching"] == "mix"
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == sha  # never written to
    steps = [r for r in metric_lines(student) if r["type"] == "step"]
    assert len(steps) == 3 and steps[0]["d3_ada_cross_attn"] > 0 and "d3_fix_class_0" in steps[0]
    # The student checkpoint is a plain Conditional DETR: `replic eval` with the plain experiment.
    ckpt = torch.load(student / "checkpoint_final.pt", weights_only=True)
    assert "method" not in ckpt and not any("teacher" in k for k in ckpt["model"])
    evaluation = run([sys.executable, "-m", "replic", "eval", "--config", str(EXPERIMENT), "--scale", "smoke",
                      "--checkpoint", str(student / "checkpoint_final.pt"), "--out", str(tmp_path / "eval"),
                      "--threads", "1", "--no-progress", "--set", f"data.root={data}",
                      *[a for s in TINY_SETTINGS for a in ("--set", s)]])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "AP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]


def test_missing_teacher_exits_2_before_training(tmp_path, data, capsys):
    # In process (the CLI's own main), so the check costs no interpreter start. (A teacher of
    # another class count / hidden size: tests/test_d3etr.py, the same check_inputs path.)
    from replic.cli import main

    argv = train_command(tmp_path / "a", data, ["method.name=d3etr", f"method.teacher.checkpoint={tmp_path / 'nope.pt'}"])
    assert main(argv[3:]) == 2
    err = capsys.readouterr().err
    assert "teacher checkpoint not found" in err and "nope.pt" in err
    assert not (tmp_path / "a" / "checkpoints").exists()


def _torchrun(cmd: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", *cmd[2:]]


@pytest.mark.slow
def test_two_processes_with_a_teacher_match_one_process(tmp_path):
    data = make_uniform_coco(tmp_path / "data", n_train=16, n_val=4)
    teacher = tmp_path / "teacher.pt"
    _write_teacher(teacher, data, extra=SAME_SIZE)
    method = ["method.name=d3etr", f"method.teacher.checkpoint={teacher}", "train.eval_at_end=false"]
    single = run(train_command(tmp_path / "single", data, [*SAME_SIZE, *method, "train.batch_size=4"]))
    assert single.returncode == 0, single.stderr[-3000:]
    double = run(_torchrun(train_command(tmp_path / "ddp", data, [*SAME_SIZE, *method, "train.batch_size=2"]), 2))
    assert double.returncode == 0, double.stderr[-3000:] + double.stdout[-2000:]
    assert json.loads((tmp_path / "ddp" / "provenance.json").read_text())["world_size"] == 2
    steps_a = [r for r in metric_lines(tmp_path / "single") if r["type"] == "step"]
    steps_b = [r for r in metric_lines(tmp_path / "ddp") if r["type"] == "step"]
    assert [r["step"] for r in steps_a] == [r["step"] for r in steps_b] == [1, 2, 3, 4]
    terms = [k for k in steps_a[0] if k.startswith("d3_")]
    assert len(terms) == 20  # 5 signals x 2 layers x 2 matchings
    for ra, rb in zip(steps_a, steps_b):
        for term in ("loss", "loss_ce", *terms):
            assert rb[term] == pytest.approx(ra[term], rel=1e-5, abs=1e-9), (ra["step"], term)
    assert steps_a[0]["loss"] != steps_a[-1]["loss"]
    a = torch.load(tmp_path / "single" / "checkpoint_final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "checkpoint_final.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=f"parameter {key}")
