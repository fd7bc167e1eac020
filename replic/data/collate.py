"""Batching: pad images bottom/right to the largest size in the batch, with a padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        images: float32 (B, 3, Hmax, Wmax), zero in the padding (bottom/right).
        mask: bool (B, Hmax, Wmax), **True = padding**.
        targets: one dict per image (the data contract of docs/architecture.md).
    """

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move images, mask and every tensor in the targets to ``device``."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            targets=[
                {
                    k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                    for k, v in target.items()
                }
                for target in self.targets
            ],
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (C, H, W) images into (B, C, Hmax, Wmax) zero-padded bottom/right, plus the mask."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    channels = {int(img.shape[0]) for img in images}
    if len(channels) != 1:
        raise ValueError(f"images in a batch have different channel counts: {sorted(channels)}")
    max_h = max(int(img.shape[-2]) for img in images)
    max_w = max(int(img.shape[-1]) for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), channels.pop(), max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        batch[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return batch, mask


def collate_fn(items: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
    """``DataLoader`` collate: items ``(image, target)`` → ``Batch``."""
    images, mask = pad_images([image for image, _ in items])
    return Batch(images=images, mask=mask, targets=[target for _, target in items])
