"""Helpers for the engine tests: tiny datasets and subprocess runs of ``replic train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "cdetr_r50_50ep.yaml"

# A very small model for the engine tests (the smoke scale, shrunk further).
TINY_SETTINGS = [
    "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
    "model.dim_feedforward=64", "model.num_queries=10",
    "data.train_scales=[64, 72]", "data.max_size=80", "data.crop_scales=[64]",
    "data.crop_size=[48, 64]", "data.val_size=64", "data.val_max_size=80",
    "train.batch_size=2", "eval.batch_size=2", "train.log_every=1",
]


# The CNN family (torchvision Faster R-CNN, smoke sizes shrunk further): multi-scale training and
# the RPN/RoI samplers draw from the RNG, a trainable stage and the warm-up schedule keep state.
CNN_EXPERIMENT = REPO / "configs" / "experiments" / "frcnn_r50_24ep.yaml"
CNN_TINY_SETTINGS = [
    "model.fpn_channels=32", "model.roi_head_dim=64", "model.trainable_layers=1",
    "model.rpn_post_nms_top_n_train=64", "model.rpn_post_nms_top_n_test=64",
    "data.train_scales=[56, 64]", "data.max_size=80", "data.val_size=64", "data.val_max_size=80",
    "train.batch_size=2", "eval.batch_size=2", "train.log_every=1",
]
# family -> (experiment, settings): what the engine tests parametrise over.
# "retinanet": a CNN detector without random sampling (DDP equivalence needs a deterministic loss).
FAMILY_RUNS = {"detr": (EXPERIMENT, TINY_SETTINGS), "cnn": (CNN_EXPERIMENT, CNN_TINY_SETTINGS),
               "retinanet": (REPO / "configs" / "experiments" / "retinanet_r50_24ep.yaml", CNN_TINY_SETTINGS)}


def make_uniform_coco(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A COCO-layout set whose images all have the same size (so padding never differs)."""
    rng = np.random.default_rng(seed)
    categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    for split, n, offset in (("train2017", n_train, 1), ("val2017", n_val, 1000)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = offset + i
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            for k in range(int(rng.integers(1, 3))):
                w, h = (int(v) for v in rng.integers(12, size // 2, size=2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                cat = categories[k % 2]["id"]
                pixels[y : y + h, x : x + w] = (200, 50, 50) if cat == 1 else (50, 200, 50)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                    "iscrowd": 0})
            name = f"{image_id:012d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories,
             "info": {}, "licenses": []}))
    return root


def train_command(out: Path, data_root: Path, extra: list[str] = (), scale: str = "smoke",
                  family: str = "detr") -> list[str]:
    """argv of ``replic train`` on the tiny settings of a model family (:data:`FAMILY_RUNS`)."""
    experiment, settings = FAMILY_RUNS[family]
    cmd = [sys.executable, "-m", "replic", "train", "--config", str(experiment), "--scale", scale,
           "--out", str(out), "--threads", "1", "--no-progress", "--set", f"data.root={data_root}"]
    for item in [*settings, *extra]:
        cmd += ["--set", item]
    return cmd


def env() -> dict[str, str]:
    """Environment for child processes: one thread, no inherited distributed variables."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")}
    out.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return out


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion, returning the completed process (output captured)."""
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time", None)
        lines.append(record)
    return lines
