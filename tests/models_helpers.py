"""Tiny model configs and synthetic inputs shared by the replic.models tests."""

from __future__ import annotations

import torch

from replic.models import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """ResNet-18 (random init, never downloads), hidden 32, 1 encoder + 2 decoder layers, 6 queries."""
    base = dict(backbone="resnet18", pretrained_backbone="none", hidden_dim=32, nheads=4, enc_layers=1,
                dec_layers=2, dim_feedforward=64, num_queries=6, num_classes=5)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 96×128 images, the second padded on the right from column 96; 2 + 1 GT boxes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    images[1, :, :, 96:] = 0
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    return images, mask, targets
