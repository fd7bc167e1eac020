"""replic.models — DETR and Conditional DETR, faithful to the official code.

Public API (see docs/architecture.md, "Model contract"):
``ModelConfig``, ``CriterionConfig``, ``build_model``, ``build_criterion``,
``build_postprocess``, ``Detector``, ``HungarianMatcher``, ``SetCriterion``, ``PostProcess``.
"""

from importlib import import_module
from typing import Any

# Exports load lazily: `replic.models.config` is imported by every config loader and the
# CLI's --help, which must not pay for importing torch and torchvision.
_EXPORTS = {
    "build_criterion": "replic.models.build",
    "build_matcher": "replic.models.build",
    "build_model": "replic.models.build",
    "build_postprocess": "replic.models.build",
    "CriterionConfig": "replic.models.config",
    "ModelConfig": "replic.models.config",
    "SetCriterion": "replic.models.criterion",
    "Detector": "replic.models.detector",
    "ExtraQueries": "replic.models.detector",
    "HungarianMatcher": "replic.models.matcher",
    "PostProcess": "replic.models.postprocess",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'replic.models' has no attribute {name!r}")


__all__ = [
    "CriterionConfig",
    "Detector",
    "ExtraQueries",
    "HungarianMatcher",
    "ModelConfig",
    "PostProcess",
    "SetCriterion",
    "build_criterion",
    "build_matcher",
    "build_model",
    "build_postprocess",
]
