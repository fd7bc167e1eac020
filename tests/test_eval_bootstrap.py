"""Tests for ``replic.eval.bootstrap``: re-accumulated AP equals pycocotools, paired bootstrap."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from replic.eval import score
from replic.eval.bootstrap import (
    BootstrapResult,
    ImageEvaluation,
    min_true_positives,
    paired_bootstrap,
    resampled_metrics,
)
from replic.eval.coco_eval import load_detections, load_ground_truth, pycocotools_evaluator

METRICS = ("AP", "AP50", "AP75")
ATOL = 1e-12


def make_case(seed: int, n_images: int = 24) -> tuple[dict, list[dict]]:
    """Ground truth + detections exercising what accumulate() is sensitive to.

    Non-contiguous image ids (step 3, so copies ``id * 10 + j`` keep the order), images without
    objects and images without detections, crowd regions, a category with one object in one
    image (9), a category with detections but no object (7: excluded as -1), scores rounded to
    one decimal (ties across images) and images whose detections all share one score (ties
    within an image between true and false positives), localisation errors of all sizes.
    """
    rng = random.Random(seed)
    categories = [{"id": cid, "name": f"c{cid}"} for cid in (1, 2, 5, 7, 9)]
    images, annotations, dets = [], [], []
    ann_id = 1
    for n in range(n_images):
        img_id = 100 + 3 * n
        images.append({"id": img_id, "width": 320, "height": 240, "file_name": f"{img_id}.jpg"})
        objects = []
        for _ in range(rng.choice((0, 1, 2, 3, 4, 6)) if n % 7 else 0):
            w, h = rng.uniform(10, 120), rng.uniform(10, 100)
            objects.append((rng.choice((1, 2, 5)), [rng.uniform(0, 320 - w), rng.uniform(0, 240 - h), w, h]))
        if n == 5:
            objects.append((9, [40.0, 40.0, 60.0, 50.0]))
        for cat, box in objects:
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            ann_id += 1
        if n % 4 == 1:  # a crowd region: detections matched to it are ignored
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": 1,
                                "bbox": [180.0, 120.0, 120.0, 100.0], "area": 12000.0, "iscrowd": 1})
            ann_id += 1
            dets.append({"image_id": img_id, "category_id": 1, "bbox": [185.0, 125.0, 50.0, 40.0],
                         "score": round(rng.random(), 1)})
        if n % 6 == 3:  # no detections on this image
            continue
        image_dets = []
        for cat, box in objects:
            for _ in range(rng.choice((0, 1, 1, 1, 2))):  # missed, found, or found twice
                jitter = rng.choice((0.02, 0.1, 0.25, 0.5))
                x, y, w, h = box
                image_dets.append({"image_id": img_id, "category_id": cat, "score": round(rng.random(), 1),
                                   "bbox": [x + rng.uniform(-jitter, jitter) * w, y + rng.uniform(-jitter, jitter) * h,
                                            w * rng.uniform(1 - jitter, 1 + jitter), h * rng.uniform(1 - jitter, 1 + jitter)]})
        for _ in range(rng.randint(0, 4)):
            w, h = rng.uniform(10, 100), rng.uniform(10, 80)
            image_dets.append({"image_id": img_id, "category_id": rng.choice((1, 2, 5, 7, 9)),
                               "bbox": [rng.uniform(0, 220), rng.uniform(0, 160), w, h], "score": round(rng.random(), 1)})
        if n % 5 == 0:
            for d in image_dets:
                d["score"] = 0.5
        dets.extend(image_dets)
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    return gt, dets


def reference_evaluator(gt: dict, dets: list[dict]):
    gt_dataset, source = load_ground_truth(gt)
    clean, _ = load_detections(dets, gt_dataset, source)
    return pycocotools_evaluator(gt_dataset, clean)


def duplicate_images(gt: dict, dets: list[dict], image_ids: list[int], counts: np.ndarray) -> tuple[dict, list[dict]]:
    """The dataset with image ``image_ids[i]`` present ``counts[i]`` times, copy j as id ``10 * id + j``."""
    draws = dict(zip(image_ids, counts.tolist()))
    new_ids = {img: [10 * img + j for j in range(c)] for img, c in draws.items()}
    images = [{**img, "id": new} for img in gt["images"] for new in new_ids[img["id"]]]
    annotations = []
    for ann in gt["annotations"]:
        for new in new_ids[ann["image_id"]]:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": new})
    new_dets = [{**d, "image_id": new} for d in dets for new in new_ids[d["image_id"]]]
    return {**gt, "images": images, "annotations": annotations}, new_dets


@pytest.fixture(scope="module")
def case() -> tuple[dict, list[dict]]:
    return make_case(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_image_once_equals_pycocotools(seed):
    gt, dets = make_case(seed)
    ref = score(gt, dets)
    ev = ImageEvaluation(gt, dets)
    assert ev.image_ids == sorted(img["id"] for img in gt["images"])
    assert 0.05 < ref["AP"] < 0.9  # a non-trivial case
    for name in METRICS:
        assert abs(ev.metric(name) - ref[name]) <= ATOL, name
    # The whole precision table (categories x IoU x recall thresholds), -1 of category 7 included.
    evaluator = reference_evaluator(gt, dets)
    expected = evaluator.eval["precision"][:, :, :, 0, -1]
    assert (expected[:, :, evaluator.params.catIds.index(7)] == -1).all()
    np.testing.assert_array_equal(ImageEvaluation.from_cocoeval(evaluator).precision(), expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_duplicated_images_equal_physical_copies(case, seed):
    gt, dets = case
    ev = ImageEvaluation(gt, dets)
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, 1, 2, 3], size=len(ev.image_ids), p=[0.3, 0.3, 0.25, 0.15])
    counts[0] = 3  # image 100: all its detections share one score (ties within an image)
    counts[5] = seed % 2  # the only object of category 9: dropped or kept
    dup_gt, dup_dets = duplicate_images(gt, dets, ev.image_ids, counts)
    ref = score(dup_gt, dup_dets)
    for name in METRICS:
        assert abs(ev.metric(name, counts) - ref[name]) <= ATOL, name
    expected = reference_evaluator(dup_gt, dup_dets).eval["precision"][:, :, :, 0, -1]
    np.testing.assert_array_equal(ev.precision(counts), expected)


def test_no_drawn_object_gives_minus_one(case):
    gt, dets = case
    ev = ImageEvaluation(gt, dets)
    counts = np.zeros(len(ev.image_ids), dtype=np.int64)
    counts[0] = 2  # image 100 has no objects
    assert ev.metric("AP", counts) == -1.0
    with pytest.raises(ValueError, match="unknown bootstrap metric 'APs'"):
        ev.metric("APs")
    with pytest.raises(ValueError, match="one count per image"):
        ev.metric("AP", counts[:-1])


def test_min_true_positives_matches_searchsorted():
    rec_thrs = np.linspace(0.0, 1.00, 101, endpoint=True)
    npig = np.arange(0, 400)
    x = min_true_positives(npig, rec_thrs)
    for n in range(1, 400):
        rc = np.arange(n + 1, dtype=np.float64) / n
        np.testing.assert_array_equal(x[n], np.searchsorted(rc, rec_thrs, side="left"), err_msg=str(n))


def test_identical_runs_differ_by_exactly_zero(case):
    gt, dets = case
    result = paired_bootstrap(ImageEvaluation(gt, dets), ImageEvaluation(gt, copy.deepcopy(dets)), resamples=200)
    assert isinstance(result, BootstrapResult)
    assert result.samples.shape == (200,)
    assert result.observed == 0.0
    assert (result.samples == 0.0).all()
    assert result.interval() == (0.0, 0.0)
    assert result.sd == 0.0


def test_clearly_better_run_gives_an_interval_below_zero(case):
    gt, dets = case
    rng = random.Random(5)
    sloppy = []
    for d in dets:
        x, y, w, h = d["bbox"]
        sloppy.append({**d, "bbox": [x + rng.uniform(-0.4, 0.4) * w, y + rng.uniform(-0.4, 0.4) * h, w, h]})
    a, b = ImageEvaluation(gt, sloppy), ImageEvaluation(gt, dets)
    result = paired_bootstrap(a, b, metric="AP", resamples=300, seed=1)
    assert result.observed == pytest.approx(a.metric("AP") - b.metric("AP"))
    assert result.observed < -0.1
    low, high = result.interval(0.95)
    assert low < result.observed < high < 0.0
    assert result.sd > 0.0
    # The interval is the percentile interval of the samples.
    assert (result.samples < low).mean() == pytest.approx(0.025, abs=0.01)


def test_same_seed_same_samples_and_shared_resamples(case):
    gt, dets = case
    a, b = ImageEvaluation(gt, dets), ImageEvaluation(gt, make_case(7)[1])
    first = paired_bootstrap(a, b, metric="AP50", resamples=50, seed=3)
    again = paired_bootstrap(a, b, metric="AP50", resamples=50, seed=3)
    other = paired_bootstrap(a, b, metric="AP50", resamples=50, seed=4)
    np.testing.assert_array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, other.samples)
    # paired_bootstrap is the difference of the runs' metrics on shared resamples.
    both = resampled_metrics([a, b], metric="AP50", resamples=50, seed=3)
    assert both.shape == (2, 50)
    np.testing.assert_array_equal(first.samples, both[0] - both[1])
    alone = resampled_metrics([a], metric="AP50", resamples=50, seed=3)
    np.testing.assert_array_equal(alone[0], both[0])


def test_different_images_are_refused(case):
    gt, dets = case
    fewer = {**gt, "images": [img for img in gt["images"] if img["id"] != 103]}
    fewer["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 103]
    b = ImageEvaluation(fewer, [d for d in dets if d["image_id"] != 103])
    with pytest.raises(ValueError, match=r"different images .*1 only in 0 \(first: \[103\]\)"):
        paired_bootstrap(ImageEvaluation(gt, dets), b, resamples=5)
