"""replic.models — DETR and Conditional DETR, faithful to the official code.

Public API (see docs/architecture.md, "Model contract"):
``ModelConfig``, ``CriterionConfig``, ``build_model``, ``build_criterion``,
``build_postprocess``, ``Detector``, ``HungarianMatcher``, ``SetCriterion``, ``PostProcess``.
"""

from replic.models.build import build_criterion, build_matcher, build_model, build_postprocess
from replic.models.config import CriterionConfig, ModelConfig
from replic.models.criterion import SetCriterion
from replic.models.detector import Detector, ExtraQueries
from replic.models.matcher import HungarianMatcher
from replic.models.postprocess import PostProcess

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
