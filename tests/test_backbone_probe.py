"""The backbone linear probe (docs/mini.md): box features, per-size accuracies, input errors."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from replic.data.synth import generate_synthetic_coco
from replic.eval.backbone_probe import main, probe


@pytest.fixture(scope="module")
def data_and_weights(tmp_path_factory):
    root = generate_synthetic_coco(tmp_path_factory.mktemp("probe"), n_train=24, n_val=8, size=160)["root"]
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    weights = root.parent / "w.pt"
    torch.save({"model": state}, weights)
    return root, weights


def _non_crowd_boxes(root, split: str) -> int:
    ann = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
    return sum(1 for a in ann["annotations"] if not a.get("iscrowd", 0))


def test_probe_scores_every_val_box_once_and_bins_them_by_size(data_and_weights):
    root, weights = data_and_weights
    result = probe(str(weights), str(root), train_images=24, val_images=8)
    assert result["train_boxes"] == _non_crowd_boxes(root, "train")
    assert result["val_boxes"] == _non_crowd_boxes(root, "val")
    assert sum(b["boxes"] for b in result["val_by_size"].values()) == result["val_boxes"]
    # 1,024 features for a few dozen boxes: the probe fits its train boxes.
    assert result["train_accuracy"] > 0.9 and 0.0 <= result["val_accuracy"] <= 1.0


def test_probe_names_a_missing_weights_file(tmp_path, data_and_weights, capsys):
    root, _ = data_and_weights
    assert main(["--weights", str(tmp_path / "absent.pt"), "--data", str(root)]) == 2
    assert "absent.pt" in capsys.readouterr().err
