"""HungarianMatcher against brute-force enumeration; empty targets, ties, degenerate boxes."""

from __future__ import annotations

import itertools

import pytest
import torch

from replic.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from replic.models.matcher import HungarianMatcher


def _random_case(g: torch.Generator, batch: int, queries: int, classes: int, max_targets: int):
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=g),
               "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25}
    targets = []
    for _ in range(batch):
        n = int(torch.randint(0, max_targets + 1, (1,), generator=g))
        targets.append({"labels": torch.randint(0, classes - 1, (n,), generator=g),
                        "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25})
    return outputs, targets


def _reference_cost(outputs, targets, b, focal, weights=(2.0, 5.0, 2.0)):
    """Independent per-image cost, written out from the official formulas."""
    logits, boxes = outputs["pred_logits"][b], outputs["pred_boxes"][b]
    labels, tgt = targets[b]["labels"], targets[b]["boxes"]
    if focal:
        p = logits.sigmoid()[:, labels]
        cls = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    else:
        cls = -logits.softmax(-1)[:, labels]
    l1 = (boxes[:, None, :] - tgt[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
    return weights[0] * cls + weights[1] * l1 - weights[2] * giou


def _brute_force_min(cost: torch.Tensor) -> float:
    q, t = cost.shape
    if t == 0:
        return 0.0
    return min(float(sum(cost[perm[j], j] for j in range(t))) for perm in itertools.permutations(range(q), t))


@pytest.mark.parametrize("focal", [True, False])
def test_matches_brute_force_on_random_cases(focal):
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal=focal)
    for _ in range(6):
        outputs, targets = _random_case(g, batch=3, queries=5, classes=4, max_targets=4)
        indices = matcher(outputs, targets)
        for b, (rows, cols) in enumerate(indices):
            cost = _reference_cost(outputs, targets, b, focal)
            n = len(targets[b]["labels"])
            assert len(rows) == len(cols) == n
            assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n
            assert rows.dtype == torch.int64
            chosen = float(cost[rows, cols].sum()) if n else 0.0
            assert chosen == pytest.approx(_brute_force_min(cost), abs=1e-4)


def test_empty_targets_give_empty_matches():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    for rows, cols in matcher(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0


def test_ties_still_give_an_optimal_one_to_one_matching():
    """Identical predictions: every assignment costs the same; the result must still be valid."""
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.zeros(1, 4, 3), "pred_boxes": torch.full((1, 4, 4), 0.5)}
    targets = [{"labels": torch.tensor([1, 1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3)}]
    (rows, cols), = matcher(outputs, targets)
    assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    again = matcher(outputs, targets)[0]
    assert torch.equal(again[0], rows) and torch.equal(again[1], cols)  # deterministic


def test_degenerate_boxes_never_give_nan():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(1, 3, 3),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.3], [0.5, 0.5, 0.4, 0.4]]])}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.2, 0.0]])}]
    cost = matcher.cost_matrix(outputs, targets)
    assert torch.isfinite(cost).all()
    (rows, cols), = matcher(outputs, targets)
    assert len(rows) == 2
    # GIoU of identical zero-area boxes and of inverted boxes is finite.
    inverted = torch.tensor([[0.6, 0.6, 0.4, 0.4]])
    assert torch.isfinite(generalized_box_iou(inverted, inverted)).all()


def test_non_finite_predictions_and_bad_labels_are_reported():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.full((1, 2, 3), float("nan")), "pred_boxes": torch.rand(1, 2, 4)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}]
    with pytest.raises(ValueError, match="not finite"):
        matcher(outputs, targets)
    outputs["pred_logits"] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="labels"):
        matcher(outputs, [{"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}])


def test_one_host_transfer_per_batch(monkeypatch):
    """The batch cost goes to the CPU once, not once per image."""
    matcher = HungarianMatcher()
    g = torch.Generator().manual_seed(1)
    outputs, targets = _random_case(g, batch=4, queries=5, classes=4, max_targets=3)
    calls = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    matcher(outputs, targets)
    assert len(calls) == 1
