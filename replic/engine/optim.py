"""The official optimizer recipe: AdamW with a backbone group, StepLR, weight decay on everything."""

from __future__ import annotations

import torch
from torch import nn

from replic.engine.config import TrainConfig

# Module types whose parameters count as "norm" for weight_decay_norm (detrex convention).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split into (non-backbone | backbone) x (decayed | norm) groups.

    As the official ``main.py``: names containing ``"backbone"`` get ``lr_backbone``; every
    parameter is decayed with ``weight_decay`` unless ``weight_decay_norm`` is set, in which
    case norm-layer parameters use that value instead (detrex: 0.0). Empty groups are dropped
    so the group layout only depends on the model and the config.
    """
    norm_names = _norm_parameter_names(model) if cfg.weight_decay_norm is not None else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = ("backbone" in name, name in norm_names)
        buckets.setdefault(key, []).append(param)
    groups = []
    for is_backbone in (False, True):
        for is_norm in (False, True):
            params = buckets.get((is_backbone, is_norm))
            if not params:
                continue
            decay = cfg.weight_decay_norm if is_norm else cfg.weight_decay
            groups.append(
                {
                    "params": params,
                    "lr": cfg.lr_backbone if is_backbone else cfg.lr,
                    "weight_decay": decay,
                    "name": ("backbone" if is_backbone else "main") + ("_norm" if is_norm else ""),
                }
            )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (official betas/eps: torch defaults)."""
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """StepLR(lr_drop, gamma), stepped once per epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=cfg.lr_gamma)
