"""The loss of a torchvision detector: the terms the model computed itself, plus registered extras."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from replic.models.criterion import LossFn


class DetectorLosses(nn.Module):
    """``forward(outputs, targets)`` → ``outputs["losses"]`` (unweighted) + registered terms.

    Same interface as :class:`replic.models.criterion.SetCriterion`: ``weight_dict`` gives the
    weights the engine applies, and :meth:`register_loss` adds terms (e.g. feature distillation
    on ``outputs["features"]``); their ``context`` is empty (no matching in these detectors).
    """

    def __init__(self, weight_dict: dict[str, float]) -> None:
        super().__init__()
        self.weight_dict = dict(weight_dict)
        self._extra: list[LossFn] = []

    def register_loss(self, fn: LossFn, weights: dict[str, float]) -> None:
        """Add an extra loss callable; every key it returns must be in ``weights``."""
        clash = set(weights) & set(self.weight_dict)
        if clash:
            raise ValueError(f"register_loss: loss names already used: {sorted(clash)}")
        self._extra.append(fn)
        self.weight_dict.update(weights)

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if "losses" not in outputs:
            raise ValueError("DetectorLosses: outputs have no 'losses' (is the model in training mode?)")
        losses = dict(outputs["losses"])
        for fn in self._extra:
            losses.update(fn(outputs, targets, {}))
        return losses
