"""CNN-family configuration: the 2x experiments at paper and smoke scale, strict model-section errors,
DETR configs untouched by the added keys, and the SGD / warm-up / multistep recipe of optim.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from replic.config import ConfigError, from_dict, to_dict
from replic.engine.config import TrainConfig, load_experiment
from replic.engine.optim import WarmupMultiStepLR, after_optimizer_step, build_optimizer, build_scheduler
from replic.models.cnn.config import CnnModelConfig

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
CNN = sorted(p for p in EXPERIMENTS.glob("*.yaml") if p.stem.startswith(("frcnn_", "retinanet_", "fcos_")))
MISSING_ROOT = {"data": {"root": "/nonexistent/replic-data"}}
ARCH = {"frcnn": "faster_rcnn", "retinanet": "retinanet", "fcos": "fcos"}


def test_there_is_an_r50_and_r101_2x_experiment_per_detector():
    # (Beside them, variants <detector>_r50_24ep_<what> that differ at mini only: same paper recipe.)
    assert {p.stem for p in CNN if p.stem.count("_") == 2} == {f"{d}_{b}_24ep" for d in ARCH for b in ("r50", "r101")}


@pytest.mark.parametrize("path", CNN, ids=lambda p: p.stem)
def test_paper_scale_is_the_mmdet_2x_recipe(path):
    """R50 students follow MasKD's KD configs; R101 teachers the mmdet zoo configs of the
    checkpoints MasKD loads (RetinaNet: lr 0.01, no clipping, 500 warm-up steps; FCOS: a constant
    warm-up and NMS 0.5)."""
    cfg = load_experiment(path, "paper", MISSING_ROOT)
    arch = ARCH[path.stem.split("_")[0]]
    fcos, retina = arch == "fcos", arch == "retinanet"
    teacher = "r101" in path.stem
    m, t, d = cfg.model, cfg.train, cfg.data
    assert isinstance(m, CnnModelConfig) and m.arch == arch
    assert m.backbone == ("resnet101" if teacher else "resnet50")
    assert m.pretrained_backbone == "torchvision" and m.trainable_layers == 3 and m.num_classes == 91
    assert (m.score_thresh, m.nms, m.detections_per_img) == (0.05, 0.6 if fcos and not teacher else 0.5, 100)
    assert (t.optimizer, t.momentum, t.weight_decay, t.epochs, t.lr_steps, t.lr_gamma) == \
        ("sgd", 0.9, 1e-4, 24, [16, 22], 0.1)
    assert t.lr == t.lr_backbone == (0.01 if fcos or (retina and teacher) else 0.02) and t.batch_size == 2
    assert t.warmup_iters == (1000 if retina and not teacher else 500)
    assert t.warmup == ("constant" if fcos and teacher else "linear")
    assert t.warmup_ratio == pytest.approx(1 / 3 if fcos else 0.001)
    assert t.clip_max_norm == (0 if arch == "faster_rcnn" or (retina and teacher) else 35)
    assert (t.bias_lr_mult, t.bias_decay_mult) == ((2.0, 0.0) if fcos else (1.0, 1.0))
    assert d.resize_rule == "mmdet" and d.max_size == 1333 and d.val_size == 800 and d.hflip_prob == 0.5
    assert d.train_scales == ([640, 800] if fcos else [800]) and d.resize_only_prob == 1.0


@pytest.mark.parametrize("detector", sorted(ARCH))
def test_smoke_scale_is_small_and_the_teacher_is_larger_than_the_student(detector, tmp_path):
    student = load_experiment(EXPERIMENTS / f"{detector}_r50_24ep.yaml", "smoke", MISSING_ROOT | {"model": {"num_classes": 4}})
    teacher = load_experiment(EXPERIMENTS / f"{detector}_r101_24ep.yaml", "smoke", MISSING_ROOT | {"model": {"num_classes": 4}})
    assert (student.model.backbone, teacher.model.backbone) == ("resnet18", "resnet34")
    assert student.model.pretrained_backbone == "none" and student.scale == "smoke"
    assert max(student.data.train_scales) <= 160 and student.train.epochs <= 4
    assert student.train.lr_steps[-1] < student.train.epochs


def test_model_section_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.fpn_chanels.*did you mean 'model\.fpn_channels'"):
        load_experiment(EXPERIMENTS / "fcos_r50_24ep.yaml", "paper", MISSING_ROOT | {"model": {"fpn_chanels": 64}})
    with pytest.raises(ConfigError, match=r"model\.family: 'rcnn' is not one of \['cnn'\]"):
        load_experiment(EXPERIMENTS / "fcos_r50_24ep.yaml", "paper", MISSING_ROOT | {"model": {"family": "rcnn"}})
    with pytest.raises(ConfigError, match=r"model.*fpn_channels.*multiple of 32"):
        load_experiment(EXPERIMENTS / "fcos_r50_24ep.yaml", "paper", MISSING_ROOT | {"model": {"fpn_channels": 48}})
    with pytest.raises(ConfigError, match=r"model.*head_norm.*only RetinaNet.*'fcos'"):
        load_experiment(EXPERIMENTS / "fcos_r50_24ep.yaml", "paper", MISSING_ROOT | {"model": {"head_norm": "group_norm"}})
    with pytest.raises(ConfigError, match=r"model.*head_norm.*'batch_norm'"):
        load_experiment(EXPERIMENTS / "retinanet_r50_24ep.yaml", "paper", MISSING_ROOT | {"model": {"head_norm": "batch_norm"}})
    with pytest.raises(ConfigError, match=r"train\.lr_steps.*\[16, 24\].*last epoch"):
        load_experiment(EXPERIMENTS / "frcnn_r50_24ep.yaml", "paper", MISSING_ROOT | {"train": {"lr_steps": [16, 24]}})


def test_detr_configs_do_not_record_the_added_keys():
    # Keys added for the CNN family are left out at their defaults: DETR configs (and their hashes)
    # stay what they were; a CNN config records them.
    detr = to_dict(load_experiment(EXPERIMENTS / "cdetr_r50_50ep.yaml", "paper", MISSING_ROOT))
    added = {"optimizer", "momentum", "lr_schedule", "lr_steps", "warmup_iters", "warmup_ratio",
             "bias_lr_mult", "bias_decay_mult"}
    assert not added & set(detr["train"]) and "resize_rule" not in detr["data"] and "family" not in detr["model"]
    cnn = to_dict(load_experiment(EXPERIMENTS / "fcos_r50_24ep.yaml", "paper", MISSING_ROOT))
    assert added - {"momentum"} <= set(cnn["train"]) and cnn["data"]["resize_rule"] == "mmdet"
    assert cnn["model"]["family"] == "cnn"


# ------------------------------------------------------------------------------ optimizer
def _sgd_cfg(**kw) -> TrainConfig:
    base = dict(optimizer="sgd", lr=0.02, lr_backbone=0.02, lr_schedule="multistep", lr_steps=[2, 3],
                warmup_iters=4, warmup_ratio=0.001, epochs=4)
    return TrainConfig(**{**base, **kw})


def test_warmup_and_steps_follow_mmcv_linear_warmup_and_step_policy():
    model = torch.nn.Linear(2, 2)
    cfg = _sgd_cfg()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9

    def lr() -> float:
        return opt.param_groups[0]["lr"]

    # mmcv: lr_i = lr * (1 - (1 - i / warmup_iters) * (1 - ratio)) for steps i < warmup_iters.
    seen = []
    for _ in range(6):
        seen.append(lr())
        after_optimizer_step(sched)
    want = [0.02 * (1 - (1 - i / 4) * (1 - 0.001)) for i in range(4)] + [0.02, 0.02]
    assert seen == pytest.approx(want, rel=1e-12)
    sched.step(), sched.step()  # epochs 0, 1 done: epoch 2 is a step epoch
    assert lr() == pytest.approx(0.002)
    sched.step()
    assert lr() == pytest.approx(0.0002)
    # The position survives a checkpoint round trip (exact resume).
    state = sched.state_dict()
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0002) and sched2.iteration == 6


def test_fcos_bias_groups_get_double_lr_and_no_decay_outside_norm_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.GroupNorm(32, 32))
    opt = build_optimizer(model, _sgd_cfg(lr=0.01, lr_backbone=0.01, bias_lr_mult=2.0, bias_decay_mult=0.0))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"main", "main_bias"}
    assert groups["main_bias"]["params"] == [model[0].bias]
    assert (groups["main_bias"]["lr"], groups["main_bias"]["weight_decay"]) == (0.02, 0.0)
    # Norm-layer biases keep the base lr and decay (mmcv DefaultOptimizerConstructor).
    assert any(p is model[1].bias for p in groups["main"]["params"])
    assert (groups["main"]["lr"], groups["main"]["weight_decay"]) == (0.01, 1e-4)


def test_detr_optimizer_and_schedule_are_unchanged():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and [g["name"] for g in opt.param_groups] == ["main"]
    sched = build_scheduler(opt, cfg)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    after_optimizer_step(sched)  # no-op for an epoch schedule
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == cfg.lr


def test_constant_warmup_holds_the_ratio_then_resumes_at_the_current_iteration():
    """mmcv ``warmup='constant'`` (the FCOS recipe): ratio x lr for the warm-up steps, then the
    full lr; a resumed scheduler continues where the state says."""
    opt = build_optimizer(torch.nn.Linear(2, 2), _sgd_cfg(lr=0.01, warmup="constant", warmup_ratio=1 / 3))
    sched = build_scheduler(opt, _sgd_cfg(lr=0.01, warmup="constant", warmup_ratio=1 / 3))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        after_optimizer_step(sched)
    assert seen == pytest.approx([0.01 / 3] * 4 + [0.01] * 2, rel=1e-12)
    state = sched.state_dict()
    assert state["warmup"] == "constant"
    fresh_opt = build_optimizer(torch.nn.Linear(2, 2), _sgd_cfg(lr=0.01))
    resumed = build_scheduler(fresh_opt, _sgd_cfg(lr=0.01, warmup="constant", warmup_ratio=1 / 3))
    resumed.load_state_dict(state)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-12)
    with pytest.raises(ConfigError, match="warmup"):
        from_dict(TrainConfig, {**dataclasses.asdict(_sgd_cfg()), "warmup": "cosine"}, prefix="train")


def test_warmup_needs_the_multistep_schedule():
    with pytest.raises(ConfigError, match="only used with lr_schedule: multistep"):
        dataclasses.replace(TrainConfig(), warmup_iters=10).validate()
    assert isinstance(build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), _sgd_cfg()),
                      WarmupMultiStepLR)


def _mini_root(tmp_path: Path) -> dict:
    ann = tmp_path / "annotations"
    ann.mkdir(exist_ok=True)
    (ann / "instances_train2017.json").write_text('{"categories": [{"id": 3, "name": "x"}]}')
    return {"data": {"root": str(tmp_path)}}


@pytest.mark.parametrize("detector", sorted(ARCH))
def test_mini_scale_reads_the_mini_backbone_and_the_teacher_trains_more(detector, tmp_path):
    """At mini the CNN detectors read the DETRs' frozen dense-pretrained ResNet-18 (the workflow
    points families.cnn at the file its pretrain_backbone job writes); the R101 teacher trains
    layer3-4 for twice the student's schedule; RetinaNet gets the GroupNorm head."""
    student = load_experiment(EXPERIMENTS / f"{detector}_r50_24ep.yaml", "mini", _mini_root(tmp_path))
    teacher = load_experiment(EXPERIMENTS / f"{detector}_r101_24ep.yaml", "mini", _mini_root(tmp_path))
    for cfg in (student, teacher):
        assert cfg.model.backbone == "resnet18" and cfg.model.num_classes == 4
        assert cfg.model.pretrained_backbone == "runs/mini/backbone/resnet18_dense.pt"
        assert cfg.model.head_norm == ("group_norm" if detector == "retinanet" else "none")
        assert cfg.data.train_scales == [128] and cfg.data.max_size == 160 and not cfg.train.feature_cache
    assert (student.model.trainable_layers, teacher.model.trainable_layers) == (0, 2)
    assert (student.train.epochs, teacher.train.epochs) == (4, 8)
    assert student.train.lr_steps == [3] and teacher.train.lr_steps == [6]


def _maskd_tables_experiments() -> list[str]:
    from replic.workflow.methods import token_runs
    from replic.workflow.registry import load_registry

    names = load_registry(REPO / "configs" / "tables.yaml").experiments(["maskd", "maskd_tokens", "maskd_ablations"])
    return sorted(set(names) | set(token_runs(names, EXPERIMENTS)))


@pytest.mark.parametrize("experiment", _maskd_tables_experiments())
def test_mini_overlay_validates_for_the_maskd_tables(experiment, tmp_path):
    """Every run of the MasKD tables resolves at mini: token runs keep their own recipe (Adam, cosine,
    no multistep, 1,000 steps) over the teacher's mini schedule; students switch to customised masks
    within their 2,000 steps, as the official runs do early in theirs."""
    cfg = load_experiment(EXPERIMENTS / f"{experiment}.yaml", "mini", _mini_root(tmp_path))
    assert cfg.scale == "mini"
    method = cfg.method["name"]
    if method == "maskd_tokens":
        t = cfg.train
        assert (t.optimizer, t.lr_schedule, t.lr_steps, t.warmup_iters, t.max_steps) == ("adam", "cosine", [], 0, 1000)
        assert t.lr == t.lr_backbone == 0.01
    elif method == "maskd" and cfg.method.get("custom_mask", True):
        steps = cfg.train.epochs * 500  # 500 steps of 8 images per mini epoch
        assert 0 < cfg.method["custom_mask_warmup"] < steps // 10
