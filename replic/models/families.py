"""Model families: what the engine needs from a kind of detector, and nothing more.

The engine is family-agnostic: it asks an experiment's family for the detector, the loss
(terms + weights), the post-processing that turns outputs into COCO detections, and the facts
recorded with an evaluation. Two families exist:

- ``detr`` (a model section without ``family``): DETR and Conditional DETR, replic's own core;
- ``cnn`` (``model.family: cnn``): torchvision Faster R-CNN / RetinaNet / FCOS with FPN
  (``replic.models.cnn``).

Both return dict outputs; feature maps other methods tap are under ``outputs["features"]``
(DETR: backbone ``C2``..``C5``; CNN: FPN ``P2``..``P7`` by level). A detector whose training
forward needs the targets says so with a class attribute ``takes_targets = True``.
Builders are imported lazily so a config load imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """One family: the module holding its builders (``build_model``, ``build_criterion``,
    ``build_postprocess``, each taking the model config section)."""

    name: str
    builders: str

    def _builder(self, name: str) -> Any:
        return getattr(import_module(self.builders), name)

    def build_model(self, cfg: Any) -> nn.Module:
        """The detector (replic model contract: ``forward(images, mask[, targets]) -> dict``)."""
        return self._builder("build_model")(cfg)

    def build_criterion(self, cfg: Any) -> nn.Module:
        """``criterion(outputs, targets) -> {term: unweighted loss}`` with ``criterion.weight_dict``
        and ``criterion.register_loss(fn, weights)``."""
        return self._builder("build_criterion")(cfg)

    def build_postprocess(self, cfg: Any) -> nn.Module:
        """``postprocess(outputs, orig_sizes) -> [{scores, labels, boxes xyxy in the file}]``."""
        return self._builder("build_postprocess")(cfg)

    def eval_settings(self, cfg: Any) -> dict[str, Any]:
        """The detection-selection settings recorded with an evaluation's metrics."""
        if self.name == "cnn":
            return {"score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms,
                    "detections_per_img": cfg.detections_per_img}
        return {"topk": cfg.postprocess_topk}


FAMILIES: dict[str, ModelFamily] = {
    "detr": ModelFamily("detr", "replic.models.build"),
    "cnn": ModelFamily("cnn", "replic.models.cnn.build"),
}


def family_of(model_cfg: Any) -> ModelFamily:
    """The family of a model config section (its ``family`` attribute; none = ``detr``)."""
    return FAMILIES[getattr(model_cfg, "family", "detr")]
