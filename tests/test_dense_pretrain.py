"""The mini backbone's dense pretraining task: per-cell targets and the per-box class term."""

from __future__ import annotations

import math

import pytest
import torch

from replic.models.dense_pretrain import (
    LTRB_SCALE,
    STRIDE,
    DensePretrainNet,
    box_class_targets,
    dense_loss,
    dense_targets,
)

# One 64 x 96 image (h x w) with two boxes; raw category ids 7 and 3 (contiguous 1 and 0).
CLASS_INDEX = {3: 0, 7: 1}


def _targets() -> list[dict]:
    h, w = 64, 96
    # cxcywh normalised: a 32 x 32 box centred at (40, 24) px and a 16 x 16 one at (80, 56) px.
    boxes = torch.tensor([[40 / w, 24 / h, 32 / w, 32 / h], [80 / w, 56 / h, 16 / w, 16 / h]])
    return [{"boxes": boxes, "labels": torch.tensor([7, 3]), "size": torch.tensor([h, w])}]


def test_dense_targets_put_each_box_on_its_centre_cell_in_its_class_channel():
    t = dense_targets(_targets(), (4, 6), CLASS_INDEX, 2)
    # Box 1 (class 7 -> channel 1): centre (40, 24) px -> cell (row 1, col 2).
    assert t["heatmap"][0, 1, 1, 2] == 1.0 and t["heatmap"][0, 0, 1, 2] < 1.0
    # Box 2 (class 3 -> channel 0): centre (80, 56) px -> cell (3, 5).
    assert t["heatmap"][0, 0, 3, 5] == 1.0 and t["heatmap"][0, 1, 3, 5] < 1.0
    # ltrb at the first box's centre cell (cell centre (40, 24) px): 16 px to every side.
    expected = math.log(16 / LTRB_SCALE)
    torch.testing.assert_close(t["ltrb"][0, :, 1, 2], torch.full((4,), expected))
    assert t["inside"][0, 0, 1, 2] and not t["inside"][0, 0, 0, 0]
    assert t["valid"].all()  # the 4 x 6 grid covers exactly the 64 x 96 image at stride 16


def test_box_class_targets_are_pixel_corners_and_contiguous_classes():
    boxes, labels = box_class_targets(_targets(), CLASS_INDEX)
    torch.testing.assert_close(boxes[0], torch.tensor([[24.0, 8.0, 56.0, 40.0], [72.0, 48.0, 88.0, 64.0]]))
    assert labels.tolist() == [1, 0]


def test_the_box_class_term_trains_the_trunk_and_is_off_by_default():
    torch.manual_seed(0)
    net = DensePretrainNet("resnet18", num_classes=2, head_dim=16, roi_cls=True)
    images = torch.randn(1, 3, 64, 96)
    outputs = net(images)
    assert outputs["c4"].shape == (1, 256, 64 // STRIDE, 96 // STRIDE)
    boxes, labels = box_class_targets(_targets(), CLASS_INDEX)
    logits = net.classify_boxes(outputs["c4"], boxes)
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grad = net.resnet.layer3[-1].conv2.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the class signal reaches the frozen-later trunk
    assert net.resnet.layer4[0].conv1.weight.grad is None  # C4 only: layer4 is never used

    plain = DensePretrainNet("resnet18", num_classes=2, head_dim=16)
    assert plain.roi_head is None
    with pytest.raises(RuntimeError, match="roi_cls"):
        plain.classify_boxes(outputs["c4"], boxes)
    # The dense terms do not look at the c4 entry.
    terms = dense_loss(plain(images), dense_targets(_targets(), (4, 6), CLASS_INDEX, 2))
    assert set(terms) == {"loss_heatmap", "loss_occupancy", "loss_ltrb", "loss_centreness"}
    assert all(torch.isfinite(v) for v in terms.values())
