"""Data layer: synthetic COCO generator, COCO subsets, the dataset class, transforms, collate.

See docs/architecture.md, "Data contract", for the item and batch formats.
"""

from __future__ import annotations

from pathlib import Path

from replic.data.coco import CocoDetection, DatasetError, load_coco_index, num_classes_for
from replic.data.collate import Batch, collate_fn
from replic.data.config import DataConfig
from replic.data.synth import generate_synthetic_coco
from replic.data.transforms import make_transforms

__all__ = [
    "Batch",
    "CocoDetection",
    "DataConfig",
    "DatasetError",
    "annotation_file",
    "build_dataset",
    "collate_fn",
    "generate_synthetic_coco",
    "load_coco_index",
    "make_transforms",
    "num_classes_for",
]


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
    folder = _split_folder(cfg, split)
    return CocoDetection(
        Path(cfg.root) / folder,
        annotation_file(cfg, split),
        transforms=make_transforms(split, cfg),
        remove_crowd=cfg.remove_crowd,
        check_files=cfg.check_files,
    )
