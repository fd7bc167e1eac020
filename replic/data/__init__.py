"""Data layer: synthetic COCO generator, COCO subsets, the dataset class, transforms, collate.

See docs/architecture.md, "Data contract", for the item and batch formats.
Names are imported lazily (PEP 562) so ``replic --help`` and ``replic data synth``
do not pay for importing torch/torchvision.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replic.data.coco import CocoDetection, DatasetError, load_coco_index, num_classes_for
    from replic.data.collate import Batch, collate_fn
    from replic.data.config import DataConfig
    from replic.data.synth import generate_synthetic_coco
    from replic.data.transforms import make_transforms

_LAZY = {
    "Batch": "replic.data.collate",
    "collate_fn": "replic.data.collate",
    "CocoDetection": "replic.data.coco",
    "DatasetError": "replic.data.coco",
    "load_coco_index": "replic.data.coco",
    "num_classes_for": "replic.data.coco",
    "DataConfig": "replic.data.config",
    "generate_synthetic_coco": "replic.data.synth",
    "make_transforms": "replic.data.transforms",
}

__all__ = sorted([*_LAZY, "annotation_file", "build_dataset"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'replic.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def annotation_file(cfg: DataConfig, split: str) -> Path:
    """``root/annotations/instances_{split folder}.json`` for split "train" or "val"."""
    return Path(cfg.root) / "annotations" / f"instances_{_split_folder(cfg, split)}.json"


def _split_folder(cfg: DataConfig, split: str) -> str:
    if split == "train":
        return cfg.train_split
    if split == "val":
        return cfg.val_split
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'val'")


def build_dataset(cfg: DataConfig, split: str) -> CocoDetection:
    """The dataset of ``split`` ("train" or "val") under ``cfg.root``, with the recipe's transforms."""
    from replic.data.coco import CocoDetection
    from replic.data.transforms import make_transforms

    folder = _split_folder(cfg, split)
    return CocoDetection(
        Path(cfg.root) / folder,
        annotation_file(cfg, split),
        transforms=make_transforms(split, cfg),
        remove_crowd=cfg.remove_crowd,
        check_files=cfg.check_files,
    )
