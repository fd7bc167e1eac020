"""Detections of a torchvision detector → boxes in the original image (what COCO scoring needs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class CnnPostProcess(nn.Module):
    """Scale each image's boxes from the network-input frame to its file's size.

    ``forward(outputs, orig_sizes)``: ``outputs["detections"]`` and ``outputs["image_sizes"]``
    (B, 2) from :class:`CnnDetector`, ``orig_sizes`` (B, 2) = (h, w) on disk → list of
    ``{scores, labels, boxes}`` with absolute xyxy boxes (the DETR post-processor's contract).
    The detector already applied the score threshold, NMS and the per-image cap. Same as
    mmdet's ``rescale``: divide by the per-axis scale factor of the resize.
    """

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        results = []
        for det, size, orig in zip(outputs["detections"], outputs["image_sizes"], orig_sizes):
            h, w = (float(v) for v in size)
            oh, ow = (float(v) for v in orig)
            scale = det["boxes"].new_tensor([ow / w, oh / h, ow / w, oh / h])
            results.append({"scores": det["scores"], "labels": det["labels"],
                            "boxes": det["boxes"] * scale})
        return results
