"""How much of a teacher's FPN features a student can express: MasKD's feature gap, measured.

MasKD's student imitates the teacher's FPN maps through a 1×1 align conv. Two least-squares fits
tell how far that can go on the val images (fitted on the first half, measured on the second):

* ``student_fpn``: the teacher's level-l map from the student's own level-l map by the best 1×1
  linear map — the part of the gap an align conv cannot remove without the student's features
  changing;
* ``frozen_backbone``: the teacher's level-l map from the student's ResNet maps C3–C5 (each
  brought to level l's grid) by the best 1×1 linear map — what an FPN on a *frozen* backbone can
  reach at best with 1×1 maps: torchvision's FPN levels P3–P5 are linear in C3–C5 (lateral 1×1,
  nearest upsampling, a 3×3 conv), so a student whose ResNet does not train cannot make its
  features more like the teacher's than this, whatever the loss.

Each figure is the unexplained share of the teacher's variance, 1 − R² (0: fully expressible,
1: nothing of it). ``python -m replic.eval.feature_gap --teacher T.pt --student S.pt --config X.yaml
--scale mini`` prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def unexplained_share(inputs: Tensor, targets: Tensor, split: int) -> float:
    """1 − R² of ``targets`` (N, C_t) by the least-squares affine map of ``inputs`` (N, C_s), fitted
    on rows ``[:split]`` and measured on rows ``[split:]`` (variance about the held-out mean)."""
    x = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1).double()
    y = targets.double()
    solution = torch.linalg.lstsq(x[:split], y[:split]).solution
    residual = y[split:] - x[split:] @ solution
    total = y[split:] - y[split:].mean(dim=0, keepdim=True)
    return float(residual.pow(2).sum() / total.pow(2).sum())


def _rows(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B·H·W, C): one row per position."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def feature_gap(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[Any]) -> dict[str, dict[str, float]]:
    """Per FPN level shared by both detectors: the unexplained shares (see the module docstring)."""
    from replic.methods.maskd import tap_maps

    per_level: dict[str, dict[str, list[Tensor]]] = {}
    with torch.no_grad():
        for batch in batches:
            t_maps = tap_maps(teacher, batch.images, batch.mask, "fpn")
            s_maps = tap_maps(student, batch.images, batch.mask, "fpn")
            s_body = tap_maps(student, batch.images, batch.mask, "backbone")
            for level, t in t_maps.items():
                if level not in s_maps:
                    continue
                size = t.shape[-2:]
                body = torch.cat([F.interpolate(c, size=size, mode="nearest") for c in s_body.values()], dim=1)
                store = per_level.setdefault(level, {"teacher": [], "student_fpn": [], "frozen_backbone": []})
                store["teacher"].append(_rows(t))
                store["student_fpn"].append(_rows(s_maps[level]))
                store["frozen_backbone"].append(_rows(body))
    half = len(batches) // 2
    result: dict[str, dict[str, float]] = {}
    for level, store in per_level.items():
        split = sum(r.shape[0] for r in store["teacher"][:half])
        teacher_rows = torch.cat(store["teacher"])
        result[level] = {"positions": float(teacher_rows.shape[0]),
                         **{name: unexplained_share(torch.cat(store[name]), teacher_rows, split)
                            for name in ("student_fpn", "frozen_backbone")}}
    return result


def main(argv: list[str] | None = None) -> int:
    from replic.data import build_dataset
    from replic.data.collate import collate_fn
    from replic.distill.teacher import build_teacher, read_teacher
    from replic.engine.config import load_experiment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (a CNN detector run's checkpoint_final.pt)")
    parser.add_argument("--student", required=True, help="student checkpoint")
    parser.add_argument("--config", required=True, help="the student's experiment (for the val data)")
    parser.add_argument("--scale", default=None)
    parser.add_argument("--images", type=int, default=64, help="val images (half fit, half measure)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_experiment(args.config, args.scale)
    dataset = build_dataset(cfg.data, "val")
    count = min(args.images, len(dataset))
    batches = [collate_fn([dataset[i] for i in range(lo, min(lo + args.batch, count))])
               for lo in range(0, count, args.batch)]
    teacher = build_teacher(read_teacher(args.teacher), torch.device("cpu"))
    student = build_teacher(read_teacher(args.student), torch.device("cpu"))
    result = feature_gap(teacher, student, batches)
    print("| level | positions | 1 - R², from the student's FPN (1x1) | 1 - R², from the frozen C3-C5 (1x1) |")
    print("|---|---|---|---|")
    for level, row in result.items():
        print(f"| {level} | {int(row['positions'])} | {row['student_fpn']:.3f} | {row['frozen_backbone']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
