"""COCO bbox scoring with pycocotools (the reference) or faster-coco-eval.

``score(gt, detections)`` validates both inputs first (so a wrong image id or a
malformed file fails with a message naming the file and the entry, before any
evaluation work), hands each backend its own copies (both libraries mutate the
dicts they are given), silences their stdout, and returns the twelve standard
COCO summary numbers as plain floats.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from replic.io import atomic_write_text  # noqa: I001

# The order of pycocotools' ``COCOeval.stats`` for iouType bbox/segm.
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
BACKENDS: tuple[str, ...] = ("pycocotools", "faster-coco-eval")
IOU_TYPES: tuple[str, ...] = ("bbox",)


def ap_points(value: float | None) -> float | None:
    """A COCO fraction (pycocotools' 0.250) as the AP points the papers' tables print (25.0).

    ``None`` and NaN (no ground truth in a bucket) stay ``None``.
    """
    if value is None or not math.isfinite(float(value)):
        return None
    return 100.0 * float(value)


def format_ap_points(metrics: Mapping[str, float | None], names: Sequence[str] = ("AP", "AP50")) -> str:
    """``AP 25.0 AP50 39.9``: the named metrics in points with one decimal (``n/a`` if missing)."""
    parts = []
    for name in names:
        points = ap_points(metrics.get(name))
        parts.append(f"{name} {points:.1f}" if points is not None else f"{name} n/a")
    return " ".join(parts)


class ScoringInputError(ValueError):
    """Ground truth or detections are unusable; the message names the source and entry."""


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open() as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScoringInputError(f"{path}: not valid JSON ({what}): {err}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _check_box(box: Any, where: str) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ScoringInputError(f"{where}: 'bbox' must be a list [x, y, w, h], got {box!r}")
    if not all(_is_finite_number(v) for v in box):
        raise ScoringInputError(f"{where}: 'bbox' must hold 4 finite numbers, got {box!r}")
    if box[2] < 0 or box[3] < 0:
        raise ScoringInputError(f"{where}: 'bbox' width and height must be >= 0, got {box!r}")
    return [float(v) for v in box]


def load_ground_truth(gt: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Read and validate a COCO ground-truth dataset; return a private copy and its name.

    The copy has fresh image/annotation/category dicts (the evaluators write
    ``ignore`` flags into them) and always carries ``info`` and ``licenses``
    (some pycocotools releases fail without ``info``).
    """
    if isinstance(gt, Mapping):
        source, data = "<ground-truth dict>", gt
    else:
        source = str(gt)
        data = _read_json(Path(gt), "ground truth")
    if not isinstance(data, Mapping):
        raise ScoringInputError(f"{source}: ground truth must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ScoringInputError(f"{source}: ground truth needs a list under '{key}'")

    images = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, Mapping) or not _is_int(img.get("id")):
            raise ScoringInputError(f"{source}: images[{i}] needs an integer 'id'")
        images.append(dict(img))
    image_ids = {img["id"] for img in images}
    if len(image_ids) != len(images):
        raise ScoringInputError(f"{source}: duplicate image ids in 'images'")

    categories = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, Mapping) or not _is_int(cat.get("id")):
            raise ScoringInputError(f"{source}: categories[{i}] needs an integer 'id'")
        categories.append(dict(cat))
    category_ids = {cat["id"] for cat in categories}

    annotations = []
    ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise ScoringInputError(f"{where}: must be an object")
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise ScoringInputError(f"{where}: needs an integer '{key}'")
        # pycocotools stores matched GT ids in a float array and tests them for
        # truthiness, so a GT with id 0 silently turns its true positive into a false one.
        if ann["id"] <= 0:
            raise ScoringInputError(f"{where}: annotation ids must be positive, got {ann['id']}")
        if ann["id"] in ann_ids:
            raise ScoringInputError(f"{where}: duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise ScoringInputError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise ScoringInputError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        _check_box(ann.get("bbox"), where)
        if not _is_finite_number(ann.get("area")):
            raise ScoringInputError(f"{where}: needs a numeric 'area' (COCO uses it for APs/APm/APl)")
        annotations.append(dict(ann))

    copy = {
        "info": dict(data.get("info") or {}),
        "licenses": list(data.get("licenses") or []),
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return copy, source


def load_detections(
    dets: str | os.PathLike | Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    gt_source: str = "<ground truth>",
) -> tuple[list[dict[str, Any]], str]:
    """Read and validate detections in the COCO results format against ``gt``.

    Returns fresh ``{image_id, category_id, bbox, score}`` dicts (the
    evaluators add fields to the dicts they receive) and the source name.
    """
    if isinstance(dets, (str, os.PathLike)):
        source = str(dets)
        data = _read_json(Path(dets), "detections")
    else:
        source, data = "<detections list>", dets
    if isinstance(data, Mapping):
        hint = " (this looks like a COCO dataset, not a results list)" if "annotations" in data else ""
        raise ScoringInputError(f"{source}: detections must be a JSON list of objects, got an object{hint}")
    if not isinstance(data, (list, tuple)):
        raise ScoringInputError(f"{source}: detections must be a JSON list of objects, got {type(data).__name__}")

    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    clean = []
    for i, det in enumerate(data):
        where = f"{source}: detection #{i}"
        if not isinstance(det, Mapping):
            raise ScoringInputError(f"{where}: must be an object, got {det!r}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise ScoringInputError(f"{where}: missing key(s) {missing}")
        image_id, category_id = det["image_id"], det["category_id"]
        if not _is_int(image_id):
            raise ScoringInputError(f"{where}: 'image_id' must be an integer, got {image_id!r}")
        if not _is_int(category_id):
            raise ScoringInputError(f"{where}: 'category_id' must be an integer, got {category_id!r}")
        if image_id not in image_ids:
            raise ScoringInputError(f"{where}: image_id {image_id} is not an image of the ground truth {gt_source}")
        if category_id not in category_ids:
            raise ScoringInputError(
                f"{where}: category_id {category_id} is not a category of the ground truth {gt_source} "
                f"(valid ids: {sorted(category_ids)})"
            )
        if not _is_finite_number(det["score"]):
            raise ScoringInputError(f"{where}: 'score' must be a finite number, got {det['score']!r}")
        clean.append({
            "image_id": int(image_id),
            "category_id": int(category_id),
            "bbox": _check_box(det["bbox"], where),
            "score": float(det["score"]),
        })  # fmt: skip
    return clean, source


def _empty_results(gt_dataset: dict[str, Any]) -> dict[str, Any]:
    # pycocotools' loadRes indexes anns[0] and crashes on an empty list; an empty
    # results dataset evaluates fine and gives 0 wherever the GT has objects.
    return {
        "info": {},
        "images": list(gt_dataset["images"]),
        "categories": [dict(c) for c in gt_dataset["categories"]],
        "annotations": [],
    }


def pycocotools_evaluator(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str = "bbox",
                          use_cats: bool = True, log: io.StringIO | None = None) -> Any:
    """A pycocotools ``COCOeval`` over validated inputs, evaluated and accumulated (stdout to ``log``).

    ``use_cats=False`` scores class-agnostically. pycocotools writes into ``gt`` and ``dets``:
    pass copies that are not used again.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(log if log is not None else io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            coco_dt = COCO()
            coco_dt.dataset = _empty_results(gt)
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _score_pycocotools(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str) -> tuple[list[float], str]:
    log = io.StringIO()
    evaluator = pycocotools_evaluator(gt, dets, iou_type, log=log)
    with contextlib.redirect_stdout(log):
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[: len(METRIC_NAMES)]], log.getvalue()


def _score_faster(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str) -> tuple[list[float], str]:
    from faster_coco_eval import COCO, COCOeval_faster

    lines: list[str] = []

    def collect(*args: Any) -> None:
        lines.append(" ".join(str(a) for a in args))

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt, print_function=collect)
        coco_dt = coco_gt.loadRes(dets) if dets else COCO(_empty_results(gt), print_function=collect)
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=collect)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[: len(METRIC_NAMES)]], "\n".join(lines)


def score_with_log(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: str | os.PathLike | Sequence[Mapping[str, Any]],
    backend: str = "pycocotools",
    iou_type: str = "bbox",
) -> tuple[dict[str, float], str]:
    """Like :func:`score`, also returning the evaluator's summary text (for logs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scoring backend {backend!r}; choose one of {list(BACKENDS)}")
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unsupported iou_type {iou_type!r}; supported: {list(IOU_TYPES)}")
    gt_dataset, gt_source = load_ground_truth(gt)
    dets, _ = load_detections(detections, gt_dataset, gt_source)
    run = _score_pycocotools if backend == "pycocotools" else _score_faster
    stats, log = run(gt_dataset, dets, iou_type)
    # Both libraries write -1 for a bucket without ground truth (e.g. no small objects).
    metrics = {name: (math.nan if value == -1 else value) for name, value in zip(METRIC_NAMES, stats)}
    return metrics, log


def score(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: str | os.PathLike | Sequence[Mapping[str, Any]],
    backend: str = "pycocotools",
    iou_type: str = "bbox",
) -> dict[str, float]:
    """Score COCO-format detections against COCO ground truth.

    Args:
        gt: path to a COCO annotation JSON, or the loaded dict.
        detections: path to a COCO results JSON, or the loaded list of
            ``{image_id, category_id, bbox: [x, y, w, h], score}``.
        backend: ``"pycocotools"`` (reference) or ``"faster-coco-eval"``.
        iou_type: only ``"bbox"`` for now.

    Returns:
        ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` as
        fractions in [0, 1]; NaN where the ground truth has no object in a bucket.
    """
    return score_with_log(gt, detections, backend=backend, iou_type=iou_type)[0]


def metrics_to_json(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Replace NaN with None so the metrics serialise as strict JSON (``null``)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented strict JSON (no NaN), atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)
