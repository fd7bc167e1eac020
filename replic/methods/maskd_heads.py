"""What the official MasKD distillation configs add beside the masked feature loss: head
distillation and a student initialised from the teacher (``hunto/MasKD`` @ b5af34f,
``mmrazor/configs/distill/maskd/*.py``).

* **RetinaNet** (``retinanet_r101-retinanet_r50_coco.py``): a second distiller component,
  ``mmdet.L1Loss`` (mean, weight 1) between the student's and the teacher's
  ``bbox_head.retina_reg`` outputs. The head runs once per FPN level and mmrazor pairs the k-th
  output of the student's module with the k-th of the teacher's, so it is one L1 mean per level,
  summed. The student's ``neck`` and ``bbox_head`` start from the teacher's checkpoint
  (``init_cfg`` with ``prefix``).
* **Faster R-CNN** (``fpn_r101-fpn_r50_coco.py``): ``mmdet.SmoothL1Loss`` (beta 1, mean, weight 1)
  between the ``roi_head.bbox_head.fc_reg`` outputs, the teacher's RoI extractor fed the
  student's RoIs (``modules_with_student_inputs``, ``same_indices=[1]``): both box heads regress the
  proposals the student sampled.
* **FCOS** (``fcos_r101-fcos_r50_coco.py``): the feature loss only.

In torchvision the two outputs are ``head.regression_head.bbox_reg`` (A·4 channels per level, the
layout of ``retina_reg``) and ``roi_heads.box_predictor.bbox_pred``, one group of 4 per class index.
Group 0 is the background, which mmdet's ``fc_reg`` (80·4 on COCO) does not have: it is left out. With
raw COCO ids (``num_classes: 91``) the 10 unused ids keep their groups, never trained in either model,
so the mean runs over 90·4 values per RoI instead of 80·4 (the term is 8/9 of the official one per
real value; declared in docs/maskd.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replic.distill.teacher import TeacherError

__all__ = ["HEAD_DISTILL_ARCHS", "HeadTap", "init_from_teacher"]

# Detectors whose official MasKD config distils a head output, and the loss it uses.
HEAD_DISTILL_ARCHS = {"retinanet": "L1 on bbox_reg per FPN level", "faster_rcnn": "smooth L1 on bbox_pred"}


class HeadTap:
    """Records the student's box-regression outputs during its training forward and computes the
    head-distillation loss against the teacher's outputs on the same inputs.

    ``student``: a :class:`~replic.models.cnn.detector.CnnDetector` of ``arch`` (``retinanet`` or
    ``faster_rcnn``). Hooks record only while the student is in training mode, so evaluation stays
    untouched.
    """

    def __init__(self, student: nn.Module, arch: str) -> None:
        if arch not in HEAD_DISTILL_ARCHS:
            raise ValueError(f"no head distillation for {arch!r} (official configs: {sorted(HEAD_DISTILL_ARCHS)})")
        self.arch = arch
        self.outputs: list[Tensor] = []
        self.rois: tuple[list[Tensor], list[tuple[int, int]]] | None = None
        if arch == "retinanet":
            student.model.head.regression_head.bbox_reg.register_forward_hook(self._record_output)
        else:
            roi_heads = student.model.roi_heads
            roi_heads.box_roi_pool.register_forward_pre_hook(self._record_rois)
            roi_heads.box_predictor.bbox_pred.register_forward_hook(self._record_output)

    def clear(self) -> None:
        """Forget what the last forward recorded (call before each student forward)."""
        self.outputs.clear()
        self.rois = None

    def _record_output(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training:
            self.outputs.append(output)

    def _record_rois(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if module.training:
            _, proposals, image_shapes = inputs
            self.rois = ([p.detach() for p in proposals], list(image_shapes))

    def teacher_outputs(self, teacher: nn.Module, fpn: dict[str, Tensor]) -> list[Tensor]:
        """The teacher's box-regression outputs on its FPN maps ``fpn`` (by level, as its neck
        returns them): per level for RetinaNet; on the student's RoIs for Faster R-CNN."""
        if self.arch == "retinanet":
            head = teacher.model.head.regression_head
            return [head.bbox_reg(head.conv(x)) for x in fpn.values()]
        if self.rois is None:
            raise RuntimeError("head distillation: the student's forward sampled no RoIs (not in training mode?)")
        proposals, image_shapes = self.rois
        roi_heads = teacher.model.roi_heads
        pooled = roi_heads.box_roi_pool(fpn, proposals, image_shapes)
        return [roi_heads.box_predictor.bbox_pred(roi_heads.box_head(pooled))]

    def loss(self, teacher: nn.Module, fpn: dict[str, Tensor]) -> Tensor:
        """Σ over outputs of the official per-output loss (see the module docstring); the teacher's
        side carries no gradient."""
        student = list(self.outputs)
        with torch.no_grad():
            teacher_out = self.teacher_outputs(teacher, fpn)
        if len(student) != len(teacher_out):
            raise RuntimeError(f"head distillation: the student recorded {len(student)} head outputs, the "
                               f"teacher gave {len(teacher_out)}")
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher_out, strict=True):
            if self.arch == "retinanet":
                total = total + F.l1_loss(s, t)
            else:  # drop torchvision's background group (mmdet's fc_reg has none)
                total = total + F.smooth_l1_loss(s[:, 4:], t[:, 4:], beta=1.0)
        return total


def init_from_teacher(student: nn.Module, teacher: nn.Module, path: str | Path) -> list[str]:
    """Copy the teacher's neck and heads — every parameter and buffer outside the ResNet body
    (``model.backbone.body``) — into ``student`` (official RetinaNet config: ``neck`` and
    ``bbox_head`` ``init_cfg`` from the teacher's checkpoint). Returns the copied keys; a key the
    teacher lacks or a different shape is a TeacherError naming ``path`` and the key."""
    teacher_state = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for key, value in student.state_dict().items():
            if key.startswith("model.backbone.body."):
                continue
            if key not in teacher_state:
                raise TeacherError(f"{path}: method.init_from_teacher: the teacher has no '{key}'")
            if teacher_state[key].shape != value.shape:
                raise TeacherError(f"{path}: method.init_from_teacher: '{key}' has shape "
                                   f"{tuple(teacher_state[key].shape)} in the teacher, {tuple(value.shape)} in "
                                   "the student")
            value.copy_(teacher_state[key])
            copied.append(key)
    return copied
