"""BoxSpread / gt_box_std: the "does the box depend on the image" diagnostic of replic eval."""

from __future__ import annotations

import numpy as np
import torch

from replic.engine.evaluate import BoxSpread, gt_box_std


def test_box_spread_equals_torch_std_over_images_and_merges_across_processes():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(11, 7, 4, generator=g)  # 11 images, 7 queries
    expected = boxes.double().std(0).mean().item()
    whole = BoxSpread()
    for chunk in boxes.split(3):  # batches of 3, 3, 3, 2
        whole.update(chunk)
    assert abs(BoxSpread.merged_std([whole.state()]) - expected) < 1e-12
    rank0, rank1, idle = BoxSpread(), BoxSpread(), BoxSpread()
    rank0.update(boxes[:6])
    rank1.update(boxes[6:])
    assert abs(BoxSpread.merged_std([rank0.state(), idle.state(), rank1.state()]) - expected) < 1e-12


def test_box_spread_is_zero_for_image_independent_boxes_and_undefined_below_two_images():
    fixed = torch.rand(1, 5, 4).expand(9, -1, -1)
    spread = BoxSpread()
    spread.update(fixed)
    assert BoxSpread.merged_std([spread.state()]) == 0.0
    one = BoxSpread()
    one.update(fixed[:1])
    assert BoxSpread.merged_std([one.state()]) is None
    assert BoxSpread.merged_std([BoxSpread().state()]) is None


def test_gt_box_std_normalises_by_image_size_and_skips_crowds():
    gt = {
        "images": [{"id": 1, "width": 100, "height": 50}, {"id": 2, "width": 200, "height": 200}],
        "annotations": [
            {"image_id": 1, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"image_id": 2, "bbox": [100, 20, 50, 100], "iscrowd": 0},
            {"image_id": 2, "bbox": [0, 0, 200, 200], "iscrowd": 1},
        ],
    }
    rows = np.array([[0.2, 0.2, 0.2, 0.2], [0.625, 0.35, 0.25, 0.5]])
    assert abs(gt_box_std(gt) - rows.std(0, ddof=1).mean()) < 1e-12
    assert gt_box_std({"images": gt["images"], "annotations": gt["annotations"][:1]}) is None
