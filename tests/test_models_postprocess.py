"""PostProcess: top-k over queries × classes, no NMS, absolute xyxy boxes; DETR drops no-object."""

from __future__ import annotations

import pytest
import torch

from models_helpers import tiny_config
from replic.models import build_postprocess
from replic.models.postprocess import PostProcess


def test_topk_over_queries_and_classes():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0   # best: query 2, class 1
    logits[0, 2, 3] = 2.0   # same query, another class: kept too (no NMS)
    logits[0, 0, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    (result,) = PostProcess(topk=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert result["labels"].tolist() == [1, 3, 0]
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    # query 2: cx 0.25·200 = 50, w 100, cy 50, h 100 → (0, 0, 100, 100)
    torch.testing.assert_close(result["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    torch.testing.assert_close(result["boxes"][2], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_topk_is_capped_by_queries_times_classes_and_configurable():
    out = {"pred_logits": torch.randn(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4)}
    results = PostProcess(topk=100)(out, torch.tensor([[10, 10], [20, 30]]))
    assert [len(r["scores"]) for r in results] == [12, 12]
    assert build_postprocess(tiny_config(postprocess_topk=300)).topk == 300
    assert build_postprocess(tiny_config()).topk == 100


def test_softmax_model_never_returns_the_no_object_class():
    logits = torch.zeros(1, 2, 4)
    logits[..., -1] = 20.0  # no-object dominates
    post = build_postprocess(tiny_config(arch="detr", num_classes=3))
    (result,) = post({"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)}, torch.tensor([[10, 10]]))
    assert len(result["labels"]) == 6 and result["labels"].max() < 3
    assert result["scores"].max() < 1e-6


def test_bad_orig_sizes_are_reported():
    with pytest.raises(ValueError, match="orig_sizes"):
        PostProcess()({"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}, torch.tensor([10, 10]))
