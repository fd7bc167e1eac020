"""SetCriterion: focal / CE terms against independent formulas, normalisation, aux matching, hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from models_helpers import tiny_config
from replic.models import build_criterion
from replic.models.criterion import SetCriterion
from replic.models.matcher import HungarianMatcher

TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]


def _outputs(seed: int = 0, classes: int = 5, queries: int = 4, aux: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: {"pred_logits": torch.randn(2, queries, classes, generator=g),  # noqa: E731
                    "pred_boxes": torch.rand(2, queries, 4, generator=g) * 0.4 + 0.3}
    out = make()
    if aux:
        out["aux_outputs"] = [make() for _ in range(aux)]
    return out


def test_focal_loss_normalisation_matches_independent_formula():
    criterion = build_criterion(tiny_config(aux_loss=False))
    out = _outputs()
    losses = criterion(out, TARGETS)
    indices = criterion.matcher(out, TARGETS)
    onehot = torch.zeros(2, 4, 5)
    for b, (rows, cols) in enumerate(indices):
        onehot[b, rows, TARGETS[b]["labels"][cols]] = 1
    expected = sigmoid_focal_loss(out["pred_logits"], onehot, alpha=0.25, gamma=2.0, reduction="sum") / 3
    torch.testing.assert_close(losses["loss_ce"], expected)
    src = torch.cat([out["pred_boxes"][b, rows] for b, (rows, _) in enumerate(indices)])
    tgt = torch.cat([TARGETS[b]["boxes"][cols] for b, (_, cols) in enumerate(indices)])
    torch.testing.assert_close(losses["loss_bbox"], (src - tgt).abs().sum() / 3)
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert criterion.weight_dict["loss_ce"] == 2.0


def test_cross_entropy_with_no_object_weight():
    criterion = build_criterion(tiny_config(arch="detr", aux_loss=False))
    out = _outputs(classes=6)
    losses = criterion(out, TARGETS)
    indices = criterion.matcher(out, TARGETS)
    target_classes = torch.full((2, 4), 5)
    for b, (rows, cols) in enumerate(indices):
        target_classes[b, rows] = TARGETS[b]["labels"][cols]
    weight = torch.tensor([1, 1, 1, 1, 1, 0.1])
    expected = F.cross_entropy(out["pred_logits"].reshape(-1, 6), target_classes.reshape(-1), weight=weight)
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert criterion.weight_dict["loss_ce"] == 1.0


def test_perfect_boxes_give_zero_box_losses():
    criterion = build_criterion(tiny_config(aux_loss=False))
    out = _outputs()
    out["pred_boxes"][0, 2] = TARGETS[0]["boxes"][0]
    out["pred_boxes"][0, 0] = TARGETS[0]["boxes"][1]
    out["pred_boxes"][1, 3] = TARGETS[1]["boxes"][0]
    losses = criterion(out, TARGETS)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_aux_layers_are_matched_on_their_own():
    """Aux layer = last layer with queries permuted: with its own matching its losses are equal."""
    criterion = build_criterion(tiny_config(dec_layers=3))
    out = _outputs(aux=2)
    perm = torch.tensor([2, 0, 3, 1])
    out["aux_outputs"][1] = {k: v[:, perm] for k, v in out.items() if k.startswith("pred_")}
    losses = criterion(out, TARGETS)
    assert {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou") for i in (0, 1)} <= set(losses)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"{k}_1"], losses[k])
        assert criterion.weight_dict[f"{k}_1"] == criterion.weight_dict[k]
    assert not torch.allclose(losses["loss_bbox_0"], losses["loss_bbox"])


def test_num_boxes_clamped_and_empty_targets_are_finite():
    criterion = build_criterion(tiny_config(aux_loss=False))
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    assert criterion.num_boxes(empty, torch.device("cpu")) == 1.0
    out = _outputs()
    losses = criterion(out, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    expected = sigmoid_focal_loss(out["pred_logits"], torch.zeros(2, 4, 5), reduction="sum")
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert losses["loss_bbox"].item() == 0.0


def test_total_uses_weights_and_skips_logging_terms():
    criterion = build_criterion(tiny_config(dec_layers=2))
    losses = criterion(_outputs(aux=1), TARGETS)
    assert "class_error" in losses and "class_error" not in criterion.weight_dict
    expected = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    torch.testing.assert_close(criterion.total(losses), expected)
    assert len(criterion.weight_dict) == 6


def test_registered_extra_loss_gets_context_and_weight():
    criterion = build_criterion(tiny_config(aux_loss=False))
    seen = {}

    def distill(outputs, targets, context):
        seen.update(context)
        return {"loss_distill": outputs["pred_boxes"].sum() * 0 + 1.5}

    criterion.register_loss(distill, {"loss_distill": 10.0})
    losses = criterion(_outputs(), TARGETS)
    assert losses["loss_distill"].item() == 1.5 and seen["num_boxes"] == 3.0 and len(seen["indices"]) == 2
    base = sum(losses[k] * criterion.weight_dict[k] for k in ("loss_ce", "loss_bbox", "loss_giou"))
    torch.testing.assert_close(criterion.total(losses), base + 15.0)
    with pytest.raises(ValueError, match="already used"):
        criterion.register_loss(distill, {"loss_ce": 1.0})
    criterion.register_loss(lambda o, t, c: {"loss_unweighted": torch.tensor(1.0)}, {"loss_other": 1.0})
    with pytest.raises(KeyError, match="loss_unweighted"):
        criterion(_outputs(), TARGETS)


def test_labels_out_of_range_are_reported():
    criterion = SetCriterion(5, HungarianMatcher(), {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    bad = [{"labels": torch.tensor([5]), "boxes": torch.rand(1, 4)}, TARGETS[1]]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        criterion(_outputs(), bad)
