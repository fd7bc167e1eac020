"""What the official MasKD configs add beside the feature loss (replic.methods.maskd_heads): RetinaNet's
per-level L1 on the box-regression outputs, Faster R-CNN's smooth L1 on the box predictor with the
teacher fed the student's RoIs, the student initialised from the teacher's neck and heads; the option
defaults per detector; the all-ones-mask control.

Tiny torchvision detectors (ResNet-18, 32-channel FPN, 4 classes) on two small images, float32.
A self-teacher gives exactly the student's outputs (same weights, same inputs, same ops): the head
term is asserted to be 0 within 1e-7; against a perturbed teacher the term is recomputed by hand from
the heads' own layers (rtol 1e-6).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from replic.config import ConfigError
from replic.distill.teacher import TeacherError
from replic.engine.config import load_experiment, parse_overrides
from replic.methods import build_method
from replic.methods.maskd import MasKD, MasKDOptions, TokenSpec, tap_maps
from replic.methods.maskd_heads import HeadTap, init_from_teacher
from replic.models.cnn.build import build_model
from test_cnn_models import batch_of_two, tiny

EXP = Path(__file__).resolve().parents[1] / "configs" / "experiments"
torch.set_num_threads(1)


def _load(experiment: str, *settings: str):
    """An experiment at smoke scale; num_classes given, so no annotation file is read."""
    return load_experiment(EXP / f"{experiment}.yaml", "smoke", parse_overrides(["model.num_classes=91", *settings]))


def _pair(arch: str):
    torch.manual_seed(0)
    student = build_model(tiny(arch)).train()
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _student_step(student, tap):
    batch = batch_of_two()
    tap.clear()
    out = student(batch.images, batch.mask, batch.targets)
    return batch, out


def test_retinanet_head_term_is_zero_for_a_self_teacher_and_the_per_level_l1_otherwise():
    student, teacher = _pair("retinanet")
    tap = HeadTap(student, "retinanet")
    batch, out = _student_step(student, tap)
    assert len(tap.outputs) == 5  # one bbox_reg output per FPN level (P3-P7)
    fpn = tap_maps(teacher, batch.images, batch.mask, "fpn")
    assert float(tap.loss(teacher, fpn).detach()) < 1e-7
    with torch.no_grad():
        teacher.model.head.regression_head.bbox_reg.weight.add_(0.05)
    loss = tap.loss(teacher, fpn)
    s_head, t_head = student.model.head.regression_head, teacher.model.head.regression_head
    with torch.no_grad():
        expected = sum(F.l1_loss(s_head.bbox_reg(s_head.conv(s)), t_head.bbox_reg(t_head.conv(t)))
                       for s, t in zip(out["features"].values(), fpn.values(), strict=True))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    assert float(loss.detach()) > 0
    loss.backward()
    assert s_head.bbox_reg.weight.grad is not None and teacher.model.head.regression_head.bbox_reg.weight.grad is None


def test_faster_rcnn_head_term_uses_the_students_rois_and_leaves_out_the_background_group():
    student, teacher = _pair("faster_rcnn")
    tap = HeadTap(student, "faster_rcnn")
    batch, _ = _student_step(student, tap)
    (reg,) = tap.outputs
    proposals, image_shapes = tap.rois
    assert reg.shape == (sum(len(p) for p in proposals), 4 * 4)  # num_classes = 4 groups, group 0 the background
    fpn = tap_maps(teacher, batch.images, batch.mask, "fpn")
    assert float(tap.loss(teacher, fpn).detach()) < 1e-7
    # The teacher's own RPN plays no part: its RoIs are the student's.
    with torch.no_grad():
        for p in teacher.model.rpn.parameters():
            p.add_(0.5)
    assert float(tap.loss(teacher, fpn).detach()) < 1e-7
    with torch.no_grad():
        teacher.model.roi_heads.box_predictor.bbox_pred.bias.copy_(torch.arange(16.0) * 0.1)
    loss = tap.loss(teacher, fpn)
    heads = teacher.model.roi_heads
    with torch.no_grad():
        t_reg = heads.box_predictor.bbox_pred(heads.box_head(heads.box_roi_pool(fpn, proposals, image_shapes)))
    expected = F.smooth_l1_loss(reg[:, 4:], t_reg[:, 4:], beta=1.0)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=0)
    # Only the background group differs: no term.
    with torch.no_grad():
        heads.box_predictor.bbox_pred.bias.copy_(student.model.roi_heads.box_predictor.bbox_pred.bias)
        heads.box_predictor.bbox_pred.bias[:4] += 3.0
    assert float(tap.loss(teacher, fpn).detach()) < 1e-7


def test_evaluation_records_nothing():
    student, _ = _pair("retinanet")
    tap = HeadTap(student, "retinanet")
    student.eval()
    batch = batch_of_two()
    with torch.no_grad():
        student(batch.images, batch.mask)
    assert tap.outputs == [] and tap.rois is None


def test_init_from_teacher_copies_the_neck_and_heads_not_the_resnet_body():
    torch.manual_seed(0)
    student = build_model(tiny("retinanet"))
    torch.manual_seed(1)
    teacher = build_model(tiny("retinanet"))
    copied = init_from_teacher(student, teacher, "teacher.pt")
    s, t = student.state_dict(), teacher.state_dict()
    assert copied and all(k.startswith(("model.backbone.fpn.", "model.head.")) for k in copied)
    assert any(k.startswith("model.head.regression_head") for k in copied)
    assert all(torch.equal(s[k], t[k]) for k in copied)
    body = [k for k in s if k.startswith("model.backbone.body.") and "conv" in k and k.endswith("weight")]
    assert body and not any(torch.equal(s[k], t[k]) for k in body)
    wide = build_model(tiny("retinanet", fpn_channels=64))
    with pytest.raises(TeacherError, match=r"teacher\.pt: method\.init_from_teacher: 'model\.backbone\.fpn\..*shape"):
        init_from_teacher(student, wide, "teacher.pt")


@pytest.mark.parametrize(("experiment", "head", "init"), [
    ("maskd_retinanet_r50_24ep", True, True),
    ("maskd_frcnn_r50_24ep", True, False),
    ("maskd_fcos_r50_24ep", False, False),
    ("maskd_cdetr_r50_12ep_memory", False, False),
])
def test_defaults_follow_each_official_config(experiment, head, init):
    cfg = _load(experiment)
    method = build_method(cfg)
    assert (method.head_distill, method.init_from_teacher) == (head, init)
    unset = MasKD(cfg, MasKDOptions(teacher=method.options.teacher, tokens=method.options.tokens))
    assert (unset.head_distill, unset.init_from_teacher) == (head, init)


@pytest.mark.parametrize(("experiment", "setting", "message"), [
    ("maskd_fcos_r50_24ep", "method.head_distill=true", "head_distill: .*retinanet only; this student is fcos"),
    ("maskd_cdetr_r50_12ep_memory", "method.head_distill=true", "this student is detr"),
    ("maskd_cdetr_r50_12ep_memory", "method.init_from_teacher=true", "this student is a DETR"),
    ("maskd_retinanet_r50_24ep_allones", "method.weighting=true", "all_ones .* weighting: false"),
    ("maskd_retinanet_r50_24ep", "method.tokens.all_ones=true", "exactly one of"),
])
def test_impossible_settings_are_refused_when_the_config_loads(experiment, setting, message):
    with pytest.raises(ConfigError, match=message):
        _load(experiment, setting)


def test_all_ones_control_is_the_mean_squared_difference_per_level():
    cfg = _load("maskd_retinanet_r50_24ep_allones")
    method = build_method(cfg)
    assert method.options.tokens == TokenSpec(all_ones=True)
    assert method.token_path() is None
    torch.manual_seed(0)
    method.align = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 1) for _ in range(2))
    student = [torch.randn(2, 8, 6, 5), torch.randn(2, 8, 3, 3)]
    teacher = [torch.randn(2, 8, 6, 5), torch.randn(2, 8, 3, 3)]
    expected = sum(F.mse_loss(a(s), t) for a, s, t in zip(method.align, student, teacher))
    torch.testing.assert_close(method.distill_loss(student, teacher), expected, rtol=1e-6, atol=0)
