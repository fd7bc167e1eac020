"""Tests for ``replic.eval``: COCO scoring, both backends, input errors, CLI."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from replic.cli import main
from replic.eval import METRIC_NAMES, ScoringInputError, score

BACKENDS = ("pycocotools", "faster-coco-eval")
# Both libraries implement the same matching and interpolation; on identical
# inputs we expect identical floats, so the tolerance only absorbs summation order.
BACKEND_ATOL = 1e-12


def make_gt(seed: int = 0) -> dict:
    """A small COCO dataset: non-contiguous category ids, small/medium/large boxes,
    one crowd region, one image without objects, info/licenses present."""
    rng = random.Random(seed)
    categories = [{"id": cid, "name": f"c{cid}", "supercategory": "x"} for cid in (1, 3, 7, 90)]
    images, annotations = [], []
    ann_id = 1
    for img_id in (11, 12, 13, 14, 15, 16):
        width, height = 320, 240
        images.append({"id": img_id, "width": width, "height": height, "file_name": f"{img_id}.jpg"})
        if img_id == 16:  # empty image
            continue
        for side in (12, 20, 50, 70, 130):  # areas straddle the 32² and 96² bucket limits
            w = side * rng.uniform(0.8, 1.2)
            h = side * rng.uniform(0.8, 1.2)
            x = rng.uniform(0, width - w)
            y = rng.uniform(0, height - h)
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": rng.choice((1, 3, 7, 90)),
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })  # fmt: skip
            ann_id += 1
    annotations.append({
        "id": ann_id, "image_id": 11, "category_id": 3, "bbox": [0.0, 0.0, 160.0, 120.0],
        "area": 160.0 * 120.0, "iscrowd": 1,
    })  # fmt: skip
    return {
        "info": {"description": "test"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def gt_as_detections(gt: dict) -> list[dict]:
    # Crowd regions are not objects to detect; COCO ignores matches to them.
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def noisy_detections(gt: dict, seed: int, jitter: float = 0.15, false_positives: int = 6) -> list[dict]:
    rng = random.Random(seed)
    dets = []
    for d in gt_as_detections(gt):
        x, y, w, h = d["bbox"]
        box = [x + rng.uniform(-jitter, jitter) * w, y + rng.uniform(-jitter, jitter) * h,
               w * rng.uniform(1 - jitter, 1 + jitter), h * rng.uniform(1 - jitter, 1 + jitter)]  # fmt: skip
        dets.append({**d, "bbox": box, "score": rng.random()})
    cat_ids = [c["id"] for c in gt["categories"]]
    for img in gt["images"]:
        for _ in range(false_positives):
            w, h = rng.uniform(5, 120), rng.uniform(5, 100)
            dets.append({
                "image_id": img["id"], "category_id": rng.choice(cat_ids),
                "bbox": [rng.uniform(0, 200), rng.uniform(0, 140), w, h], "score": rng.random(),
            })  # fmt: skip
    return dets


@pytest.fixture
def gt() -> dict:
    return make_gt()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_as_detections_is_perfect(gt, backend):
    metrics = score(gt, gt_as_detections(gt), backend=backend)
    assert list(metrics) == list(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_and_localisation_errors_lower_the_scores(gt, backend):
    perfect = gt_as_detections(gt)
    rng = random.Random(1)
    false_pos = [
        {"image_id": img["id"], "category_id": 7, "bbox": [250.0, 200.0, 40.0, 30.0], "score": 0.0}
        for img in gt["images"]
    ]
    # False positives ranked below every true positive cost nothing...
    ranked = [{**d, "score": 0.5 + 0.5 * rng.random()} for d in perfect] + [
        {**d, "score": 0.1 * rng.random()} for d in false_pos
    ]
    assert score(gt, ranked, backend=backend)["AP"] == pytest.approx(1.0)
    # ...but ranked above them, they do.
    inverted = [{**d, "score": 0.1 * rng.random()} for d in perfect] + [
        {**d, "score": 0.5 + 0.5 * rng.random()} for d in false_pos
    ]
    assert score(gt, inverted, backend=backend)["AP"] < 0.95
    # Shifted boxes stay matched at IoU 0.5 but fail the strict thresholds.
    shifted = [{**d, "bbox": [d["bbox"][0] + 0.12 * d["bbox"][2], *d["bbox"][1:]]} for d in perfect]
    m = score(gt, shifted, backend=backend)
    assert m["AP50"] == pytest.approx(1.0)
    assert 0.0 < m["AP"] < 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections_score_zero(gt, backend):
    metrics = score(gt, [], backend=backend)
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES), metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_without_ground_truth_is_nan(gt, backend):
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 96**2]
    metrics = score(gt, gt_as_detections(gt), backend=backend)
    assert math.isnan(metrics["APl"]) and math.isnan(metrics["ARl"])
    assert metrics["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree(gt, seed):
    dets = noisy_detections(gt, seed=seed)
    ref = score(gt, dets, backend="pycocotools")
    fast = score(gt, dets, backend="faster-coco-eval")
    assert 0.05 < ref["AP"] < 0.95  # a non-trivial case
    for name in METRIC_NAMES:
        if math.isnan(ref[name]):
            assert math.isnan(fast[name]), name
        else:
            assert fast[name] == pytest.approx(ref[name], abs=BACKEND_ATOL), name


def test_inputs_are_not_mutated(gt):
    dets = noisy_detections(gt, seed=3)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    for backend in BACKENDS:
        score(gt, dets, backend=backend)
    assert gt == gt_before and dets == dets_before


def test_paths_and_loaded_data_give_the_same_numbers(gt, tmp_path):
    dets = noisy_detections(gt, seed=4)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert score(tmp_path / "gt.json", str(tmp_path / "dets.json")) == score(gt, dets)


def test_unknown_image_id_names_the_id_and_file(gt, tmp_path):
    dets = gt_as_detections(gt)
    dets[3]["image_id"] = 999
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(ScoringInputError, match=r"dets\.json: detection #3: image_id 999"):
        score(gt, path)


def test_unknown_category_id_is_refused(gt):
    dets = gt_as_detections(gt)
    dets[0]["category_id"] = 2  # ids are 1, 3, 7, 90
    with pytest.raises(ScoringInputError, match=r"detection #0: category_id 2 .*valid ids: \[1, 3, 7, 90\]"):
        score(gt, dets, backend="faster-coco-eval")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{\"image_id\": 11,", r"bad\.json: not valid JSON"),
        ('{"annotations": []}', r"bad\.json: detections must be a JSON list .*COCO dataset"),
        ('[{"image_id": 11, "category_id": 1, "score": 0.5}]', r"bad\.json: detection #0: missing key\(s\) \['bbox'\]"),
        ('[{"image_id": 11, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', r"bad\.json: detection #0: 'bbox'"),
        ('[{"image_id": 11, "category_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}]', r"'score' must be"),
    ],
)
def test_malformed_detection_file_names_the_file(gt, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ScoringInputError, match=message):
        score(gt, path)


def test_bad_ground_truth_is_refused(gt, tmp_path):
    bad = copy.deepcopy(gt)
    bad["annotations"][0]["id"] = 0  # pycocotools would silently count its match as a false positive
    with pytest.raises(ScoringInputError, match=r"annotations\[0\]: annotation ids must be positive"):
        score(bad, [])
    del gt["categories"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ScoringInputError, match=r"gt\.json: ground truth needs a list under 'categories'"):
        score(path, [])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        score(tmp_path / "missing.json", [])


def test_cli_writes_metrics_json_with_null_for_nan(gt, tmp_path, capsys):
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 96**2]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dets = noisy_detections(gt, seed=5)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = tmp_path / "sub" / "metrics.json"
    argv = ["score", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json")]
    assert main([*argv, "--backend", "faster-coco-eval", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert written == printed
    assert written["APl"] is None and written["ARl"] is None
    expected = score(gt, dets)
    assert written["AP"] == pytest.approx(expected["AP"], abs=BACKEND_ATOL)
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_cli_reports_bad_input_as_one_line(gt, tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps([{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    rc = main(["score", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "dets.json" in err and "image_id 5" in err and "Traceback" not in err


def test_synthetic_coco_from_the_data_generator(tmp_path):
    """The generator's val JSON (crowd RLEs, empty images, gaps in ids) scores as expected."""
    synth = pytest.importorskip("replic.data.synth")
    paths = synth.generate_synthetic_coco(tmp_path, n_train=0, n_val=12, size=160, seed=0)
    gt = json.loads(paths["val_annotations"].read_text())
    assert any(a["iscrowd"] for a in gt["annotations"])
    for backend in BACKENDS:
        metrics = score(paths["val_annotations"], gt_as_detections(gt), backend=backend)
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[name] == pytest.approx(1.0, abs=1e-12), (backend, name)
    dets = noisy_detections(gt, seed=6)
    ref = score(paths["val_annotations"], dets, backend="pycocotools")
    fast = score(paths["val_annotations"], dets, backend="faster-coco-eval")
    assert ref["AP"] < 0.95
    for name in METRIC_NAMES:
        assert fast[name] == pytest.approx(ref[name], abs=BACKEND_ATOL, nan_ok=True), name
