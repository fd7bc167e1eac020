"""Data configuration: where the COCO-layout data lives and the augmentation sizes.

Defaults are the DETR / Conditional DETR recipe at paper scale; smoke scale
overrides the sizes (e.g. ``train_scales: [128, 160, 192]``) in a YAML overlay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from replic.config import ADDED_KEY, ConfigError


def _detr_train_scales() -> list[int]:
    return list(range(480, 801, 32))


@dataclass
class DataConfig:
    """Dataset location and the augmentation recipe (strict-loadable with ``replic.config.from_dict``).

    The dataset root holds the COCO 2017 layout: ``annotations/instances_{split}.json``
    and one image folder per split.
    """

    root: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    # Training: short side drawn from train_scales, long side capped at max_size.
    train_scales: list[int] = field(default_factory=_detr_train_scales)
    max_size: int = 1333
    # Training branch (b): resize to one of crop_scales, random crop with sides in crop_size, then (a).
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: tuple[int, int] = (384, 600)
    # Validation: short side val_size, long side capped at val_max_size.
    val_size: int = 800
    val_max_size: int = 1333
    hflip_prob: float = 0.5
    # Probability of branch (a) (plain resize) over branch (b) (resize-crop-resize).
    resize_only_prob: float = 0.5
    # DETR drops crowd annotations from the targets (evaluation still sees them via the GT file).
    remove_crowd: bool = True
    num_workers: int = 2
    # Check that every image file referenced by the annotation file exists, at construction.
    check_files: bool = True
    # Resize arithmetic: "detr" (DETR's get_size_with_aspect_ratio: short side = scale, long side
    # capped at max_size) or "mmdet" (mmcv imrescale keep_ratio to (max_size, scale): factor
    # min(max_size / long, scale / short), sides int(x * factor + 0.5); the CNN detectors' recipe).
    # Left out of the resolved config while "detr" (configs written before it keep their hash).
    resize_rule: Literal["detr", "mmdet"] = field(default="detr", metadata=ADDED_KEY)

    def validate(self) -> None:
        """Reject impossible sizes before any data is read."""
        for name in ("train_scales", "crop_scales"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: must list at least one size")
            if any(v <= 0 for v in values):
                raise ConfigError(f"{name}: sizes must be positive, got {values}")
        for name in ("max_size", "val_size", "val_max_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        lo, hi = self.crop_size
        if lo <= 0 or hi < lo:
            raise ConfigError(f"crop_size: need 0 < min <= max, got {list(self.crop_size)}")
        for name in ("hflip_prob", "resize_only_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}: must be a probability in [0, 1], got {p}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.train_split == self.val_split:
            raise ConfigError(f"train_split and val_split are both '{self.train_split}'")
