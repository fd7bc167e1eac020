"""Training-step time: MasKD stage 1 and stage 2 vs the plain student step, side by side, one run.

* plain: RetinaNet-R50-FPN student (``retinanet_r50_24ep``: FPN 256, 91 classes), one step = forward
  with torchvision's losses + backward + clip 35 + SGD;
* stage 1 (``maskd_tokens_retinanet_r101_24ep_t6``): the frozen RetinaNet-R101 teacher with 6 receptive
  tokens per FPN level (hook on its FPN), its task loss + Dice, backward into the tokens only, Adam;
* stage 2 (``maskd_retinanet_r50_24ep``): the plain student step plus the frozen teacher's backbone +
  FPN under no_grad, 5 align convs and the masked distillation loss (customised masks on).

Random weights, a random 2-image batch at ``--size`` px; the teacher goes through a temporary
checkpoint and the tokens are random (``tokens: {random: true}``: same cost as learned ones). Nothing
is downloaded. Median of ``--steps`` timed steps after ``--warmup``.

Usage: python benchmarks/bench_maskd.py [--size 512] [--warmup 1] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "configs" / "experiments"


def _cfg(name: str, extra: list[str]):
    from replic.engine.config import load_experiment, parse_overrides

    return load_experiment(EXP / f"{name}.yaml", "paper", parse_overrides(
        ["model.pretrained_backbone=none", "train.clip_max_norm=35", *extra]))


def _batch(size: int):
    import torch

    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.35, 0.25]]), "labels": torch.tensor([1, 18]),
                "size": torch.tensor([size, size])},
               {"boxes": torch.tensor([[0.45, 0.55, 0.5, 0.4]]), "labels": torch.tensor([3]),
                "size": torch.tensor([size, size])}]
    return images, mask, targets


def _time_mode(cfg, run_dir: Path, size: int, warmup: int, steps: int) -> list[float]:
    import torch

    from replic.engine.optim import build_optimizer
    from replic.engine.runtime import build_loss
    from replic.engine.train import weighted_total
    from replic.methods import MethodStep, build_method

    method = build_method(cfg, run_dir=run_dir)
    method.check_inputs()
    detector = method.build_model()
    criterion = build_loss(cfg)
    method.setup(detector, criterion, torch.device("cpu"))
    model = MethodStep(detector, method)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    images, mask, targets = _batch(size)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(images, mask, targets)
        total = weighted_total(criterion(out, targets), criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 35.0)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from replic.config import to_dict
    from replic.models.families import family_of

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        teacher_cfg = _cfg("retinanet_r101_24ep", [])
        teacher_file = runs / "retinanet_r101_24ep" / "checkpoint_final.pt"
        teacher_file.parent.mkdir(parents=True)
        torch.manual_seed(1)
        torch.save({"model": family_of(teacher_cfg.model).build_model(teacher_cfg.model).state_dict(),
                    "model_config": to_dict(teacher_cfg.model), "config": {"name": "retinanet_r101_24ep"}},
                   teacher_file)
        modes = [
            ("RetinaNet-R50 (plain student)", _cfg("retinanet_r50_24ep", [])),
            ("MasKD stage 1: R101 teacher + 6 tokens/level (tokens train)",
             _cfg("maskd_tokens_retinanet_r101_24ep_t6", [])),
            ("MasKD stage 2: R50 student + frozen R101 teacher FPN + masked loss",
             _cfg("maskd_retinanet_r50_24ep", ["method.tokens.experiment=null", "method.tokens.random=true",
                                                "method.custom_mask_warmup=0"])),
        ]
        print(f"cpu, batch 2 x {args.size}x{args.size}, warm-up {args.warmup}, timed {args.steps}, "
              f"torch {torch.__version__}, threads {args.threads}")
        print("| step | median (s) | min-max (s) |\n|---|---|---|")
        medians = []
        for label, cfg in modes:
            times = _time_mode(cfg, runs / "student", args.size, args.warmup, args.steps)
            medians.append(statistics.median(times))
            print(f"| {label} | {medians[-1]:.3f} | {min(times):.3f}-{max(times):.3f} |", flush=True)
        print(f"stage 1 / plain: {medians[1] / medians[0]:.2f}x; stage 2 / plain: {medians[2] / medians[0]:.2f}x")


if __name__ == "__main__":
    main()
