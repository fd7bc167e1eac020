"""Hungarian matching between a student's and a teacher's predictions (one decoder layer).

Cost between student query i and teacher query j (lower = more alike):

    cost_class · Σ_c BCE(s_ic, σ(t_jc))  +  cost_bbox · ‖b_i − b_j‖₁  +  cost_giou · (−GIoU(b_i, b_j))

The class cost is binary cross-entropy of the student's logits against the teacher's sigmoid
probabilities, summed over classes ([unofficial] TPRD's soft-target cost; for a fixed teacher
query it is smallest where the student's probabilities equal the teacher's). Boxes are cxcywh
in [0, 1]. Query counts may differ: ``min(Qs, Qt)`` pairs are returned per image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from replic.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from replic.models.transformer import at_least_float32


class TeacherStudentMatcher:
    """Per-image one-to-one matching; returns [(student_idx, teacher_idx)] sorted by student query."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("TeacherStudentMatcher: costs must be >= 0 and not all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, student: dict[str, Any], teacher: dict[str, Any]) -> Tensor:
        """(B, Qs, Qt) matching cost between student and teacher queries of each image."""
        s_logits = at_least_float32(student["pred_logits"])
        t_prob = at_least_float32(teacher["pred_logits"]).to(s_logits.dtype).sigmoid()
        # Σ_c −[p log σ(s) + (1−p) log σ(−s)] as two batched matrix products.
        cost_class = -(F.logsigmoid(s_logits) @ t_prob.transpose(1, 2)
                       + F.logsigmoid(-s_logits) @ (1 - t_prob).transpose(1, 2))
        s_boxes = at_least_float32(student["pred_boxes"])
        t_boxes = at_least_float32(teacher["pred_boxes"]).to(s_boxes.dtype)
        cost_bbox = torch.cdist(s_boxes, t_boxes, p=1)
        cost_giou = -torch.stack([generalized_box_iou(box_cxcywh_to_xyxy(s), box_cxcywh_to_xyxy(t))
                                  for s, t in zip(s_boxes, t_boxes)])
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, student: dict[str, Any], teacher: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        """student/teacher: dicts with ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4)."""
        if student["pred_logits"].shape[0] != teacher["pred_logits"].shape[0]:
            raise ValueError("student and teacher predictions have different batch sizes")
        if student["pred_logits"].shape[-1] != teacher["pred_logits"].shape[-1]:
            raise ValueError(f"student has {student['pred_logits'].shape[-1]} class logits, teacher "
                             f"{teacher['pred_logits'].shape[-1]}")
        cost = self.cost_matrix(student, teacher).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("teacher-student matching cost has NaN/inf entries")
        indices = []
        for block in cost:
            rows, cols = linear_sum_assignment(block.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def identity_indices(batch: int, num_queries: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed matching: query i of the auxiliary group ↔ teacher query i, in every image."""
    idx = torch.arange(num_queries, dtype=torch.int64)
    return [(idx, idx) for _ in range(batch)]
