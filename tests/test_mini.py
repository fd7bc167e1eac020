"""The mini scale learns: a reduced mini run (short dense pretraining, cached features) detects.

A regression that stops learning (the smoke-scale state: one fixed box per query) is caught by
the AP50 and the spread of each image's top-scoring box, with thresholds set from measurement
(below). Also: the mini overlay validates for every experiment of the Conditional DETR tables,
and the pretrained weights load into the mini backbone with their provenance.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from replic.data.synth import generate_synthetic_coco
from replic.engine.config import load_experiment
from replic.engine.pretrain import PretrainOptions, pretrain_backbone, provenance_path
from replic.engine.train import train

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "cdetr_r50_50ep.yaml"

# Reduced mini run (sizes as configs/scales/mini.yaml except where noted).
N_TRAIN, N_VAL = int(os.environ.get("MINI_TEST_TRAIN", 800)), 100
PRETRAIN_STEPS = int(os.environ.get("MINI_TEST_PRETRAIN_STEPS", 120))
TRAIN_STEPS = int(os.environ.get("MINI_TEST_STEPS", 1500))
# Thresholds from measurement, taken at the earlier mini width (hidden 64, 20 queries; the test has
# passed at hidden 128 / 30 queries since, not re-measured). That run (2026-12-01, one thread, 2m57s of CPU for the whole
# module, 15 min wall on the contended 2-core machine): AP50 10.7, top_box_std 0.17 x the
# ground truth's, box_std 0.0048. An untrained mini model scores AP50 1-4 on a handful of val
# images (its top query is close to random, so its top-box spread is 0.3-0.4 x GT: AP50 is the
# test against "random"); a model collapsed onto the box prior, the smoke-scale failure, puts
# the same top box on every image (spread 0.001-0.011 in issue 12: the spread is the test
# against "prior").
MIN_AP50 = 0.05
MIN_TOP_BOX_STD_RATIO = 0.08


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("mini"), n_train=N_TRAIN, n_val=N_VAL, size=160)["root"]


@pytest.fixture(scope="module")
def pretrained(mini_data, tmp_path_factory) -> Path:
    """A short dense pretraining shared by the tests of this module."""
    out = tmp_path_factory.mktemp("backbone") / "resnet18_dense.pt"
    pretrain_backbone(PretrainOptions(data_root=str(mini_data), steps=PRETRAIN_STEPS, batch_size=8,
                                      calib_batches=8, val_batches=2, roi_cls_weight=1.0), out, progress=False)
    return out


@pytest.mark.slow  # shares the module's short pretraining (~1 min of CPU) with the detection test
def test_pretrained_weights_record_their_provenance_and_load_into_the_mini_backbone(pretrained, mini_data):
    record = json.loads(provenance_path(pretrained).read_text())
    assert record["steps"] == PRETRAIN_STEPS and record["options"]["data_root"] == str(mini_data)
    assert len(record["sha256"]) == 64 and record["git"]
    # Val losses below the untrained head's (heatmap focal loss starts at ~3-4 with the 0.01 prior).
    assert record["val_losses"]["loss_heatmap"] < 3.0
    # The per-box class term (config/config.yaml mini_pretrain.roi_cls_weight) ran and is recorded.
    assert record["options"]["roi_cls_weight"] == 1.0 and "loss_roi_cls" in record["val_losses"]
    cfg = load_experiment(EXPERIMENT, "mini", {"data": {"root": str(mini_data)},
                                               "model": {"pretrained_backbone": str(pretrained)}})
    from replic.models.build import build_model

    backbone = build_model(cfg.model).backbone[0]
    state = torch.load(pretrained, weights_only=True)["model"]
    torch.testing.assert_close(backbone.body["layer3"][0].conv1.weight, state["layer3.0.conv1.weight"])
    assert "layer4" not in dict(backbone.body.named_children())  # C4 input: layer4 never runs


def _table_experiments() -> list[str]:
    from replic.workflow.registry import load_registry

    return load_registry(REPO / "configs" / "tables.yaml").experiments(["conditional_detr", "cdetr_ablations"])


@pytest.mark.parametrize("experiment", _table_experiments())
def test_mini_overlay_validates_for_the_conditional_detr_tables(experiment, tmp_path):
    from replic.config import deep_merge

    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "instances_train2017.json").write_text(json.dumps({"categories": [{"id": 3, "name": "x"}]}))
    cfg = load_experiment(REPO / "configs" / "experiments" / f"{experiment}.yaml", "mini",
                          deep_merge({"data": {"root": str(tmp_path)}}, {}))
    assert cfg.scale == "mini" and cfg.model.input_level == "C4" and cfg.train.feature_cache
    assert cfg.model.num_queries == 30 and cfg.eval.batch_size == 1


@pytest.mark.slow
def test_reduced_mini_run_detects(pretrained, mini_data, tmp_path):
    overrides = {
        "data": {"root": str(mini_data)},
        "model": {"pretrained_backbone": str(pretrained)},
        "train": {"feature_cache_dir": str(tmp_path / "cache"), "max_steps": TRAIN_STEPS,
                  "epochs": 1000, "lr_drop": 1000, "eval_every": 0, "log_every": 100},
    }
    cfg = load_experiment(EXPERIMENT, "mini", overrides)
    t0 = time.time()
    assert train(cfg, tmp_path / "run", progress=False) == 0
    seconds = time.time() - t0
    record = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    ap50 = record["metrics"]["AP50"]
    ratio = record["diagnostics"]["top_box_std"] / record["diagnostics"]["gt_box_std"]
    print(f"reduced mini run: {TRAIN_STEPS} steps in {seconds:.0f} s, AP50 {100 * ap50:.1f}, "
          f"top_box_std / gt {ratio:.2f}, box_std {record['diagnostics']['box_std_across_images']:.4f}")
    assert ap50 >= MIN_AP50, f"AP50 {ap50:.3f}: the reduced mini run did not learn to detect"
    assert ratio >= MIN_TOP_BOX_STD_RATIO, f"top-box spread {ratio:.2f} x GT: boxes do not follow the image"
