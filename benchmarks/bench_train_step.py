"""Training-step time and peak memory: replic Conditional DETR-R50 vs Hugging Face's.

One step = forward + loss + backward + gradient clipping (0.1) + AdamW step, on the same
batch (2 images, 512x512 by default, a few GT boxes), random weights (nothing is
downloaded). Each model runs in a fresh subprocess so its peak memory is its own:
``VmHWM`` from /proc/self/status on CPU (peak resident set, including the interpreter and
libraries, so compare the two side by side rather than as absolute model cost),
``torch.cuda.max_memory_allocated`` on CUDA.

Both models use the official shape (R50, 6+6 layers, d 256, 300 queries, 91 classes), aux
loss on and dropout 0.1 everywhere. Known differences of the HF model that affect cost:
its aux-loss path normalises the decoder state between layers (a different function, not
just a different cost; see the ``auxiliary_loss`` branch of the decoder loop in HF's
``transformers/models/conditional_detr/modeling_conditional_detr.py``), its backbone is
timm's resnet50, and its loss is HF's ``ConditionalDetrForObjectDetection`` loss
(classification weight 1).

Usage:
    python benchmarks/bench_train_step.py [--device cpu|cuda] [--amp none|bf16]
        [--warmup 3] [--steps 5] [--size 512] [--threads N] [--models replic,replic-nchw,hf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NUM_CLASSES = 91
BOXES = [  # (label, cx, cy, w, h), normalised
    [(1, 0.30, 0.40, 0.20, 0.30), (18, 0.70, 0.60, 0.35, 0.25), (44, 0.50, 0.20, 0.10, 0.10)],
    [(3, 0.45, 0.55, 0.50, 0.40), (62, 0.15, 0.80, 0.12, 0.20)],
]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _batch(size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g).to(device)
    mask = torch.zeros(2, size, size, dtype=torch.bool, device=device)  # True = padding
    targets = []
    for boxes in BOXES:
        targets.append({
            "labels": torch.tensor([b[0] for b in boxes], dtype=torch.int64, device=device),
            "boxes": torch.tensor([b[1:] for b in boxes], dtype=torch.float32, device=device),
        })
    return images, mask, targets


def _replic_step_fn(device, size: int, channels_last: bool = True):
    import torch

    from replic.engine.config import TrainConfig
    from replic.engine.optim import build_optimizer
    from replic.models import ModelConfig, build_criterion, build_model

    cfg = ModelConfig(backbone="resnet50", pretrained_backbone="none", num_classes=NUM_CLASSES,
                      channels_last=channels_last)
    model = build_model(cfg).to(device).train()
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, TrainConfig())
    images, mask, targets = _batch(size, device)

    def step(autocast):
        with autocast():
            outputs = model(images, mask)
        losses = criterion({k: v for k, v in outputs.items()}, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        total.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return float(total.detach())

    return model, step


def _hf_step_fn(device, size: int):
    import torch
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    from replic.engine.config import TrainConfig
    from replic.engine.optim import build_optimizer

    config = ConditionalDetrConfig(
        num_labels=NUM_CLASSES, auxiliary_loss=True, dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.1,
    )
    model = ConditionalDetrForObjectDetection(config).to(device).train()
    optimizer = build_optimizer(model, TrainConfig())
    images, mask, targets = _batch(size, device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~mask).long()  # HF: 1 = valid pixel

    def step(autocast):
        with autocast():
            out = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return float(out.loss.detach())

    return model, step


def worker(args: argparse.Namespace) -> None:
    """Time one model in this (fresh) process and print one JSON line."""
    import contextlib

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.worker == "hf":
        model, step = _hf_step_fn(device, args.size)
    else:
        model, step = _replic_step_fn(device, args.size, channels_last=args.worker != "replic-nchw")
    if device.type == "cuda" and args.amp == "bf16":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(autocast)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(autocast)
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib())
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": args.worker, "times": times, "peak_mib": peak, "params": params}))


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models", default="replic,hf",
                        help="comma list of replic (channels-last backbone, the default), "
                             "replic-nchw (the same model in NCHW order) and hf")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--amp", args.amp,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--size", str(args.size),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    print(f"device {args.device}, amp {args.amp}, batch 2 x {args.size}x{args.size}, "
          f"warm-up {args.warmup}, timed {args.steps}, torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}")
    mem = "peak CUDA allocated MiB" if args.device == "cuda" else "peak RSS (VmHWM) MiB"
    print(f"| model | params (M) | step median (s) | IQR (s) | min-max (s) | {mem} |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        q1, med, q3 = _quantiles(row["times"])
        label = {"replic": "replic Conditional DETR-R50",
                 "replic-nchw": "replic Conditional DETR-R50, NCHW backbone",
                 "hf": "HF ConditionalDetrForObjectDetection"}[row["model"]]
        print(f"| {label} | {row['params'] / 1e6:.1f} | {med:.3f} | {q1:.3f}-{q3:.3f} | "
              f"{min(row['times']):.3f}-{max(row['times']):.3f} | {row['peak_mib']:.0f} |")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
