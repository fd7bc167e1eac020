"""The adapter between replic's batches and a torchvision detector (Faster R-CNN, RetinaNet, FCOS).

replic's data pipeline (``replic.data``) has already resized, flipped and ImageNet-normalised
every image and padded the batch with zeros (the mmdet order: Resize, Flip, Normalize, Pad).
torchvision's detectors would resize and normalise again inside their ``transform``
(``GeneralizedRCNNTransform``); :class:`PreparedImages` replaces it, so the network sees the
pixels the data pipeline produced: it only pads the batch to a multiple of 32 and records each
image's unpadded size. Targets go from the data contract (normalised cxcywh, raw COCO ids) to
torchvision's (absolute xyxy in the network-input frame, the same raw ids); detections come back
in that frame and :class:`replic.models.cnn.postprocess.CnnPostProcess` scales them to the file.

Outputs of :meth:`CnnDetector.forward` (a dict, as every replic detector):
- ``features``: ``{"P2": (B, C, H2, W2), ...}`` the FPN outputs by level (the tap point of
  feature distillation; a forward hook on :attr:`CnnDetector.neck` may also replace them);
- ``image_sizes``: int64 (B, 2), (h, w) of each image inside the padded batch;
- training: ``losses``, torchvision's dict of unweighted loss terms;
- evaluation: ``detections``, per image ``{boxes (N, 4) xyxy in the network-input frame,
  scores (N,), labels (N,) raw category ids}`` after score threshold, NMS and top-k.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from replic.models.box_ops import box_cxcywh_to_xyxy


def image_sizes_from_mask(mask: Tensor) -> Tensor:
    """(h, w) of each image from the padding mask (True = padding, bottom/right): int64 (B, 2)."""
    valid = ~mask
    heights = valid[:, :, 0].sum(dim=1)
    widths = valid[:, 0, :].sum(dim=1)
    return torch.stack([heights, widths], dim=1).to(torch.int64)


def to_torchvision_targets(targets: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """Data-contract targets → torchvision's: absolute xyxy boxes in the network-input frame."""
    out = []
    for target in targets:
        h, w = (float(v) for v in target["size"])
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=target["boxes"].device)
        boxes = box_cxcywh_to_xyxy(target["boxes"].float()) * scale
        out.append({"boxes": boxes.reshape(-1, 4), "labels": target["labels"].to(torch.int64)})
    return out


class PreparedImages(nn.Module):
    """Stands in for torchvision's ``GeneralizedRCNNTransform``: no resize, no normalisation.

    ``forward(images, targets)`` takes the unpadded images (already resized and normalised by
    replic's transforms), pads them bottom/right with zeros to a multiple of ``size_divisible``
    and returns ``(ImageList, targets)``; ``postprocess`` leaves detections in that frame.
    """

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__()
        self.size_divisible = size_divisible

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        d = self.size_divisible
        height = -(-max(h for h, _ in sizes) // d) * d
        width = -(-max(w for _, w in sizes) // d) * d
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batch, sizes), targets

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Identity: boxes stay in the network-input frame (CnnPostProcess rescales them)."""
        return result


class CnnDetector(nn.Module):
    """A torchvision detector fed by replic batches; see the module docstring for the outputs.

    ``takes_targets``: the training forward needs the targets (torchvision computes its losses
    inside the model); :meth:`replic.methods.base.TrainingMethod.forward_train` passes them.
    """

    takes_targets: ClassVar[bool] = True

    def __init__(self, model: nn.Module, levels: tuple[str, ...], size_divisible: int = 32) -> None:
        super().__init__()
        self.model = model
        self.model.transform = PreparedImages(size_divisible)
        self.levels = levels
        self._captured: list[dict[str, Tensor]] = []
        self.neck.register_forward_hook(self._capture)

    @property
    def neck(self) -> nn.Module:
        """ResNet + FPN (torchvision ``BackboneWithFPN``): its output is the FPN maps by level."""
        return self.model.backbone

    def _capture(self, module: nn.Module, inputs: Any, output: dict[str, Tensor]) -> None:
        self._captured.append(output)

    def forward(self, images: Tensor, mask: Tensor, targets: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
        """images (B, 3, H, W) normalised and zero-padded, mask (B, H, W) True = pad; targets in
        training (data contract). Returns the dict described in the module docstring."""
        sizes = image_sizes_from_mask(mask)
        crops = [images[i, :, : int(h), : int(w)] for i, (h, w) in enumerate(sizes.tolist())]
        if self.training:
            if targets is None:
                raise ValueError("CnnDetector: training needs the targets (torchvision computes the "
                                 "losses inside the model)")
            tv_targets: list[dict[str, Tensor]] | None = to_torchvision_targets(targets)
        else:
            tv_targets = None
        self._captured.clear()
        try:
            result = self.model(crops, tv_targets)
            (fpn,) = self._captured
        finally:
            self._captured.clear()
        out: dict[str, Any] = {
            "features": dict(zip(self.levels, fpn.values(), strict=True)),
            "image_sizes": sizes,
        }
        out["losses" if self.training else "detections"] = result
        return out

