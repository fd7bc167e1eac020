"""Smoke scale end to end: ``replic train --scale smoke`` on the tiny synthetic data trains
(loss falls), checkpoints, evaluates, and ``replic eval`` of its checkpoint reproduces the
detections and metrics byte for byte.

Measured at smoke scale (configs/scales/smoke.yaml): epoch-mean loss 12.5 -> 11.0 over 4 epochs
(ratio 0.88). Val AP is NOT asserted to beat an untrained model: at this budget it does not
(AP50 ~0.003 vs 0.001-0.007 untrained), see the comment in configs/scales/smoke.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from engine_testutil import EXPERIMENT, REPO, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LOSS_RATIO_MAX = 0.95  # last epoch mean / first epoch mean; measured 0.88


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from replic.data import generate_synthetic_coco

    root = tmp_path_factory.mktemp("tiny")
    generate_synthetic_coco(root)  # the defaults of `replic data synth`
    return root


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "replic", *args]


def test_smoke_training_learns_and_eval_reproduces(tmp_path, tiny):
    out = tmp_path / "run"
    train = run(_cmd("train", "--config", str(EXPERIMENT), "--scale", "smoke", "--out", str(out),
                     "--set", f"data.root={tiny}", "--no-progress"), timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    for name in ("config.yaml", "config.sha256", "provenance.json", "metrics.jsonl", "done.json",
                 "checkpoint_final.pt", "checkpoints/last.pt", "eval/detections.json", "eval/metrics.json"):
        assert (out / name).is_file(), name
    done = json.loads((out / "done.json").read_text())
    trained = done["eval"]
    assert all(0.0 <= v <= 1.0 for v in trained.values() if v == v), trained

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["git"]["commit"] and provenance["packages"]["torch"]
    assert provenance["seeds"]["base"] == 42 and provenance["hardware"]["cpu_count"] >= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert epochs and all({"loss", "loss_ce", "loss_bbox", "loss_giou", "lr_main", "time"} <= set(r) for r in epochs)
    assert len(epochs) == 4 and epochs[-1]["loss"] < LOSS_RATIO_MAX * epochs[0]["loss"], epochs

    # replic eval on the final checkpoint gives the very same detections and metrics.
    ev = run(_cmd("eval", "--config", str(EXPERIMENT), "--scale", "smoke", "--checkpoint",
                  str(out / "checkpoint_final.pt"), "--out", str(tmp_path / "eval"),
                  "--set", f"data.root={tiny}", "--no-progress"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["metrics"] == trained
    diagnostics = record["diagnostics"]
    assert diagnostics == json.loads((out / "eval" / "metrics.json").read_text())["diagnostics"]
    assert 0.15 < diagnostics["gt_box_std"] < 0.35  # tiny val set: 0.23
    assert 0.0 < diagnostics["box_std_across_images"] < diagnostics["gt_box_std"]
    assert record["eval"]["batch_size_per_process"] == 4 and "provenance" in record
    assert record["provenance"]["git"]["commit"]
    assert (tmp_path / "eval" / "detections.json").read_bytes() == (out / "eval" / "detections.json").read_bytes()
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    categories = {c["id"] for c in json.loads((tiny / "annotations" / "instances_val2017.json").read_text())["categories"]}
    assert {d["category_id"] for d in detections} <= categories  # raw (non-contiguous) ids

    # An external checkpoint without model_config (the initial weights) evaluates too, and
    # gives different detections: training changed the model.
    from replic.engine.config import load_experiment
    from replic.engine.runtime import build_detector, seed_everything

    cfg = load_experiment(EXPERIMENT, "smoke", {"data": {"root": str(tiny)}})
    seed_everything(cfg.seed)
    torch.save({"model": build_detector(cfg).state_dict()}, tmp_path / "untrained.pt")
    ev0 = run(_cmd("eval", "--config", str(EXPERIMENT), "--scale", "smoke", "--checkpoint",
                   str(tmp_path / "untrained.pt"), "--out", str(tmp_path / "eval0"),
                   "--set", f"data.root={tiny}", "--no-progress"))
    assert ev0.returncode == 0, ev0.stderr[-3000:]
    assert (tmp_path / "eval0" / "detections.json").read_bytes() != (out / "eval" / "detections.json").read_bytes()
    # Untrained Conditional DETR: the last box layer is zero, every box sits at its query's
    # reference point whatever the image — exactly no spread.
    untrained = json.loads((tmp_path / "eval0" / "metrics.json").read_text())["diagnostics"]
    assert untrained["box_std_across_images"] == 0.0
