"""Hungarian matching between predictions and ground truth (DETR / Conditional DETR).

Cost = cost_class · C_cls + cost_bbox · L1(cxcywh) + cost_giou · (−GIoU(xyxy)).

* focal-style C_cls (Conditional DETR): with p = sigmoid(logit) of the GT class,
  α(1−p)^γ(−log(p+1e-8)) − (1−α)p^γ(−log(1−p+1e-8));
* softmax C_cls (DETR): −softmax probability of the GT class.

The whole batch's cost matrix is computed at once and moved to the CPU in one transfer;
``scipy.optimize.linear_sum_assignment`` then runs per image on its block.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from replic.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from replic.models.transformer import at_least_float32


class HungarianMatcher(nn.Module):
    """One-to-one matching; returns per image (query_idx, target_idx) int64 tensors sorted by query."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> Tensor:
        """(B, Q, total number of GT boxes in the batch) cost; column blocks belong to images."""
        logits = outputs["pred_logits"]
        b, q = logits.shape[:2]
        out_boxes = at_least_float32(outputs["pred_boxes"].flatten(0, 1))
        tgt_ids = torch.cat([t["labels"] for t in targets]).long()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(out_boxes.dtype)
        if tgt_ids.numel() and (tgt_ids.min() < 0 or tgt_ids.max() >= logits.shape[-1] - (0 if self.focal else 1)):
            raise ValueError(f"target labels must be in [0, num_classes), got range "
                             f"[{int(tgt_ids.min())}, {int(tgt_ids.max())}] for {logits.shape[-1]} logits")
        flat_logits = at_least_float32(logits.flatten(0, 1))
        if self.focal:
            prob = flat_logits.sigmoid()
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + 1e-8).log())
            pos = alpha * (1 - prob).pow(gamma) * (-(prob + 1e-8).log())
            cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
        else:
            cost_class = -flat_logits.softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """outputs with ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4); targets with
        ``labels`` (N_i,) and ``boxes`` (N_i, 4) cxcywh → [(query_idx, target_idx)] per image."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        cost = self.cost_matrix(outputs, targets).cpu()  # the one device→host transfer
        if not torch.isfinite(cost).all():
            raise ValueError("matching cost has NaN/inf entries: the predictions are not finite")
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
