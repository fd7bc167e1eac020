"""Training-step time and peak memory: a D³ETR step vs the plain student step, side by side.

Plain: Conditional DETR-R50 (official shape: 6+6 layers, d 256, 300 queries, 91 classes,
dropout 0.1, aux loss), one step = forward + set loss + backward + clip 0.1 + AdamW.
D³ETR: the same student and step, plus the frozen Conditional DETR-R101 teacher's forward
(no grad, attention maps), the auxiliary group of the teacher's 300 queries decoded by the
student, per-layer adaptive matching and every distillation term (``method: d3etr`` with
its defaults). Random weights (the teacher is written to a temporary checkpoint and loaded
through the method, as in training); nothing is downloaded. Each mode runs in a fresh
subprocess so its peak memory is its own: ``VmHWM`` (peak RSS, interpreter included) on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

Usage:
    python benchmarks/bench_d3etr.py [--device cpu|cuda] [--size 384] [--warmup 1] [--steps 3]
        [--threads N] [--amp none|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"arch": "conditional_detr", "backbone": "resnet50", "pretrained_backbone": "none", "num_classes": 91}
BOXES = [[(1, 0.30, 0.40, 0.20, 0.30), (18, 0.70, 0.60, 0.35, 0.25), (44, 0.50, 0.20, 0.10, 0.10)],
         [(3, 0.45, 0.55, 0.50, 0.40), (62, 0.15, 0.80, 0.12, 0.20)]]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _write_teacher(path: Path) -> None:
    import torch

    from replic.config import from_dict, to_dict
    from replic.models.build import build_model
    from replic.models.config import ModelConfig

    cfg = from_dict(ModelConfig, {**MODEL, "backbone": "resnet101"})
    torch.save({"model": build_model(cfg).state_dict(), "model_config": to_dict(cfg)}, path)


def _worker(args: argparse.Namespace) -> None:
    import torch

    from replic.config import from_dict
    from replic.engine.config import ExperimentConfig
    from replic.engine.runtime import autocast_context, to_float32
    from replic.engine.train import weighted_total
    from replic.methods import MethodStep, build_method
    from replic.models.build import build_criterion

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    method_cfg = {"name": "none"} if args.worker == "plain" else {"name": "d3etr", "teacher": {"checkpoint": args.teacher}}
    cfg = from_dict(ExperimentConfig, {"model": MODEL, "method": method_cfg})
    method = build_method(cfg)
    method.check_inputs()
    detector = method.build_model().to(device)
    criterion = build_criterion(cfg.model).to(device)
    method.setup(detector, criterion, device)
    step = MethodStep(detector, method).train()
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, args.size, args.size, generator=g).to(device)
    mask = torch.zeros(2, args.size, args.size, dtype=torch.bool, device=device)
    targets = [{"labels": torch.tensor([b[0] for b in bs], device=device),
                "boxes": torch.tensor([b[1:] for b in bs], dtype=torch.float32, device=device)} for bs in BOXES]
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            if i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with autocast_context(args.amp, device):
            outputs = step(images, mask, targets)
        losses = criterion(to_float32(outputs), targets)
        total = weighted_total(losses, criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(step.parameters(), 0.1)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    terms = sum(1 for k in losses if k.startswith("d3_"))
    print(json.dumps({"mode": args.worker, "times": times, "peak_mib": peak, "distill_terms": terms}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--worker", choices=["plain", "d3etr"], help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher_r101.pt"
        _write_teacher(teacher)
        rows = []
        for mode in ("plain", "d3etr"):
            cmd = [sys.executable, __file__, "--worker", mode, "--teacher", str(teacher), "--device", args.device,
                   "--amp", args.amp, "--size", str(args.size), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device {args.device}, amp {args.amp}, batch 2 x {args.size}x{args.size}, warm-up {args.warmup}, "
          f"timed {args.steps}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}")
    mem = "peak CUDA allocated MiB" if args.device == "cuda" else "peak RSS (VmHWM) MiB"
    print(f"| step | distillation terms | step median (s) | min-max (s) | {mem} |")
    print("|---|---|---|---|---|")
    labels = {"plain": "Conditional DETR-R50 (plain student)",
              "d3etr": "D³ETR: R50 student + frozen R101 teacher, MixMatcher, all signals"}
    for row in rows:
        t = row["times"]
        print(f"| {labels[row['mode']]} | {row['distill_terms']} | {statistics.median(t):.3f} | "
              f"{min(t):.3f}-{max(t):.3f} | {row['peak_mib']:.0f} |")
    ratio = statistics.median(rows[1]["times"]) / statistics.median(rows[0]["times"])
    print(f"D³ETR / plain step time: {ratio:.2f}x; peak memory: {rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
