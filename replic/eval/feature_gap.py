"""How much of a teacher's FPN features a student expresses: MasKD's feature gap, measured.

MasKD's student imitates the teacher's FPN maps through a 1×1 align conv. Per FPN level, the
teacher's map is fitted from the student's map of the same level by the best affine 1×1 map
(ridge-regularised least squares, fitted on the first half of the val images, measured on the
second): the unexplained share of the teacher's variance, 1 − R², is the part of the gap an align
conv cannot remove — 0: the student's features hold everything of the teacher's (up to a linear
map), 1: nothing of it. Compare students of one teacher (alone, distilled, with a trainable
backbone) with ``python -m replic.eval.feature_gap --teacher T.pt --student S.pt --config X.yaml
--scale mini``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


# Ridge strength relative to the mean input variance: the coarse levels (P6, P7) have few positions
# per channel to fit, which plain least squares would overfit.
RIDGE = 1e-3


def unexplained_share(inputs: Tensor, targets: Tensor, split: int, ridge: float = RIDGE) -> float:
    """1 − R² of ``targets`` (N, C_t) by the (ridge-regularised) least-squares affine map of ``inputs``
    (N, C_s), fitted on rows ``[:split]`` and measured on rows ``[split:]`` (variance about the
    held-out mean)."""
    x = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1).double()
    y = targets.double()
    fit_x = x[:split]
    gram = fit_x.T @ fit_x
    penalty = ridge * gram.diagonal()[:-1].mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    solution = torch.linalg.solve(gram + penalty, fit_x.T @ y[:split])
    residual = y[split:] - x[split:] @ solution
    total = y[split:] - y[split:].mean(dim=0, keepdim=True)
    return float(residual.pow(2).sum() / total.pow(2).sum())


def _rows(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B·H·W, C): one row per position."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def feature_gap(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[Any]) -> dict[str, dict[str, float]]:
    """Per FPN level shared by both detectors: positions and 1 − R² (see the module docstring)."""
    from replic.methods.maskd import tap_maps

    teacher_rows: dict[str, list[Tensor]] = {}
    student_rows: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            t_maps = tap_maps(teacher, batch.images, batch.mask, "fpn")
            s_maps = tap_maps(student, batch.images, batch.mask, "fpn")
            for level, t in t_maps.items():
                if level in s_maps:
                    teacher_rows.setdefault(level, []).append(_rows(t))
                    student_rows.setdefault(level, []).append(_rows(s_maps[level]))
    half = len(batches) // 2
    result: dict[str, dict[str, float]] = {}
    for level, rows in teacher_rows.items():
        split = sum(r.shape[0] for r in rows[:half])
        target = torch.cat(rows)
        result[level] = {"positions": float(target.shape[0]),
                         "unexplained": unexplained_share(torch.cat(student_rows[level]), target, split)}
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
    print("| level | positions | 1 - R² of the teacher's map from the student's (1x1) |")
    print("|---|---|---|")
    for level, row in result.items():
        print(f"| {level} | {int(row['positions'])} | {row['unexplained']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
