"""Shared runtime pieces of training and evaluation: device, seeding, datasets, AMP, model build."""

from __future__ import annotations

import logging
import os
import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replic.engine.config import ExperimentConfig

log = logging.getLogger("replic.engine")


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; CUDA processes use their local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for this process."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_determinism(enabled: bool, device: torch.device) -> None:
    """Deterministic kernels where the backend has them (warn instead of failing elsewhere)."""
    if not enabled:
        return
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for reproducible matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every new tensor with NaN (a debugging aid of deterministic mode) costs ~40 %
    # of a CPU step and changes no result of correct code.
    torch.utils.deterministic.fill_uninitialized_memory = False


def autocast_context(amp: str, device: torch.device) -> AbstractContextManager:
    """bf16/fp16 autocast on CUDA; fp32 on CPU whatever the setting."""
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_float32(value: Any) -> Any:
    """Cast floating tensors in a nested output dict/list to fp32 (losses run in fp32)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def split_paths(cfg: ExperimentConfig, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split under ``data.root``."""
    name = cfg.data.train_split if split == "train" else cfg.data.val_split
    root = Path(cfg.data.root)
    return root / name, root / "annotations" / f"instances_{name}.json"


def build_dataset(cfg: ExperimentConfig, split: str) -> Any:
    """The COCO-format dataset of ``split`` ("train" | "val") with the recipe's transforms."""
    from replic.data import build_dataset as build_data

    return build_data(cfg.data, split)


def build_detector(cfg: ExperimentConfig) -> torch.nn.Module:
    """The detector of the experiment (replic.models contract), as its training method builds it."""
    from replic.methods import build_method

    return build_method(cfg).build_model()


def build_loss(cfg: ExperimentConfig) -> torch.nn.Module:
    """The loss of the experiment's model family (DETR: matcher + set criterion; CNN: the
    detector's own terms), with ``weight_dict``."""
    from replic.models.families import family_of

    return family_of(cfg.model).build_criterion(cfg.model)


def build_postprocessor(cfg: ExperimentConfig) -> torch.nn.Module:
    """Post-processing of the experiment's model family (outputs -> boxes in the image files)."""
    from replic.models.families import family_of

    return family_of(cfg.model).build_postprocess(cfg.model)


def loader_generator(seed: int, *parts: int) -> torch.Generator:
    """A private generator for a DataLoader, so creating one never draws from the global RNG."""
    from replic.engine.sampling import mix_seed

    return torch.Generator().manual_seed(mix_seed(seed, *parts))


def worker_init(worker_id: int) -> None:
    """Data-loader workers: one thread each (the samples are seeded individually)."""
    torch.set_num_threads(1)
