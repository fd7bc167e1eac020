"""COCO scoring: pycocotools (reference) and faster-coco-eval backends behind one ``score``."""

from replic.eval.coco_eval import (
    BACKENDS,
    METRIC_NAMES,
    ScoringInputError,
    load_detections,
    load_ground_truth,
    metrics_to_json,
    score,
    score_with_log,
    write_json_atomic,
)

__all__ = [
    "BACKENDS",
    "METRIC_NAMES",
    "ScoringInputError",
    "load_detections",
    "load_ground_truth",
    "metrics_to_json",
    "score",
    "score_with_log",
    "write_json_atomic",
]
