"""``replic score --breakdown``: per-category vs class-agnostic AP50 by area, and the confusion matrix."""

from __future__ import annotations

import json

import pytest

from replic.cli import main
from replic.eval import score
from replic.eval.breakdown import breakdown, confusion, format_breakdown
from test_eval import gt_as_detections, make_gt, noisy_detections


def _relabel(dets: list[dict], mapping: dict[int, int]) -> list[dict]:
    return [{**d, "category_id": mapping.get(d["category_id"], d["category_id"])} for d in dets]


def test_swapped_classes_lose_per_category_ap50_but_not_class_agnostic():
    gt = make_gt()
    # Every box exact, every class wrong (a cyclic relabelling): boxes found, classes missed.
    result = breakdown(gt, _relabel(gt_as_detections(gt), {1: 3, 3: 7, 7: 90, 90: 1}))
    for area in ("all", "small", "medium", "large"):
        assert result["class_agnostic"][f"AP50_{area}"] == pytest.approx(1.0)
        assert result["class_agnostic"][f"R50_{area}"] == pytest.approx(1.0)
        assert result["per_category"][f"AP50_{area}"] == pytest.approx(0.0)
    # Right classes: both scorings perfect, and the per-category AP50 is COCO's AP50.
    exact = breakdown(gt, gt_as_detections(gt))
    assert exact["per_category"]["AP50_all"] == pytest.approx(1.0)
    dets = noisy_detections(gt, seed=3)
    assert breakdown(gt, dets)["per_category"]["AP50_all"] == pytest.approx(score(gt, dets)["AP50"], abs=1e-12)


def test_confusion_counts_the_top_scoring_overlapping_detection():
    gt = make_gt()
    objects = [a for a in gt["annotations"] if not a["iscrowd"]]
    first = objects[0]
    dets = gt_as_detections(gt)
    # A higher-scoring, slightly shifted box of another class on the first object wins its row;
    # the second object gets no overlapping detection at all.
    other = 90 if first["category_id"] != 90 else 1
    x, y, w, h = first["bbox"]
    dets.append({"image_id": first["image_id"], "category_id": other, "bbox": [x + 0.05 * w, y, w, h],
                 "score": 2.0})
    second = objects[1]
    dets = [d for d in dets if not (d["image_id"] == second["image_id"] and d["bbox"] == second["bbox"])]
    result = confusion(gt, dets)
    rows, cols, counts = result["rows"], result["columns"], result["counts"]
    assert rows == ["c1", "c3", "c7", "c90"] and cols == ["none", "c1", "c3", "c7", "c90"]
    assert sum(map(sum, counts)) == len(objects)
    diagonal = sum(counts[i][i + 1] for i in range(len(rows)))
    assert diagonal == len(objects) - 2
    assert counts[rows.index(f"c{first['category_id']}")][cols.index(f"c{other}")] >= 1
    assert counts[rows.index(f"c{second['category_id']}")][0] >= 1
    # min_area drops small objects from the rows.
    big = confusion(gt, dets, min_area=96.0 ** 2)
    assert sum(map(sum, big["counts"])) == sum(1 for a in objects if a["area"] >= 96.0 ** 2)


def test_cli_breakdown_writes_and_prints_it(tmp_path, capsys):
    gt = make_gt()
    dets = noisy_detections(gt, seed=4)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "metrics.json"
    assert main(["score", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"),
                 "--breakdown", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out)
    assert written["breakdown"] == breakdown(gt, dets)
    table = format_breakdown(written["breakdown"])
    assert "class-agnostic" in table and "| c1 |" in table
