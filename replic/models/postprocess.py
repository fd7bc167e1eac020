"""Turn model outputs into COCO-style detections: top-k (query, class) pairs, no NMS.

Sigmoid models (Conditional DETR): scores = sigmoid(logits) over Q × C, keep the top-k
pairs per image (official: k = 100; KS-DETR protocol: k = 300), no threshold, no NMS; a
query may appear with several classes.

Softmax models (DETR): scores = softmax(logits), the no-object column is dropped, then the
same top-k over Q × C. [inferred] This differs from DETR's own PostProcess (one label per
query = argmax over real classes); it is chosen so both models share one evaluation
protocol. With k ≥ Q it only adds lower-scored extra classes per query.

Boxes become absolute xyxy in the original image size (h, w).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from replic.models.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """``PostProcess(topk)(outputs, orig_sizes) -> [dict(scores, labels, boxes)]`` per image."""

    def __init__(self, topk: int = 100, focal: bool = True) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk
        self.focal = focal

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs with ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4); orig_sizes (B, 2) = (h, w)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"orig_sizes must be (B, 2) = (h, w), got {tuple(orig_sizes.shape)}")
        if self.focal:
            prob = logits.sigmoid()
        else:
            prob = logits.softmax(-1)[..., :-1]
        b, q, c = prob.shape
        k = min(self.topk, q * c)
        scores, flat_idx = prob.reshape(b, q * c).topk(k, dim=1)
        query_idx = torch.div(flat_idx, c, rounding_mode="floor")
        labels = flat_idx % c
        xyxy = box_cxcywh_to_xyxy(boxes)
        xyxy = torch.gather(xyxy, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        h, w = orig_sizes.to(xyxy).unbind(1)
        xyxy = xyxy * torch.stack((w, h, w, h), dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": bx} for s, l, bx in zip(scores, labels, xyxy)]
