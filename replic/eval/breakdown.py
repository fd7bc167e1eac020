"""Where AP is lost: localisation vs classification, by object size.

``replic score --breakdown`` adds, to the twelve COCO numbers, AP50 and recall at IoU 0.5 per
area range scored twice with pycocotools — per category (the COCO protocol) and class-agnostic
(``useCats=0``: a box counts if it covers an object of any class) — and a confusion matrix: for
each ground-truth object, the class of the highest-scoring detection that overlaps it at
IoU ≥ 0.5. A high class-agnostic AP50 next to a low per-category one says the boxes are found
and the classes are wrong (at mini scale: 51.7 vs 36.1, docs/mini.md).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from replic.eval.coco_eval import load_detections, load_ground_truth, pycocotools_evaluator

AREAS: tuple[str, ...] = ("all", "small", "medium", "large")


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def ap50_by_area(gt: dict[str, Any], dets: list[dict[str, Any]], use_cats: bool) -> dict[str, Any]:
    """AP50 and recall at IoU 0.5 (100 detections per image) for each area range."""
    # Copies: pycocotools writes into its inputs, and each dataset is scored twice.
    evaluator = pycocotools_evaluator(copy.deepcopy(gt), copy.deepcopy(dets), use_cats=use_cats)
    iou_index = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    max_dets = len(evaluator.params.maxDets) - 1  # 100
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    out: dict[str, Any] = {}
    for a, area in enumerate(AREAS):
        out[f"AP50_{area}"] = _mean_valid(precision[iou_index, :, :, a, max_dets])
        out[f"R50_{area}"] = _mean_valid(recall[iou_index, :, a, max_dets])
    return out


def _iou_xywh(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1 = np.maximum(boxes[:, 0], box[0])
    y1 = np.maximum(boxes[:, 1], box[1])
    x2 = np.minimum(boxes[:, 0] + boxes[:, 2], box[0] + box[2])
    y2 = np.minimum(boxes[:, 1] + boxes[:, 3], box[1] + box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = boxes[:, 2] * boxes[:, 3] + box[2] * box[3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def confusion(gt: dict[str, Any], dets: list[dict[str, Any]], iou: float = 0.5,
              min_area: float = 0.0) -> dict[str, Any]:
    """Rows: ground-truth class; columns: the class of the top-scoring detection at IoU ≥ ``iou``.

    Column ``none``: no detection of any class overlaps the object that much. Crowd objects and
    objects with ``area < min_area`` are skipped.
    """
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    ids = sorted(names)
    column = {cid: i + 1 for i, cid in enumerate(ids)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for det in dets:
        by_image.setdefault(int(det["image_id"]), []).append(det)
    for image_dets in by_image.values():
        image_dets.sort(key=lambda d: -float(d["score"]))
    matrix = np.zeros((len(ids), len(ids) + 1), dtype=np.int64)
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0) or float(ann.get("area", 0.0)) < min_area:
            continue
        row = column[int(ann["category_id"])] - 1
        candidates = by_image.get(int(ann["image_id"]), [])
        hit = 0
        if candidates:
            overlaps = _iou_xywh(np.array([d["bbox"] for d in candidates], dtype=np.float64),
                                 np.array(ann["bbox"], dtype=np.float64))
            above = np.nonzero(overlaps >= iou)[0]
            if above.size:
                hit = column.get(int(candidates[int(above[0])]["category_id"]), 0)
        matrix[row, hit] += 1
    labels = [names[c] for c in ids]
    return {"rows": labels, "columns": ["none", *labels], "counts": matrix.tolist(),
            "iou": iou, "min_area": min_area}


def breakdown(gt: str | os.PathLike | Mapping[str, Any],
              detections: str | os.PathLike | Sequence[Mapping[str, Any]],
              min_area: float = 32.0 ** 2) -> dict[str, Any]:
    """Per-category and class-agnostic AP50 / recall by area, and the confusion matrix.

    The confusion matrix counts objects of ``area >= min_area`` (COCO medium and large by
    default: at small sizes a miss is usually a localisation miss, not a confusion).
    """
    gt_dataset, source = load_ground_truth(gt)
    dets, _ = load_detections(detections, gt_dataset, source)
    return {"per_category": ap50_by_area(gt_dataset, dets, use_cats=True),
            "class_agnostic": ap50_by_area(gt_dataset, dets, use_cats=False),
            "confusion": confusion(gt_dataset, dets, min_area=min_area)}


def format_breakdown(result: Mapping[str, Any]) -> str:
    """Markdown tables of :func:`breakdown`'s result (×100 for AP and recall)."""

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = ["| scoring | " + " | ".join(f"AP50 {a}" for a in AREAS) + " | "
             + " | ".join(f"R50 {a}" for a in AREAS) + " |",
             "|---" * (1 + 2 * len(AREAS)) + "|"]
    for key in ("per_category", "class_agnostic"):
        row = result[key]
        lines.append(f"| {key.replace('_', '-')} | " + " | ".join(pct(row[f"AP50_{a}"]) for a in AREAS)
                     + " | " + " | ".join(pct(row[f"R50_{a}"]) for a in AREAS) + " |")
    conf = result["confusion"]
    lines += ["", f"Confusion (objects of area >= {conf['min_area']:g}; columns: class of the "
              f"top-scoring detection at IoU >= {conf['iou']:g}):", "",
              "| GT \\ detected | " + " | ".join(conf["columns"]) + " | correct |",
              "|---" * (len(conf["columns"]) + 2) + "|"]
    for r, (name, counts) in enumerate(zip(conf["rows"], conf["counts"])):
        total = sum(counts)
        share = f"{counts[r + 1] / total:.2f}" if total else "—"
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + f" | {share} |")
    return "\n".join(lines)
