"""The loss of a torchvision detector: the terms the model computed itself, plus registered extras."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from replic.models.criterion import ExtraLosses, LossFn


class DetectorLosses(ExtraLosses, nn.Module):
    """``forward(outputs, targets)`` → ``outputs["losses"]`` (unweighted) + registered terms.

    Same interface as :class:`replic.models.criterion.SetCriterion`: ``weight_dict`` gives the
    weights the engine applies, and :meth:`register_loss` adds terms (e.g. feature distillation
    on ``outputs["features"]``); their ``context`` is empty (no matching in these detectors).
    """

    def __init__(self, weight_dict: dict[str, float]) -> None:
        super().__init__()
        self.weight_dict = dict(weight_dict)
        self._extra: list[LossFn] = []

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if "losses" not in outputs:
            raise ValueError("DetectorLosses: outputs have no 'losses' (is the model in training mode?)")
        return self.add_extra_losses(dict(outputs["losses"]), outputs, targets, {})
