"""MasKD through the real engine (replic.engine.train.Trainer, in process): stage 1 trains only the
tokens on a DAG-run teacher, stage 2 trains the student with teacher and tokens untouched, and a token
count that does not match the token run fails before training with exit 2.

Tiny RetinaNet (ResNet-18, FPN 32 channels, 64-px images, 3 steps): a few seconds per run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from engine_testutil import REPO, make_uniform_coco
from replic.config import to_dict
from replic.engine.config import load_experiment, parse_overrides
from replic.engine.train import Trainer
from replic.methods.maskd import TokenBank, token_state
from replic.models.families import family_of

EXP = REPO / "configs" / "experiments"
TINY = ["model.backbone=resnet18", "model.fpn_channels=32", "data.train_scales=[64]", "data.max_size=64",
        "data.val_size=64", "data.val_max_size=64", "train.batch_size=2", "train.log_every=1",
        "train.max_steps=3", "train.epochs=1", "train.eval_at_end=false", "train.warmup_iters=0",
        "train.lr_steps=[]"]


def _cfg(name: str, data: Path, extra: list[str] = ()):
    overrides = [f"data.root={data}", *TINY, *extra]
    if not name.startswith("maskd_tokens"):
        overrides += ["train.lr_schedule=step", "train.lr_drop=1"]
    return load_experiment(EXP / f"{name}.yaml", "smoke", parse_overrides(overrides))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Data, a teacher checkpoint at runs/smoke/teacher_run, the stage-1 run and the stage-2 run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("maskd")
    data = make_uniform_coco(root / "data", n_train=6, n_val=2)
    runs = root / "runs" / "smoke"
    teacher_cfg = _cfg("retinanet_r101_24ep", data)
    torch.manual_seed(11)
    teacher = family_of(teacher_cfg.model).build_model(teacher_cfg.model)
    teacher_file = runs / "teacher_run" / "checkpoint_final.pt"
    teacher_file.parent.mkdir(parents=True)
    torch.save({"model": teacher.state_dict(), "model_config": to_dict(teacher_cfg.model),
                "config": {"name": "teacher_run"}}, teacher_file)
    teacher_sha = _sha(teacher_file)

    tokens_cfg = _cfg("maskd_tokens_retinanet_r101_24ep_t6", data,
                      ["method.teacher.experiment=teacher_run", "train.max_steps=3"])
    tokens = Trainer(tokens_cfg, runs / "tokens_run", progress=False)
    assert tokens.run() == 0
    student_cfg = _cfg("maskd_retinanet_r50_24ep", data,
                       ["method.teacher.experiment=teacher_run", "method.tokens.experiment=tokens_run",
                        "method.custom_mask_warmup=1"])
    tokens_sha = _sha(runs / "tokens_run" / "checkpoint_final.pt")
    student = Trainer(student_cfg, runs / "student", progress=False)
    assert student.run() == 0
    return {"data": data, "runs": runs, "teacher": teacher, "teacher_sha": teacher_sha, "tokens_cfg": tokens_cfg,
            "tokens": tokens, "tokens_sha": tokens_sha, "student": student, "student_cfg": student_cfg}


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "step"]


def test_stage1_trains_only_the_tokens_and_leaves_the_teacher_bit_identical(runs):
    ckpt = torch.load(runs["runs"] / "tokens_run" / "checkpoint_final.pt", weights_only=True)
    teacher_state = runs["teacher"].state_dict()
    assert ckpt["model"].keys() == teacher_state.keys()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in teacher_state.items())
    assert _sha(runs["runs"] / "teacher_run" / "checkpoint_final.pt") == runs["teacher_sha"]
    # The tokens and weighting convs all moved from their seeded initial values.
    init = TokenBank([32] * 5, 6, True, torch.Generator().manual_seed(runs["tokens_cfg"].seed)).state_dict()
    learned = {k.removeprefix("tokens."): v for k, v in ckpt["method"].items()}
    assert learned.keys() == init.keys()
    assert all(not torch.equal(learned[k], v) for k, v in init.items() if k.endswith(("mask_token", "weight")))
    # Only the token parameters were in the optimizer.
    optimised = {id(p) for g in runs["tokens"].optimizer.param_groups for p in g["params"]}
    token_params = {id(p) for p in runs["tokens"].method.tokens.parameters()}
    assert optimised == token_params
    steps = _steps(runs["runs"] / "tokens_run")
    assert len(steps) == 3 and all(0 < s["loss_maskd_dice"] <= 5 and s["classification"] > 0 for s in steps)
    assert steps[0]["lr_main"] == pytest.approx(0.01 * (1 + 0.5) / 2 + 1e-6 * (1 - 0.5) / 2, rel=1e-4)  # cosine, step 1 of 3


def test_stage2_changes_neither_tokens_nor_teacher(runs):
    student = runs["student"]
    state, _ = token_state(runs["runs"] / "tokens_run" / "checkpoint_final.pt")
    frozen_tokens = student.method.frozen("tokens").state_dict()
    assert frozen_tokens.keys() == state.keys() and all(torch.equal(frozen_tokens[k], v) for k, v in state.items())
    frozen_teacher = student.method.frozen("teacher").state_dict()
    assert all(torch.equal(frozen_teacher[k], v) for k, v in runs["teacher"].state_dict().items())
    assert _sha(runs["runs"] / "tokens_run" / "checkpoint_final.pt") == runs["tokens_sha"]
    assert _sha(runs["runs"] / "teacher_run" / "checkpoint_final.pt") == runs["teacher_sha"]
    ckpt = torch.load(runs["runs"] / "student" / "checkpoint_final.pt", weights_only=True)
    # The method's checkpoint holds the align convs and the step counter only; the detector is plain.
    assert sorted(ckpt["method"]) == sorted([*(f"align.{i}.{p}" for i in range(5) for p in ("weight", "bias")), "step"])
    assert int(ckpt["method"]["step"]) == 3
    assert not any("mask_modules" in k or "teacher" in k for k in ckpt["model"])
    steps = _steps(runs["runs"] / "student")
    # The official RetinaNet recipe: the head term beside the feature loss, from a teacher-initialised
    # neck and head (the student and teacher differ at step 0 only in the ResNet body).
    assert all(s["loss_maskd"] > 0 and s["loss_maskd_head"] > 0 and s["classification"] > 0 for s in steps)
    prov = json.loads((runs["runs"] / "student" / "provenance.json").read_text())["method"]
    assert prov["teacher"]["sha256"] == runs["teacher_sha"] and prov["tokens"]["sha256"] == runs["tokens_sha"]
    assert prov["tokens"]["experiment"] == runs["tokens_cfg"].name
    assert prov["head_distill"] is True and prov["init_from_teacher"] is True


@pytest.mark.parametrize(("setting", "message"), [
    ("method.num_tokens=4", "has 6 tokens per level, but method.num_tokens is 4"),
    ("method.position=backbone", "tokens were learned at position 'fpn', but method.position is 'backbone'"),
])
def test_token_mismatch_exits_2_naming_both(runs, capsys, setting, message):
    from replic.cli import main

    out = runs["runs"] / f"student_bad_{setting.split('=')[0]}"
    argv = ["train", "--config", str(EXP / "maskd_retinanet_r50_24ep.yaml"), "--scale", "smoke", "--out", str(out),
            "--threads", "1", "--no-progress",
            *[a for s in [f"data.root={runs['data']}", *TINY, "train.lr_schedule=step", "train.lr_drop=1",
                          "method.teacher.experiment=teacher_run", "method.tokens.experiment=tokens_run",
                          setting] for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "tokens_run/checkpoint_final.pt" in err
    assert not (out / "checkpoints").exists()


def test_a_detr_model_is_refused_when_the_config_loads(runs):
    from replic.config import ConfigError

    with pytest.raises(ConfigError, match="model.family: MasKD taps FPN features"):
        load_experiment(EXP / "cdetr_r50_50ep.yaml", "smoke", parse_overrides(
            [f"data.root={runs['data']}", "method.name=maskd", "method.teacher.experiment=x",
             "method.tokens.random=true"]))


def test_detr_tap_is_the_c5_map_its_transformer_reads(runs):
    """Beyond the paper: on a DETR the tap is the ResNet body's C5, exactly the outputs' ``features`` map."""
    from replic.methods.maskd import tap_features

    cfg = load_experiment(EXP / "maskd_cdetr_r50_50ep.yaml", "smoke", parse_overrides(
        [f"data.root={runs['data']}", "model.hidden_dim=32", "model.dim_feedforward=64", "model.num_queries=5"]))
    torch.manual_seed(0)
    detr = family_of(cfg.model).build_model(cfg.model).eval()
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    with torch.no_grad():
        (c5,) = tap_features(detr, images, mask, "backbone")
        torch.testing.assert_close(c5, detr(images, mask)["features"]["C5"], rtol=0, atol=0)
    from replic.config import ConfigError

    with pytest.raises(ConfigError, match="a DETR the 'backbone' and 'memory' taps"):
        tap_features(detr, images, mask, "fpn")
